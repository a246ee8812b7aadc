"""SDXL's text encoders: the OpenCLIP ViT-bigG tower with its projection against transformers'
``CLIPTextModelWithProjection``, and the single-file ``conditioner.embedders.*`` layout against diffusers'."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from reference import randomize_, rel_err, seeded
from sdjax.config import CLIPTextConfig
from sdjax.layouts import sdxl_ldm
from sdjax.models.clip import CLIPTextModel
from sdjax.weights import param_shapes, read_component, text_encoder_params_from_state_dict, text_encoder_state_dict

BOS, EOS = 49406, 49407
# A textual-inversion style id above EOS, so the legacy argmax rule and the first-EOS rule pool differently.
ADDED_TOKEN = 49409
TINY_BIGG = dict(
    vocab_size=49410, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=16, bos_token_id=0, pad_token_id=1,
)
TINY_VIT_L = {**{k: v for k, v in TINY_BIGG.items() if k != "projection_dim"},
              "hidden_act": "quick_gelu", "num_hidden_layers": 3, "eos_token_id": 2}
# The released config.json files of stabilityai/stable-diffusion-xl-base-1.0 (bookkeeping keys left out).
SDXL_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
    "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768, "max_position_embeddings": 77,
    "layer_norm_eps": 1e-05, "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    "model_type": "clip_text_model",
}
SDXL_TEXT_ENCODER_2 = {
    **SDXL_TEXT_ENCODER, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
    "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
}


def _save_torch(path, cls_name, seed, **config):
    import transformers

    seeded(seed)
    model = randomize_(getattr(transformers, cls_name)(transformers.CLIPTextConfig(**config)), seed)
    model.save_pretrained(path)
    return model


def _load(path):
    config = CLIPTextConfig.from_diffusers_config(path / "config.json")
    return config, text_encoder_params_from_state_dict(read_component(path), config)


def _token_ids(batch, seed, pad):
    """BOS, random tokens with one added token, EOS at a different position per row, ``pad`` after it."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, BOS, size=(batch, 77))
    ids[:, 0] = BOS
    for row in range(batch):
        eos_at = 3 + row * 11
        ids[row, eos_at] = EOS
        ids[row, eos_at + 1:] = pad
        ids[row, 1 + row % (eos_at - 1)] = ADDED_TOKEN
    return ids.astype(np.int32)


@pytest.fixture(scope="module", params=[2, EOS], ids=["eos2-legacy", "eos49407"])
def bigg(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"bigg_eos{request.param}")
    model = _save_torch(path, "CLIPTextModelWithProjection", seed=5, **TINY_BIGG, eos_token_id=request.param)
    return path, model


def test_config_reads_with_projection_and_writes_the_right_architecture(bigg, tmp_path):
    path, _ = bigg
    saved = json.loads((path / "config.json").read_text())
    config = CLIPTextConfig.from_diffusers_config(saved)
    assert config.has_projection and config.projection_dim == 16
    written = config.to_diffusers_config()
    assert written["architectures"] == ["CLIPTextModelWithProjection"] and written["projection_dim"] == 16
    assert CLIPTextConfig.from_diffusers_config(written) == config
    (tmp_path / "config.json").write_text(json.dumps(written))
    from transformers import CLIPTextConfig as TorchConfig

    again = TorchConfig.from_pretrained(tmp_path)
    assert again.architectures == ["CLIPTextModelWithProjection"] and again.projection_dim == 16

    # SDXL's released configs: text_encoder is exactly SD 1.x's ViT-L (its projection_dim is unused),
    # text_encoder_2 is bigG with a 1280-wide projection and the legacy eos_token_id=2 pooling rule.
    vit_l = CLIPTextConfig.from_diffusers_config(SDXL_TEXT_ENCODER)
    assert vit_l == CLIPTextConfig() and not vit_l.has_projection
    # A plain CLIPTextModel config is written as before projection_dim existed.
    fields = {k: v for k, v in dataclasses.asdict(vit_l).items() if k != "projection_dim"}
    assert vit_l.to_diffusers_config() == {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                           "torch_dtype": "float32", **fields}
    big_g = CLIPTextConfig.from_diffusers_config(SDXL_TEXT_ENCODER_2)
    assert big_g == CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                   num_attention_heads=20, hidden_act="gelu", projection_dim=1280)


