"""sdjax's CLIPTextModel against transformers' CLIPTextModel, loaded from saved safetensors files."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from reference import rel_err, save_text_encoder
from sdjax.config import CLIPTextConfig
from sdjax.layouts.diffusers import WeightsMismatchError
from sdjax.models.clip import CLIPTextModel, _activation
from sdjax.weights import text_encoder_params_from_state_dict, text_encoder_state_dict

BOS, EOS = 49406, 49407
# Two extra "added" tokens above EOS, so argmax pooling (legacy) and first-EOS pooling differ.
ADDED_TOKEN = 49409
VOCAB_WITH_ADDED = 49410

SD1_STYLE = dict(hidden_act="quick_gelu")
SD2_STYLE = dict(hidden_act="gelu", num_hidden_layers=4)


def _load(path, dtype=None):
    config = CLIPTextConfig.from_diffusers_config(path / "config.json")
    params = text_encoder_params_from_state_dict(load_file(path / "model.safetensors"), config, dtype=dtype)
    return config, params


def _token_ids(batch, seq, seed=0, added_token=False):
    """BOS, random tokens, EOS at a different position per row, EOS padding after it."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, BOS, size=(batch, seq))
    ids[:, 0] = BOS
    for row in range(batch):
        eos_at = 2 + (row * 7 + 3) % (seq - 2)
        ids[row, eos_at:] = EOS
        if added_token:
            ids[row, 1 + row % (eos_at - 1)] = ADDED_TOKEN
    return ids.astype(np.int32)


def _reference(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids).long(), output_hidden_states=True)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_sd1")
    return path, save_text_encoder(path, seed=1, **SD1_STYLE)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_sd2")
    return path, save_text_encoder(path, seed=2, **SD2_STYLE)


