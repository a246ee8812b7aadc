"""Single-file (CompVis / LDM layout) checkpoints: inference of the model type, the key tables, safety.

diffusers has no converter to the LDM layout installed, so the files are written with sdjax's
``diffusers_to_ldm`` and then validated independently: diffusers' PyTorch ``from_single_file`` (with the
local diffusers folder as config, no network) must load them into exactly the tensors of that folder.
sdjax's loader must then give parameters bit-identical to loading the folder itself.
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference
from sdjax import config as configs
from sdjax import single_file as sf
from sdjax import weights
from sdjax.layouts import files, ldm

# Tiny models that keep the invariants real SD files have (32 GroupNorm groups, 64-wide text heads,
# 8 U-Net heads for SD 1.x and 64-wide U-Net heads for SD 2.x), so their config is inferable.
SD_TEXT_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD1_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1, **SD_TEXT_IDS)
SD2_TEXT = dict(SD1_TEXT, hidden_act="gelu")  # 2 layers: written and read as they are
# The released SD 2.x text encoder: OpenCLIP's 24 layers less the last, as diffusers keeps it.
SD2_TEXT_23 = dict(SD2_TEXT, num_hidden_layers=23)
THREE_LEVELS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
    cross_attention_dim=64,
)
SD1_UNET = dict(THREE_LEVELS, block_out_channels=(32, 64, 64), attention_head_dim=8)
SD2_UNET = dict(
    THREE_LEVELS, block_out_channels=(64, 64, 128), attention_head_dim=(1, 1, 2), use_linear_projection=True
)
VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=32)

VARIANTS = {
    "sd1": dict(unet=SD1_UNET, text_encoder=SD1_TEXT),
    "sd1-inpaint": dict(unet=dict(SD1_UNET, in_channels=9), text_encoder=SD1_TEXT),
    "sd2-v": dict(
        unet=dict(SD2_UNET, upcast_attention=True),
        text_encoder=SD2_TEXT_23,
        scheduler=dict(prediction_type="v_prediction"),
    ),
    "sd2-depth": dict(unet=dict(SD2_UNET, in_channels=5), text_encoder=SD2_TEXT),
    "sd2-inpaint": dict(unet=dict(SD2_UNET, in_channels=9), text_encoder=SD2_TEXT),
}
COMPONENTS = ("text_encoder", "unet", "vae")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> (diffusers folder, single file written from it)."""
    root = tmp_path_factory.mktemp("single_file")
    out = {}
    for seed, (name, parts) in enumerate(VARIANTS.items()):
        folder = root / name
        reference.save_pipeline(folder, seed=seed, vae=VAE, **parts)
        out[name] = (folder, _write_ldm(root / f"{name}.safetensors", folder))
    return out


@pytest.fixture(scope="module")
def loaded(models):
    """(variant, "file" | "folder") -> (config, fp32 params), each loaded once."""
    cache = {}

    def load(variant, source):
        if (variant, source) not in cache:
            folder, file = models[variant]
            if source == "file":
                cache[variant, source] = sf.load_single_file(file)
            else:
                cache[variant, source] = weights.load_pretrained(folder, dtype=jnp.float32)
        return cache[variant, source]

    return load


def _folder_states(folder):
    return {name: weights.read_component(folder / name) for name in COMPONENTS}


def _write_ldm(path, folder, transform=lambda state: state):
    state = ldm.diffusers_to_ldm(_folder_states(folder), weights.read_model_config(folder))
    files.write_safetensors(path, transform(state))
    return path


def _assert_modules_equal(expected: dict, actual: dict):
    """Every tensor of every component bit-identical (PyTorch modules)."""
    for name, module in expected.items():
        a, b = module.state_dict(), actual[name].state_dict()
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"


def _diffusers_pipelines(folder, file, **kwargs):
    from diffusers import StableDiffusionPipeline

    reference_pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    single = StableDiffusionPipeline.from_single_file(
        str(file), config=str(folder), local_files_only=True, safety_checker=None, **kwargs
    )
    return (
        {name: getattr(reference_pipe, name) for name in COMPONENTS},
        {name: getattr(single, name) for name in COMPONENTS},
    )


def _native(config: configs.ModelConfig, like: configs.ModelConfig) -> configs.ModelConfig:
    """``config`` with the native sizes of ``like`` (the tiny folders use small sample sizes)."""
    return config.replace(
        unet=dataclasses.replace(config.unet, sample_size=like.unet.sample_size),
        vae=dataclasses.replace(config.vae, sample_size=like.vae.sample_size),
    )