def test_penultimate_hidden_states_and_text_embeds_match_transformers(bigg):
    path, torch_model = bigg
    config, params = _load(path)
    assert "text_projection" in params
    # SDXL's tokenizer_2 pads with "!" (id 0) after EOS.
    ids = _token_ids(4, seed=1, pad=0)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids).long(), output_hidden_states=True)
    model = CLIPTextModel(config)
    hidden, text_embeds = model.apply({"params": params}, ids, 1, method="encode_with_pooled", final_norm=False)
    errors = {
        "hidden_states[-2]": rel_err(hidden, ref.hidden_states[-2].numpy()),
        "text_embeds": rel_err(text_embeds, ref.text_embeds.numpy()),
    }
    # diffusers' SDXL clip_skip=1 (hidden_states[-3]) through __call__, which SDXL's first tower uses.
    skipped = model.apply({"params": params}, ids, 2, final_norm=False)
    errors["hidden_states[-3]"] = rel_err(skipped, ref.hidden_states[-3].numpy())
    errors["last_hidden_state"] = rel_err(model.apply({"params": params}, ids), ref.last_hidden_state.numpy())
    print(f"eos={config.eos_token_id} " + " ".join(f"{k} rel_err={v:.2e}" for k, v in errors.items()))
    assert text_embeds.shape == (4, 16) and hidden.shape == (4, 77, 32)
    assert max(errors.values()) < 1e-4, errors
    # Without the final layer norm the result differs, or the test could not tell the two apart.
    assert rel_err(hidden, torch_model.text_model.final_layer_norm(ref.hidden_states[-2]).detach().numpy()) > 1e-2
    # So does pooling by the other eos rule (the added token is the largest id, before EOS).
    other = (ids == EOS).argmax(-1) if config.eos_token_id == 2 else ids.argmax(-1)
    with torch.no_grad():
        other_embeds = torch_model.text_projection(ref.last_hidden_state[np.arange(len(ids)), other]).numpy()
    assert rel_err(other_embeds, ref.text_embeds.numpy()) > 1e-1


def test_state_dict_round_trip_loads_in_transformers(bigg, tmp_path):
    path, torch_model = bigg
    config, params = _load(path)
    written = text_encoder_state_dict(params)
    assert "text_projection.weight" in written and not any(k.startswith("text_model.text_projection") for k in written)
    save_file(written, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config.to_diffusers_config()))
    from transformers import CLIPTextModelWithProjection

    loaded, info = CLIPTextModelWithProjection.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original = torch_model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[key]), key


@pytest.mark.parametrize("released", [SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2], ids=["vit-l", "bigg"])
def test_full_size_builds_abstractly_with_transformers_parameter_count(released):
    import transformers

    config = CLIPTextConfig.from_diffusers_config(released)
    with torch.device("meta"):
        torch_model = getattr(transformers, released["architectures"][0])(transformers.CLIPTextConfig(**released))
    expected = sum(p.numel() for p in torch_model.parameters())
    ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(param_shapes(CLIPTextModel(config))))
    print(f"{released['architectures'][0]} parameters: {ours}")
    assert ours == expected
    if config.has_projection:
        assert ours == 694_659_840  # OpenCLIP ViT-bigG/14's text tower with its projection


# --- single files: SDXL's conditioner ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """Tiny ViT-L and bigG towers as transformers state dicts (numpy) with their sdjax configs."""
    states, configs = {}, {}
    for name, cls_name, overrides in (("text_encoder", "CLIPTextModel", TINY_VIT_L),
                                      ("text_encoder_2", "CLIPTextModelWithProjection", TINY_BIGG)):
        path = tmp_path_factory.mktemp(name)
        _save_torch(path, cls_name, seed=len(name), **overrides)
        configs[name] = CLIPTextConfig.from_diffusers_config(path / "config.json")
        states[name] = text_encoder_state_dict(text_encoder_params_from_state_dict(read_component(path), configs[name]))
        shutil.rmtree(path)
    return states, configs


