"""Single files carry their configuration: sdjax's own metadata, or an original LDM .yaml (beside or given).

Files sdjax writes load back with no hints into the identical config and params, even where heads and
GroupNorm groups cannot be read from shapes. Files without either warn when those values had to be guessed.
"""

import dataclasses
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import reference
import sdjax
from sdjax import config as configs
from sdjax import single_file as sf
from sdjax import weights
from sdjax.layouts import files, ldm, ldm_config

COMPONENTS = ("text_encoder", "unet", "vae")


def _load_quietly(*args, **kwargs):
    """load_single_file, failing on the 'guessed' warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*guessed.*")
        return sf.load_single_file(*args, **kwargs)


def _write_ldm(path, folder):
    """A single file without sdjax metadata, as other tools write them."""
    states = {name: weights.read_component(folder / name) for name in COMPONENTS}
    files.write_safetensors(path, ldm.diffusers_to_ldm(states, weights.read_model_config(folder)))
    return path


def _round_trip(tmp_path, config, params):
    saved = tmp_path / "saved.safetensors"
    sf.save_single_file(saved, config, params)
    loaded_config, loaded_params = _load_quietly(saved)
    assert loaded_config == config
    reference.assert_trees_equal(loaded_params, params)
    assert sf.embedded_config(saved) == config
    return saved


# --- sdjax metadata -----------------------------------------------------------------------------------------


def test_tiny_fixture_round_trips_with_no_hints(tiny_pipeline_dir, tmp_path):
    # 8 GroupNorm groups, per-block U-Net heads (2, 4), 8-wide text heads: none of it readable from shapes.
    config, params = weights.load_pretrained(tiny_pipeline_dir, dtype=jnp.float32)
    assert config.unet.attention_head_dim == (2, 4) and config.vae.norm_num_groups == 8
    saved = _round_trip(tmp_path, config, params)
    # An explicit config and prediction type still win over the metadata.
    other = config.replace(scheduler=dataclasses.replace(config.scheduler, beta_end=0.02))
    assert sf.load_single_file(saved, config=other)[0] == other
    assert sf.load_single_file(saved, prediction_type="v_prediction")[0].scheduler.prediction_type == "v_prediction"


def test_sd2_style_config_with_unusual_heads_and_groups_round_trips(tmp_path):
    folder = tmp_path / "sd2ish"
    reference.save_pipeline(
        folder,
        unet=dict(attention_head_dim=(1, 8), norm_num_groups=16, use_linear_projection=True, upcast_attention=True),
        vae=dict(norm_num_groups=16),
        text_encoder=dict(hidden_act="gelu"),
        scheduler=dict(prediction_type="v_prediction", timestep_spacing="trailing"),
    )
    config, params = weights.load_pretrained(folder, dtype=jnp.float32)
    config = config.replace(clip_skip=1)
    _round_trip(tmp_path, config, params)


def test_builtin_model_round_trips_with_no_hints(tmp_path):
    sd = sdjax.StableDiffusion.default()
    saved = tmp_path / "builtin.safetensors"
    sf.save_single_file(saved, sd.config, sd.params)
    config, params = _load_quietly(saved)
    assert config == sd.config
    reference.assert_trees_equal(params, sd.params)


def test_metadata_records_every_config_exactly():
    odd = configs.SD15.replace(
        unet=dataclasses.replace(configs.SD15.unet, attention_head_dim=(1, 2, 3, 4), num_attention_heads=(4, 3, 2, 1)),
        vae=dataclasses.replace(configs.SD15.vae, norm_num_groups=8, shift_factor=0.1159, scaling_factor=0.3611),
        scheduler=dataclasses.replace(configs.SD15.scheduler, trained_betas=()),  # not carried by diffusers' JSON
        clip_skip=2,
    )
    for config in (*configs.PRESETS.values(), odd):
        text = ldm_config.config_to_metadata(config)
        assert ldm_config.config_from_metadata({ldm_config.METADATA_KEY: text}) == config
    assert ldm_config.config_from_metadata({}) is None
    with pytest.raises(ValueError, match="sdjax.config metadata is not valid JSON"):
        ldm_config.config_from_metadata({ldm_config.METADATA_KEY: "{"}, "x.safetensors")
    with pytest.raises(ValueError, match="format 99.*reads 1"):
        ldm_config.config_from_metadata({ldm_config.METADATA_KEY: '{"format": 99}'})


# --- original LDM .yaml -------------------------------------------------------------------------------------

_LDM_YAML = """\
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.{model}
  params:
{extra}    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: {conditioning}
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    scheduler_config: # 10000 warmup steps
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params:
        warm_up_steps: [ 10000 ]
        cycle_lengths: [ 10000000000000 ]
        f_start: [ 1.e-6 ]
        f_max: [ 1. ]
        f_min: [ 1. ]

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        image_size: 32 # unused
        in_channels: {in_channels}
        out_channels: 4
        model_channels: {model_channels}
        attention_resolutions: {attention_resolutions}
        num_res_blocks: 2
        channel_mult: {channel_mult}
{heads}
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: {context_dim}
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: {vae_ch}
          ch_mult:
{vae_mult}
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
{cond_stage}
"""
_SD1_COND = "      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder"
_SD2_COND = """\
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate\""""
_SD1_HEADS = "        num_heads: 8"
_SD2_HEADS = "        num_head_channels: 64 # need to fix for flash-attn\n        use_linear_in_transformer: True"


def _yaml(family="sd1", *, model="LatentDiffusion", extra="", conditioning="crossattn", in_channels=4,
          model_channels=320, channel_mult="[ 1, 2, 4, 4 ]", attention_resolutions="[ 4, 2, 1 ]", heads=None,
          context_dim=None, vae_ch=128, vae_mult=(1, 2, 4, 4)):
    return _LDM_YAML.format(
        model=model, extra=extra, conditioning=conditioning, in_channels=in_channels, model_channels=model_channels,
        channel_mult=channel_mult, attention_resolutions=attention_resolutions,
        heads=heads or (_SD1_HEADS if family == "sd1" else _SD2_HEADS),
        context_dim=context_dim or (768 if family == "sd1" else 1024), vae_ch=vae_ch,
        vae_mult="\n".join(f"          - {m}" for m in vae_mult), cond_stage=_SD1_COND if family == "sd1" else _SD2_COND,
    )


# The released inference configs (CompVis/stable-diffusion and Stability-AI/stablediffusion configs/).
RELEASED_YAMLS = {
    "v1-inference.yaml": (_yaml("sd1"), configs.SD15),
    "v1-inpainting-inference.yaml": (
        _yaml("sd1", model="LatentInpaintDiffusion", conditioning="hybrid", in_channels=9), configs.SD15_INPAINT
    ),
    "v2-inference.yaml": (_yaml("sd2"), configs.SD21_BASE),
    "v2-inference-v.yaml": (_yaml("sd2", extra='    parameterization: "v"\n'), configs.SD21_V),
    "v2-midas-inference.yaml": (
        _yaml("sd2", model="LatentDepth2ImageDiffusion", conditioning="hybrid", in_channels=5), configs.SD2_DEPTH
    ),
}


def _shapes_only_state(preset: configs.ModelConfig) -> dict:
    """The text-encoder tensors a file of ``preset`` has, as zero-cost broadcast views, plus one key per part."""
    text = preset.text_encoder
    zeros = lambda *shape: np.broadcast_to(np.float32(0), shape)  # noqa: E731
    state = {"model.diffusion_model.out.2.weight": zeros(4), "first_stage_model.quant_conv.weight": zeros(8)}
    if ldm.uses_open_clip(preset):
        prefix = "cond_stage_model.model."
        state[prefix + "token_embedding.weight"] = zeros(text.vocab_size, text.hidden_size)
        state[prefix + "positional_embedding"] = zeros(77, text.hidden_size)
        for i in range(24):
            state[f"{prefix}transformer.resblocks.{i}.mlp.c_fc.weight"] = zeros(text.intermediate_size, text.hidden_size)
    else:
        prefix = "cond_stage_model.transformer.text_model."
        state[prefix + "embeddings.token_embedding.weight"] = zeros(text.vocab_size, text.hidden_size)
        state[prefix + "embeddings.position_embedding.weight"] = zeros(77, text.hidden_size)
        for i in range(text.num_hidden_layers):
            state[f"{prefix}encoder.layers.{i}.mlp.fc1.weight"] = zeros(text.intermediate_size, text.hidden_size)
    return state


@pytest.mark.parametrize("name", list(RELEASED_YAMLS))
def test_released_ldm_yamls_give_the_presets(name, tmp_path):
    text, preset = RELEASED_YAMLS[name]
    path = tmp_path / name
    path.write_text(text)
    assert sf.config_from_ldm_yaml(_shapes_only_state(preset), path) == preset


def test_yaml_for_another_family_or_architecture_is_refused(tmp_path):
    path = tmp_path / "v2.yaml"
    path.write_text(_yaml("sd2"))
    with pytest.raises(ValueError, match=r"describes an SD 2.x .* but the checkpoint holds an SD 1.x"):
        sf.config_from_ldm_yaml(_shapes_only_state(configs.SD15), path)
    sdxl = tmp_path / "sdxl.yaml"
    sdxl.write_text(_yaml("sd1").replace("FrozenCLIPEmbedder", "GeneralConditioner"))
    with pytest.raises(ValueError, match="GeneralConditioner.*not supported; accepted"):
        sf.config_from_ldm_yaml(_shapes_only_state(configs.SD15), sdxl)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        sf.config_from_ldm_yaml(_shapes_only_state(configs.SD15), unsafe)
    with pytest.raises(ValueError, match="not an LDM model config"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("model:\n  params: {}\n")
        sf.config_from_ldm_yaml(_shapes_only_state(configs.SD15), bad)


@pytest.fixture(scope="module")
def two_head_model(tmp_path_factory):
    """(folder, single file without metadata, its yaml text): an SD 1.x-style tiny model with 2 U-Net heads
    per block, where the LDM v1 convention would assume 8 (the same shapes, different attention)."""
    root = tmp_path_factory.mktemp("two_heads")
    folder = root / "folder"
    reference.save_pipeline(
        folder,
        unet=dict(
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 64), attention_head_dim=2, norm_num_groups=32, cross_attention_dim=64,
        ),
        vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=32),
        text_encoder=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                          bos_token_id=0, eos_token_id=2, pad_token_id=1),
    )
    text = _yaml("sd1", model_channels=32, channel_mult="[ 1, 2, 2 ]", attention_resolutions="[ 2, 1 ]",
                 heads="        num_heads: 2", context_dim=64, vae_ch=32, vae_mult=(1, 1, 2, 2))
    return folder, _write_ldm(root / "model.safetensors", folder), text


def _native(config, like):
    """``config`` with the native sizes of ``like``, after checking its scheduler is SD 1.x's: a yaml carries
    the training schedule, not the folder's sampler conventions (timestep spacing ...)."""
    assert config.scheduler == configs.SD15.scheduler
    return config.replace(
        unet=dataclasses.replace(config.unet, sample_size=like.unet.sample_size),
        vae=dataclasses.replace(config.vae, sample_size=like.vae.sample_size),
        scheduler=like.scheduler,
    )