@pytest.mark.parametrize("seq", [77, 12])
def test_sd1_matches_transformers(sd1, seq):
    path, torch_model = sd1
    config, params = _load(path)
    assert config.hidden_act == "quick_gelu"
    ids = _token_ids(3, seq)
    ours = CLIPTextModel(config).apply({"params": params}, ids)
    ref = _reference(torch_model, ids).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (3, seq, config.hidden_size)
    err = rel_err(ours, ref)
    print(f"sd1 seq={seq} rel_err={err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("skip_layers", [0, 1, 2])
def test_sd2_skip_layers_match_diffusers_clip_skip(sd2, skip_layers):
    path, torch_model = sd2
    config, params = _load(path)
    assert config.hidden_act == "gelu"
    ids = _token_ids(3, 77, seed=1)
    ours = CLIPTextModel(config).apply({"params": params}, ids, skip_layers)
    out = _reference(torch_model, ids)
    # diffusers' clip_skip=k: hidden_states[-(k + 1)] through the final layer norm.
    with torch.no_grad():
        ref = torch_model.final_layer_norm(out.hidden_states[-(skip_layers + 1)]).numpy()
    if skip_layers == 0:
        np.testing.assert_allclose(ref, out.last_hidden_state.numpy(), rtol=0, atol=0)
    err = rel_err(ours, ref)
    print(f"sd2 skip_layers={skip_layers} rel_err={err:.2e}")
    assert err < 1e-4
    # Skipping must change the result, or the test above could not catch an off-by-one.
    if skip_layers:
        assert rel_err(ours, out.last_hidden_state.numpy()) > 1e-2


def test_exact_gelu_differs_from_tanh_approximation(sd2):
    """SD2's "gelu" is the erf form; the tanh form would be measurably off."""
    _, torch_model = sd2
    x = torch.linspace(-4, 4, 101)
    exact = torch_model.encoder.layers[0].mlp.activation_fn(x).numpy()
    assert rel_err(_activation("gelu")(jnp.asarray(x.numpy())), exact) < 1e-6
    assert rel_err(torch.nn.functional.gelu(x, approximate="tanh").numpy(), exact) > 1e-5


@pytest.mark.parametrize("eos_token_id", [2, EOS])
@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_pooled_matches_pooler_output(tmp_path, eos_token_id, style):
    overrides = {"sd1": SD1_STYLE, "sd2": SD2_STYLE}[style]
    torch_model = save_text_encoder(
        tmp_path, seed=3, vocab_size=VOCAB_WITH_ADDED, eos_token_id=eos_token_id, **overrides
    )
    config, params = _load(tmp_path)
    assert config.eos_token_id == eos_token_id
    ids = _token_ids(4, 77, seed=2, added_token=True)
    hidden, pooled = CLIPTextModel(config).apply({"params": params}, ids, method="encode_with_pooled")
    out = _reference(torch_model, ids)
    ref_pooled = out.pooler_output.numpy()
    hidden_err, pooled_err = rel_err(hidden, out.last_hidden_state.numpy()), rel_err(pooled, ref_pooled)
    print(f"{style} eos={eos_token_id} hidden rel_err={hidden_err:.2e} pooled rel_err={pooled_err:.2e}")
    assert hidden_err < 1e-4 and pooled_err < 1e-4
    # The two conventions pool at different positions for these ids (the added token is the max id).
    other_rule = ids.argmax(-1) if eos_token_id == EOS else (ids == EOS).argmax(-1)
    other = out.last_hidden_state.numpy()[np.arange(len(ids)), other_rule]
    assert rel_err(other, ref_pooled) > 1e-1


def test_pooled_comes_from_full_depth_with_skip_layers(sd2):
    path, torch_model = sd2
    config, params = _load(path)
    ids = _token_ids(2, 20, seed=3)
    hidden, pooled = CLIPTextModel(config).apply({"params": params}, ids, 1, method="encode_with_pooled")
    out = _reference(torch_model, ids)
    with torch.no_grad():
        ref_hidden = torch_model.final_layer_norm(out.hidden_states[-2]).numpy()
    assert rel_err(hidden, ref_hidden) < 1e-4
    assert rel_err(pooled, out.pooler_output.numpy()) < 1e-4


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_bf16(style, request):
    path, torch_model = request.getfixturevalue(style)
    config, params = _load(path, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(params))
    ids = _token_ids(2, 77, seed=4)
    ours = CLIPTextModel(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply({"params": params}, ids)
    assert ours.dtype == jnp.bfloat16
    err = rel_err(ours.astype(jnp.float32), _reference(torch_model, ids).last_hidden_state.numpy())
    print(f"{style} bf16 rel_err={err:.2e}")
    assert err < 2e-2


def test_state_dict_round_trip_loads_in_transformers(sd1, tmp_path):
    path, torch_model = sd1
    state = load_file(path / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in state)  # transformers 5 layout
    config, params = _load(path)

    written = text_encoder_state_dict(params)
    assert sorted(written) == sorted("text_model." + k for k in state)
    for key, value in state.items():
        ours = written["text_model." + key]
        assert ours.dtype == value.dtype and ours.shape == value.shape, key
        assert np.array_equal(ours, value), key

    # transformers 4 layout: prefixed keys plus the position_ids buffer, read back to the same params.
    v4_state = {**written, "text_model.embeddings.position_ids": np.arange(77)[None]}
    again = text_encoder_params_from_state_dict(v4_state, config)
    assert text_encoder_state_dict(again).keys() == written.keys()
    assert all(np.array_equal(text_encoder_state_dict(again)[k], v) for k, v in written.items())

    out_dir = tmp_path / "written"
    out_dir.mkdir()
    shutil.copy(path / "config.json", out_dir / "config.json")
    save_file(written, out_dir / "model.safetensors")
    from transformers import CLIPTextModel as TorchCLIPTextModel

    loaded, info = TorchCLIPTextModel.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original = torch_model.state_dict()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[key]), key


def test_too_long_input_is_rejected(sd1):
    path, _ = sd1
    config, params = _load(path)
    ids = np.full((1, 78), EOS, dtype=np.int32)
    with pytest.raises(ValueError, match=r"78 tokens.*max_position_embeddings=77"):
        CLIPTextModel(config).apply({"params": params}, ids)


@pytest.mark.parametrize("skip_layers", [-1, 3])
def test_skip_layers_out_of_range_is_rejected(sd1, skip_layers):
    path, _ = sd1
    config, params = _load(path)
    with pytest.raises(ValueError, match=r"skip_layers=.*\[0, 2\]"):
        CLIPTextModel(config).apply({"params": params}, _token_ids(1, 8), skip_layers)


def test_mismatched_checkpoint_is_rejected(sd1):
    path, _ = sd1
    config, _ = _load(path)
    state = load_file(path / "model.safetensors")
    del state["final_layer_norm.weight"]
    state["text_projection.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(WeightsMismatchError, match=r"final_layer_norm\.weight[\s\S]*text_projection\.weight"):
        text_encoder_params_from_state_dict(state, config)