# --- the layout, validated by diffusers, and bit-identical parameters ---------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_diffusers_loads_our_single_file_into_the_folder_tensors(models, variant):
    folder, file = models[variant]
    expected, actual = _diffusers_pipelines(folder, file)
    _assert_modules_equal(expected, actual)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_single_file_params_are_bit_identical_to_the_folder(loaded, variant):
    config, params = loaded(variant, "file")
    folder_config, folder_params = loaded(variant, "folder")
    reference.assert_trees_equal(params, folder_params)
    # Everything but the native image size is read from key names and shapes. The folder, written by diffusers,
    # states timestep_spacing; a single file has none, so each sampler takes its own default (as diffusers does).
    assert config.scheduler.timestep_spacing is None
    config = config.replace(scheduler=dataclasses.replace(config.scheduler, timestep_spacing="leading"))
    assert folder_config.scheduler.timestep_spacing == "leading"
    assert _native(config, folder_config) == folder_config


@pytest.mark.parametrize(
    "variant, preset, prediction",
    [
        ("sd1", configs.SD15, "epsilon"),
        ("sd1-inpaint", configs.SD15_INPAINT, "epsilon"),
        ("sd2-v", configs.SD21_V, "v_prediction"),
        ("sd2-depth", configs.SD2_DEPTH, "epsilon"),
        ("sd2-inpaint", configs.SD21_BASE, "epsilon"),
    ],
)
def test_model_type_defaults_follow_diffusers(models, variant, preset, prediction):
    config = sf.infer_model_config(sf.read_single_file(models[variant][1]))
    assert config.scheduler.prediction_type == prediction
    assert config.unet.upcast_attention == preset.unet.upcast_attention
    assert config.unet.sample_size == preset.unet.sample_size
    assert config.text_encoder.hidden_act == preset.text_encoder.hidden_act
    assert config.unet.use_linear_projection == preset.unet.use_linear_projection


def test_sd2_prediction_type_override_selects_the_512_base_model(models):
    state = sf.read_single_file(models["sd2-v"][1])
    base = sf.infer_model_config(state, prediction_type="epsilon")
    assert base.scheduler.prediction_type == "epsilon"
    assert not base.unet.upcast_attention and base.unet.sample_size == 64
    v = sf.infer_model_config(sf.read_single_file(models["sd1"][1]), prediction_type="v_prediction")
    assert v.scheduler.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type='v'.*accepted"):
        sf.load_single_file(models["sd1"][1], prediction_type="v")


def test_explicit_config_loads_what_shapes_cannot_tell(tmp_path):
    # reference.TINY_* use 8 GroupNorm groups and 8-wide text heads: not inferable from any shape.
    folder = tmp_path / "tiny"
    reference.save_pipeline(folder)
    file = _write_ldm(tmp_path / "tiny.safetensors", folder)
    with pytest.raises(ValueError, match="pass config="):
        sf.load_single_file(file)
    folder_config, folder_params = weights.load_pretrained(folder, dtype=jnp.float32)
    for given in (folder, folder_config):
        config, params = sf.load_single_file(file, config=given)
        assert config == folder_config
        reference.assert_trees_equal(params, folder_params)
    config, _ = sf.load_single_file(file, config=folder, prediction_type="v_prediction")
    assert config.scheduler.prediction_type == "v_prediction"


def test_config_of_the_wrong_text_encoder_family_is_refused(models):
    with pytest.raises(ValueError, match="SD 1.x .CLIP. text encoder, but .* holds an SD 2.x"):
        sf.load_single_file(models["sd2-v"][1], config="sd15")
    with pytest.raises(ValueError, match="not understood"):
        sf.load_single_file(models["sd1"][1], config="sd99")


# --- EMA, dtypes, .ckpt -------------------------------------------------------------------------------------