def test_yaml_beside_the_file_or_given_fixes_the_heads(two_head_model, tmp_path):
    folder, file, text = two_head_model
    expected_config, expected_params = weights.load_pretrained(folder, dtype=jnp.float32)
    # Without a hint: the v1 convention (8 heads) is assumed, and said so.
    with pytest.warns(UserWarning, match=r"guessed .*U-Net attention heads per block \(8, 8, 8\).*model\.yaml.*config="):
        guessed, _ = sf.load_single_file(file)
    assert guessed.unet.attention_head_dim == 8
    # Through config=path/to.yaml.
    given = tmp_path / "elsewhere.yaml"
    given.write_text(text)
    config, params = _load_quietly(file, config=given)
    assert _native(config, expected_config) == expected_config
    reference.assert_trees_equal(params, expected_params)
    # Beside the file, with the same stem, as A1111 reads it.
    beside_dir = tmp_path / "beside"
    beside_dir.mkdir()
    copy = beside_dir / "model.safetensors"
    copy.write_bytes(file.read_bytes())
    (beside_dir / "model.yaml").write_text(text)
    assert sf.yaml_beside(copy) == beside_dir / "model.yaml"
    config, params = _load_quietly(copy)
    assert _native(config, expected_config) == expected_config
    reference.assert_trees_equal(params, expected_params)
    # The yaml's parameterization, overridden by an explicit prediction type.
    (beside_dir / "model.yaml").write_text(text.replace("  params:\n", '  params:\n    parameterization: "v"\n', 1))
    assert _load_quietly(copy)[0].scheduler.prediction_type == "v_prediction"
    assert _load_quietly(copy, prediction_type="epsilon")[0].scheduler.prediction_type == "epsilon"


def test_released_architectures_load_without_the_warning(tmp_path):
    # Shapes of a released model: heads and groups are those of its original config, nothing is guessed.
    for preset in configs.PRESETS.values():
        assert sf._is_released_architecture(preset)
        assert sf._is_released_architecture(preset.replace(vae=dataclasses.replace(preset.vae, scaling_factor=1.0)))
    tiny = configs.SD15.replace(unet=dataclasses.replace(configs.SD15.unet, block_out_channels=(32, 64, 64, 64)))
    assert not sf._is_released_architecture(tiny)


def test_is_single_file(tmp_path):
    for name in ("a.safetensors", "b.ckpt", "c.pt", "d.pth", "e.bin", "F.SAFETENSORS"):
        (tmp_path / name).write_bytes(b"x")
        assert sf.is_single_file(tmp_path / name) and sf.is_single_file(str(tmp_path / name))
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "folder.safetensors").mkdir()
    for path in ("model.onnx", "folder.safetensors", "missing.safetensors"):
        assert not sf.is_single_file(tmp_path / path)
    assert not sf.is_single_file("org/model")