def _assert_same(ours, expected):
    assert sorted(ours) == sorted(expected)
    for key, value in expected.items():
        assert np.asarray(ours[key]).shape == value.shape and np.array_equal(ours[key], value), key


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_conditioner_layout_round_trips(towers, refiner):
    states, configs = towers
    if refiner:
        states, configs = {"text_encoder_2": states["text_encoder_2"]}, {"text_encoder_2": configs["text_encoder_2"]}
    file = sdxl_ldm.transformers_to_sdxl_text_encoders(states, configs)
    big_g = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    width, layers = configs["text_encoder_2"].hidden_size, configs["text_encoder_2"].num_hidden_layers
    assert file[big_g + "text_projection"].shape == (width, 16)
    np.testing.assert_array_equal(file[big_g + "text_projection"], states["text_encoder_2"]["text_projection.weight"].T)
    assert file[big_g + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert file[big_g + "positional_embedding"].shape == (77, width)
    assert {big_g + "ln_final.weight", big_g + "token_embedding.weight"} <= file.keys()
    # SDXL keeps all of bigG's layers: no extra identity layer is written, unlike SD 2.x.
    assert sum(k.endswith("attn.in_proj_weight") for k in file) == layers
    if not refiner:
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in file
    assert len(file) == sum(len(s) for s in states.values()) - 2 * layers * 2  # q, k, v packed into one

    # Real files also carry CLIP's temperature and the position-id buffer, which are ignored.
    extras = {big_g + "logit_scale": np.ones((), np.float32)}
    if not refiner:
        extras["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
    back = sdxl_ldm.sdxl_text_encoders_to_transformers({**file, **extras, "model.diffusion_model.x": np.zeros(1)}, configs)
    assert back.keys() == states.keys()
    for name in states:
        _assert_same(back[name], states[name])


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_conditioner_layout_converts_back_in_diffusers(towers, refiner):
    from types import SimpleNamespace

    from diffusers.loaders import single_file_utils

    states, configs = towers
    if refiner:
        states, configs = {"text_encoder_2": states["text_encoder_2"]}, {"text_encoder_2": configs["text_encoder_2"]}
    file = {k: torch.from_numpy(np.array(v)) for k, v in
            sdxl_ldm.transformers_to_sdxl_text_encoders(states, configs).items()}
    prefix = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    # diffusers reads only the text model's config.hidden_size, and only when text_projection is absent.
    stub = SimpleNamespace(config=SimpleNamespace(hidden_size=configs["text_encoder_2"].hidden_size))
    converted = single_file_utils.convert_open_clip_checkpoint(stub, file, prefix=prefix)
    _assert_same({k: v.numpy() for k, v in converted.items()}, states["text_encoder_2"])
    if not refiner:
        clip = single_file_utils.convert_ldm_clip_checkpoint(file)
        _assert_same({k: v.numpy() for k, v in clip.items()}, states["text_encoder"])


def test_conditioner_tensors_without_a_place_are_rejected(towers):
    states, configs = towers
    file = sdxl_ldm.transformers_to_sdxl_text_encoders(states, configs)
    with pytest.raises(ValueError, match=r"1 conditioner tensor.*embedders\.1\.model\.transformer\.resblocks\.9\."):
        sdxl_ldm.sdxl_text_encoders_to_transformers(
            {**file, "conditioner.embedders.1.model.transformer.resblocks.9.ln_1.weight": np.ones(32)}, configs)
    # A bigG config without the projection head leaves text_projection without a place.
    no_head = {**configs, "text_encoder_2": CLIPTextConfig(**{**TINY_BIGG, "projection_dim": None})}
    with pytest.raises(ValueError, match=r"embedders\.1\.model\.text_projection"):
        sdxl_ldm.sdxl_text_encoders_to_transformers(file, no_head)
    with pytest.raises(ValueError, match=r"text_encoder_2 text_projection\.weight"):
        sdxl_ldm.transformers_to_sdxl_text_encoders(states, no_head)
    with pytest.raises(ValueError, match=r"text_encoder_2 text_projection\.weight \(missing\)"):
        sdxl_ldm.transformers_to_sdxl_text_encoders(
            {**states, "text_encoder_2": {k: v for k, v in states["text_encoder_2"].items()
                                          if not k.startswith("text_projection")}}, configs)
    with pytest.raises(ValueError, match=r"base\) or \['text_encoder_2'\] \(refiner\); got \['text_encoder'\]"):
        sdxl_ldm.sdxl_text_encoders_to_transformers(file, {"text_encoder": configs["text_encoder"]})