def test_ema_weights_are_used_when_asked(models, loaded, tmp_path):
    from diffusers import UNet2DConditionModel

    folder, _ = models["sd1"]
    config = weights.read_model_config(folder)
    ema_folder = tmp_path / "ema_unet"
    reference.save_unet(ema_folder, seed=7, **{**SD1_UNET, "sample_size": 8})
    ema_unet = ldm.diffusers_to_ldm({**_folder_states(folder), "unet": weights.read_component(ema_folder)}, config)

    def add_ema(state):
        # LDM's LitEma names: "model_ema." + the module path below LatentDiffusion.model, dots removed.
        ema = {
            "model_ema." + key[len("model."):].replace(".", ""): value
            for key, value in ema_unet.items()
            if key.startswith("model.diffusion_model.")
        }
        assert len(ema) > 100  # diffusers only extracts EMA weights from files with more than 100
        return {**state, **ema, "model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.int32(1000)}

    file = _write_ldm(tmp_path / "ema.safetensors", folder, add_ema)
    diffusers_ema = UNet2DConditionModel.from_single_file(
        str(file), config=str(folder), subfolder="unet", local_files_only=True, extract_ema=True
    )
    _assert_modules_equal({"unet": UNet2DConditionModel.from_pretrained(ema_folder)}, {"unet": diffusers_ema})

    states = _folder_states(folder)
    _, with_ema = sf.load_single_file(file, use_ema=True)
    expected = weights.params_from_state_dicts(
        config, {**states, "unet": weights.read_component(ema_folder)}, jnp.float32
    )
    reference.assert_trees_equal(with_ema, expected)
    _, without_ema = sf.load_single_file(file)
    reference.assert_trees_equal(without_ema, loaded("sd1", "folder")[1])
    with pytest.raises(ValueError, match="no EMA weights"):
        sf.load_single_file(models["sd1"][1], use_ema=True)


def test_fp16_file_loads_as_fp16_values(models, tmp_path):
    folder, _ = models["sd1"]
    half = lambda state: {k: v.astype(np.float16) for k, v in state.items()}  # noqa: E731
    file = _write_ldm(tmp_path / "half.safetensors", folder, half)
    config = weights.read_model_config(folder)
    expected_states = {k: half(v) for k, v in _folder_states(folder).items()}
    _, params32 = sf.load_single_file(file, dtype=jnp.float32)
    reference.assert_trees_equal(params32, weights.params_from_state_dicts(config, expected_states, jnp.float32))
    _, params16 = sf.load_single_file(file, dtype=jnp.float16)
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.float16)}
    expected, actual = _diffusers_pipelines(folder, file, torch_dtype=torch.float16)
    _assert_modules_equal({k: m.half() for k, m in expected.items()}, actual)


def test_ckpt_loads_like_the_safetensors_file(models, loaded, tmp_path):
    folder, file = models["sd1"]
    state = sf.read_single_file(file)
    ckpt = tmp_path / "model.ckpt"
    torch.save(
        {"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, "global_step": 470000}, ckpt
    )
    _, from_ckpt = sf.load_single_file(ckpt)
    reference.assert_trees_equal(from_ckpt, loaded("sd1", "file")[1])


# --- writing back ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sd1", "sd2-v"])
def test_save_single_file_round_trips_through_diffusers(models, loaded, variant, tmp_path):
    folder, file = models[variant]
    config, params = loaded(variant, "file")
    saved = tmp_path / "saved.safetensors"
    sf.save_single_file(saved, config, params)
    original, written = sf.read_single_file(file), sf.read_single_file(saved)
    assert original.keys() == written.keys()
    for key in original:
        assert np.array_equal(original[key], written[key]), key
    expected, actual = _diffusers_pipelines(folder, saved)
    _assert_modules_equal(expected, actual)
    assert sf.declared_prediction_type(saved) == config.scheduler.prediction_type


def test_saved_sd2_layout_is_openclip_with_an_identity_last_layer(models, loaded):
    folder, file = models["sd2-v"]
    state = sf.read_single_file(file)
    hidden = SD2_TEXT["hidden_size"]
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    assert state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * hidden, hidden)
    q = weights.read_component(folder / "text_encoder")
    q = q.get("text_model.encoder.layers.5.self_attn.k_proj.weight", q.get("encoder.layers.5.self_attn.k_proj.weight"))
    packed = state["cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight"]
    assert np.array_equal(packed[hidden : 2 * hidden], q)
    # OpenCLIP has 24 layers; SD 2.x runs 23. The 24th is written as an exact identity.
    last = "cond_stage_model.model.transformer.resblocks.23."
    assert not np.any(state[last + "attn.out_proj.weight"]) and not np.any(state[last + "mlp.c_proj.weight"])
    assert not any(k.startswith("cond_stage_model.model.transformer.resblocks.24.") for k in state)
    # Without the 24th layer (as diffusers' LDM export writes SD 2.x) all 23 are used.
    exported = {k: v for k, v in state.items() if not k.startswith(last)}
    config = sf.infer_model_config(exported)
    assert config.text_encoder.num_hidden_layers == 23
    reference.assert_trees_equal(
        weights.params_from_state_dicts(config, ldm.ldm_to_diffusers(exported, config), jnp.float32),
        loaded("sd2-v", "folder")[1],
    )
    # A VAE attention 1x1 conv, as in the original files.
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4


def test_declared_prediction_type_survives_a_round_trip(models, loaded, tmp_path):
    # An SD 2.x 4-channel file defaults to v-prediction; an epsilon model must not flip after saving.
    base = sf.infer_model_config(sf.read_single_file(models["sd2-v"][1]), prediction_type="epsilon")
    _, params = loaded("sd2-v", "file")
    saved = tmp_path / "base.safetensors"
    sf.save_single_file(saved, base, params, dtype=np.float16)
    assert sf.declared_prediction_type(saved) == "epsilon"
    assert sf.infer_model_config(sf.read_single_file(saved)).scheduler.prediction_type == "v_prediction"
    reloaded, _ = sf.load_single_file(saved)
    assert reloaded == base
    assert sf.read_single_file(saved)["model.diffusion_model.out.2.weight"].dtype == np.float16
    with pytest.raises(ValueError, match="safetensors files only"):
        sf.save_single_file(tmp_path / "x.ckpt", base, params)


def test_module_tables_are_one_to_one():
    for preset in configs.PRESETS.values():
        for table in (
            ldm.unet_module_table(preset.unet),
            ldm.vae_module_table(preset.vae),
            ldm.open_clip_module_table(preset.text_encoder),
        ):
            assert len(set(table.values())) == len(table)


# --- bad input --------------------------------------------------------------------------------------------------


def test_truncated_file_is_a_clear_error(models, tmp_path):
    data = models["sd1"][1].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.CheckpointError, match="truncated"):
        sf.load_single_file(truncated)
    ckpt = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1000)}}, ckpt)
    truncated_ckpt = tmp_path / "truncated.ckpt"
    truncated_ckpt.write_bytes(ckpt.read_bytes()[:300])
    with pytest.raises(weights.CheckpointError, match="could not be loaded safely"):
        sf.load_single_file(truncated_ckpt)


def test_sdxl_file_is_refused_naming_the_family(models, tmp_path):
    state = sf.read_single_file(models["sd1"][1])
    sdxl = {k.replace("cond_stage_model.", "conditioner.embedders.0."): v for k, v in state.items()}
    sdxl["conditioner.embedders.1.model.positional_embedding"] = np.zeros((77, 64), np.float32)
    sdxl["model.diffusion_model.label_emb.0.0.weight"] = np.zeros((64, 16), np.float32)
    file = tmp_path / "sdxl.safetensors"
    files.write_safetensors(file, sdxl)
    with pytest.raises(ValueError, match="SDXL.*SD 1.x, SD 2.x"):
        sf.load_single_file(file)
    # A U-Net with class/size embeddings alone is refused too, even with a config given.
    state["model.diffusion_model.label_emb.0.0.weight"] = np.zeros((64, 16), np.float32)
    with pytest.raises(ValueError, match="class- or size-conditioned"):
        sf.detect_family(state)


def test_incomplete_or_extra_tensors_are_named(models):
    state = dict(sf.read_single_file(models["sd1"][1]))
    config = sf.infer_model_config(state)
    extra = {**state, "model.diffusion_model.input_blocks.1.1.transformer_blocks.1.attn1.to_q.weight": np.zeros(1)}
    with pytest.raises(ValueError, match=r"1 tensor\(s\).*transformer_blocks\.1\.attn1\.to_q"):
        ldm.ldm_to_diffusers(extra, config)
    no_vae = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ValueError, match=r"no VAE \(first_stage_model"):
        sf.infer_model_config(no_vae)
    with pytest.raises(ValueError, match="input channels is not supported"):
        sf.infer_model_config({**state, "model.diffusion_model.input_blocks.0.0.weight": np.zeros((32, 8, 3, 3))})
    ignored = {**state, "alphas_cumprod": np.ones(1000, np.float32), "depth_model.model.scratch.x": np.zeros(2)}
    assert ldm.ldm_to_diffusers(ignored, config).keys() == ldm.ldm_to_diffusers(state, config).keys()


def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.conv_in.weight": Payload()}}, ckpt)
    with pytest.raises(weights.CheckpointError, match="could not be loaded safely"):
        sf.load_single_file(ckpt)
    assert not sentinel.exists()
    torch.load(ckpt, weights_only=False)  # the payload is live: plain unpickling runs it
    assert sentinel.exists()


def test_ckpt_loads_without_torch(models, loaded, tmp_path, monkeypatch):
    state = sf.read_single_file(models["sd1"][1])
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, ckpt)
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    _, from_ckpt = sf.load_single_file(ckpt)
    reference.assert_trees_equal(from_ckpt, loaded("sd1", "file")[1])


def test_pickle_without_tensors_is_refused(tmp_path):
    ckpt = tmp_path / "strings.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.conv_in.weight": "not a tensor"}}, ckpt)
    with pytest.raises(weights.CheckpointError, match="holds no tensors"):
        sf.load_single_file(ckpt)
    listed = tmp_path / "list.ckpt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(weights.CheckpointError, match="does not hold a state dict"):
        sf.load_single_file(listed)


def test_paths_that_are_not_single_files(tmp_path, models):
    with pytest.raises(FileNotFoundError):
        sf.load_single_file(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="folder"):
        sf.load_single_file(models["sd1"][0])
    other = tmp_path / "model.onnx"
    other.write_bytes(b"0" * 16)
    with pytest.raises(ValueError, match="accepted: .safetensors"):
        sf.load_single_file(other)


