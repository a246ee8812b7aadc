"""sdjax's ControlNet and the U-Net's residual inputs against diffusers, and ControlNet files in both layouts."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import TINY_UNET, nchw, nhwc, randomize_, rel_err, seeded
from safetensors.torch import load_file as torch_load_file

from sdjax.config import SD15, ControlNetConfig, UNetConfig
from sdjax.controlnet import (
    check_compatible,
    load_controlnet,
    save_controlnet,
    save_controlnet_single_file,
)
from sdjax.layouts.diffusers import WeightsMismatchError, torch_to_flax
from sdjax.layouts.files import read_safetensors, write_safetensors
from sdjax.models.controlnet import _per_image
from sdjax.models.unet import UNet2DConditionModel
from sdjax.weights import HubUnreachableError

TINY = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    cross_attention_dim=32,
    # 32 groups and 8 heads (768-d context) or 64-wide heads (1024-d): what single-file inference assumes
    norm_num_groups=32,
    attention_head_dim=8,
    # four levels, as released ControlNets have (diffusers' single-file converter assumes it)
    conditioning_embedding_out_channels=(4, 8, 8, 16),
)
CONFIGS = {
    "sd1": TINY,
    "sd2": {**TINY, "block_out_channels": (64, 128), "attention_head_dim": (1, 2), "cross_attention_dim": 1024,
            "use_linear_projection": True},
    "pooled_bgr": {**TINY, "global_pool_conditions": True, "controlnet_conditioning_channel_order": "bgr",
                   "norm_num_groups": 8, "attention_head_dim": (2, 4), "flip_sin_to_cos": False, "freq_shift": 1,
                   "only_cross_attention": True, "downsample_padding": 0, "upcast_attention": True},
}
INFERABLE = ("sd1", "sd2")
BATCH, SIDE = 2, 8


def _diffusers_controlnet(path, overrides, seed=3):
    from diffusers import ControlNetModel

    seeded(seed)
    model = randomize_(ControlNetModel(**overrides), seed)
    model.save_pretrained(path)
    return model


class Case:
    def __init__(self, path, overrides):
        self.path = path
        self.torch_model = _diffusers_controlnet(path, overrides)
        self.controlnet = load_controlnet(path, dtype=jnp.float32)
        cfg = self.controlnet.config
        rng = np.random.RandomState(0)
        self.sample = rng.randn(BATCH, SIDE, SIDE, cfg.in_channels).astype(np.float32)
        self.context = rng.randn(BATCH, 5, cfg.cross_attention_dim).astype(np.float32)
        self.cond = rng.rand(BATCH, SIDE * 8, SIDE * 8, cfg.conditioning_channels).astype(np.float32)
        self.timesteps = np.array([10.0, 731.0], np.float32)
        self.apply = jax.jit(self.controlnet.module.apply)

    def ours(self, scale, guess=(False, False), controlnet=None):
        """Always (B,) knobs, so each config compiles once (scalar knobs: ``test_scalar_knobs_broadcast``)."""
        params = (controlnet or self.controlnet).params
        down, mid = self.apply({"params": params}, self.sample, self.timesteps, self.context, self.cond,
                               jnp.asarray(scale, jnp.float32), jnp.asarray(guess))
        return [np.asarray(d) for d in down], np.asarray(mid)

    def reference(self, scale, guess=False):
        scale = torch.tensor(np.asarray(scale, np.float32)).reshape(-1, 1, 1, 1) if np.ndim(scale) else float(scale)
        with torch.no_grad():
            down, mid = self.torch_model(
                nchw(self.sample), torch.from_numpy(self.timesteps), torch.from_numpy(self.context),
                controlnet_cond=nchw(self.cond), conditioning_scale=scale, guess_mode=guess, return_dict=False,
            )
        return [nhwc(d) for d in down], nhwc(mid)


def _max_err(ours, ref) -> float:
    (down, mid), (ref_down, ref_mid) = ours, ref
    assert len(down) == len(ref_down)
    for a, b in zip(down, ref_down):
        assert a.shape == b.shape
    assert mid.shape == ref_mid.shape
    return max([rel_err(a, b) for a, b in zip(down, ref_down)] + [rel_err(mid, ref_mid)])


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Case(tmp_path_factory.mktemp(name), CONFIGS[name])
        return cache[name]

    return get


# --- (a) diffusers folders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_controlnet_matches_diffusers(cases, name):
    case = cases(name)
    per_image = np.array([0.5, 1.3], np.float32)
    errors = {
        "scale 0.7": _max_err(case.ours(np.full(BATCH, 0.7)), case.reference(0.7)),
        "per-image scales": _max_err(case.ours(per_image), case.reference(per_image)),
        "guess mode": _max_err(case.ours(np.full(BATCH, 0.8), np.array([True, True])), case.reference(0.8, True)),
    }
    print(f"controlnet {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) < 1e-4


def test_per_image_guess_mode(cases):
    case = cases("sd1")
    # image 0 in guess mode at scale 0.5, image 1 not, at 1.3: each image as diffusers computes it alone
    down, mid = case.ours(np.array([0.5, 1.3]), np.array([True, False]))
    for i, (scale, guess) in enumerate(((0.5, True), (1.3, False))):
        ref_down, ref_mid = case.reference(scale, guess)
        one = slice(i, i + 1)
        assert _max_err(([d[one] for d in down], mid[one]), ([d[one] for d in ref_down], ref_mid[one])) < 1e-4


def test_scalar_knobs_broadcast():
    np.testing.assert_array_equal(_per_image(0.7, 3, jnp.float32), _per_image(np.full(3, 0.7), 3, jnp.float32))
    assert _per_image(jnp.float32(2.0), 3, jnp.float32).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError, match=r"scalar or shaped \(3,\)"):
        _per_image(np.ones(2), 3, jnp.float32)


def test_global_pool_residuals_are_pooled(cases):
    down, mid = cases("pooled_bgr").ours(np.ones(BATCH))
    assert all(d.shape[1:3] == (1, 1) for d in down) and mid.shape[1:3] == (1, 1)


def test_save_controlnet_loads_in_diffusers(cases, tmp_path):
    from diffusers import ControlNetModel

    case = cases("pooled_bgr")
    save_controlnet(case.controlnet, tmp_path)
    back = ControlNetModel.from_pretrained(tmp_path).state_dict()
    expected = case.torch_model.state_dict()
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    assert ControlNetConfig.from_diffusers_config(tmp_path / "config.json") == case.controlnet.config


def test_bin_folder_loads_through_safe_unpickler(cases, tmp_path):
    case = cases("sd1")
    case.torch_model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    loaded = load_controlnet(tmp_path, dtype=jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, case.controlnet.params)


# --- (b) the U-Net's residual inputs ------------------------------------------------------------------------


def _unet_pair(path, overrides):
    from diffusers import UNet2DConditionModel as TorchUNet

    seeded(1)
    torch_model = randomize_(TorchUNet(**{**TINY_UNET, **overrides}), 1)
    torch_model.save_pretrained(path)
    config = UNetConfig.from_diffusers_config(path / "config.json")
    unet = UNet2DConditionModel(config)
    rng = np.random.RandomState(1)
    sample = rng.randn(BATCH, 16, 16, 4).astype(np.float32)
    context = rng.randn(BATCH, 5, 32).astype(np.float32)
    timesteps = np.array([3.0, 600.0], np.float32)
    shapes = jax.eval_shape(unet.init, jax.random.PRNGKey(0), sample, timesteps, context)["params"]
    params = torch_to_flax(torch_model.state_dict(), shapes)
    return torch_model, unet, params, (sample, timesteps, context)


def _torch_unet(torch_model, inputs, **residuals):
    sample, timesteps, context = inputs
    # lists are copied: diffusers pops the intrablock residuals off the list it is given
    as_torch = {k: (nchw(v) if not isinstance(v, list) else [nchw(r) for r in v]) for k, v in residuals.items()}
    with torch.no_grad():
        return nhwc(torch_model(nchw(sample), torch.from_numpy(timesteps), torch.from_numpy(context),
                                **as_torch).sample)


@pytest.fixture(scope="module")
def unet_pair(tmp_path_factory):
    return _unet_pair(tmp_path_factory.mktemp("unet"), {})


def _unet_run(unet):
    return jax.jit(lambda p, *a, **kw: unet.apply({"params": p}, *a, **kw))


def test_unet_controlnet_residuals_match_diffusers(unet_pair):
    torch_model, unet, params, inputs = unet_pair
    rng = np.random.RandomState(2)
    # conv_in, 2 resnets + downsampler at 16x16, 2 resnets at 8x8; mid at 8x8
    shapes = [(16, 32)] * 3 + [(8, 32)] + [(8, 64)] * 2
    residuals = dict(
        down_block_additional_residuals=[rng.randn(BATCH, s, s, c).astype(np.float32) for s, c in shapes],
        mid_block_additional_residual=rng.randn(BATCH, 8, 8, 64).astype(np.float32),
    )
    ours = _unet_run(unet)(params, *inputs, **residuals)
    err = rel_err(ours, _torch_unet(torch_model, inputs, **residuals))
    print(f"unet controlnet residuals rel err {err:.2e}")
    assert err < 1e-4
    assert rel_err(_torch_unet(torch_model, inputs), ours) > 1e-2  # the residuals did change the output


# One per down block (CrossAttnDownBlock2D: before its downsampler; DownBlock2D: after it, its last skip
# included, as diffusers' in-place add does), one more after the mid block.
INTRABLOCK = {
    ("CrossAttnDownBlock2D", "DownBlock2D"): ((16, 16, 32), (8, 8, 64), (8, 8, 64)),
    ("DownBlock2D", "CrossAttnDownBlock2D"): ((8, 8, 32), (8, 8, 64), (8, 8, 64)),
}


@pytest.mark.parametrize("blocks", list(INTRABLOCK))
def test_unet_intrablock_residuals_match_diffusers(unet_pair, tmp_path, blocks):
    if blocks == TINY_UNET["down_block_types"]:
        torch_model, unet, params, inputs = unet_pair
    else:
        ups = tuple({"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}[b] for b in blocks[::-1])
        torch_model, unet, params, inputs = _unet_pair(tmp_path, {"down_block_types": blocks, "up_block_types": ups})
    rng = np.random.RandomState(3)
    residuals = dict(down_intrablock_additional_residuals=[rng.randn(BATCH, *s).astype(np.float32)
                                                           for s in INTRABLOCK[blocks]])
    if blocks == TINY_UNET["down_block_types"]:
        # with pooled (shuffle) ControlNet residuals at once: (B, 1, 1, C) broadcast over height and width
        channels = (32, 32, 32, 32, 64, 64)
        residuals["down_block_additional_residuals"] = [rng.randn(BATCH, 1, 1, c).astype(np.float32) for c in channels]
        residuals["mid_block_additional_residual"] = rng.randn(BATCH, 1, 1, 64).astype(np.float32)
    ours = _unet_run(unet)(params, *inputs, **residuals)
    err = rel_err(ours, _torch_unet(torch_model, inputs, **residuals))
    print(f"unet intrablock residuals {blocks} rel err {err:.2e}")
    assert err < 1e-4


def test_unet_controlnet_residuals_come_in_pairs(unet_pair):
    _, unet, params, inputs = unet_pair
    with pytest.raises(ValueError, match="come in pairs"):
        unet.apply({"params": params}, *inputs, down_block_additional_residuals=[])
    with pytest.raises(ValueError, match="has 1 arrays; this U-Net has 6 skip connections"):
        jax.eval_shape(lambda: unet.apply({"params": params}, *inputs, down_block_additional_residuals=[inputs[0]],
                                          mid_block_additional_residual=inputs[0]))


# --- (c, d) original single files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", INFERABLE)
def test_single_file_round_trip_and_diffusers_converter(cases, name, tmp_path):
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    case = cases(name)
    path = tmp_path / "control_tiny.safetensors"
    save_controlnet_single_file(case.controlnet, path)
    original = torch_load_file(path)
    assert all(k.startswith("control_model.") for k in original)
    converted = convert_controlnet_checkpoint(original, dict(case.torch_model.config))
    expected = case.torch_model.state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)

    back = load_controlnet(path, dtype=jnp.float32)  # config from the file's metadata
    assert back.config == case.controlnet.config
    jax.tree.map(np.testing.assert_array_equal, back.params, case.controlnet.params)

    # (d) the same tensors as a torch.save pickle, without the prefix (as SD 2.x files ship): config inferred
    pth = tmp_path / "control_tiny.pth"
    torch.save({k[len("control_model."):]: v for k, v in original.items()}, pth)
    inferred = load_controlnet(pth, dtype=jnp.float32)
    assert inferred.config == case.controlnet.config
    err = _max_err(case.ours(np.full(BATCH, 0.7), controlnet=inferred), case.reference(0.7))
    print(f"controlnet {name} from an inferred .pth: rel err {err:.2e}")
    assert err < 1e-4


def test_whole_model_controlnet_file_ignores_the_bundled_base(cases, tmp_path):
    case = cases("sd1")
    path = tmp_path / "control_sd15_tiny.safetensors"
    save_controlnet_single_file(case.controlnet, path)
    state = dict(read_safetensors(path))
    state["model.diffusion_model.conv_in.weight"] = np.zeros((1,), np.float32)
    state["betas"] = np.zeros((1000,), np.float32)
    write_safetensors(tmp_path / "bundled.safetensors", state)
    loaded = load_controlnet(tmp_path / "bundled.safetensors", dtype=jnp.float32)
    assert loaded.config == case.controlnet.config


# --- (e) bad input ------------------------------------------------------------------------------------------


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_single_file_with_missing_or_extra_tensor_is_a_one_line_error(cases, tmp_path):
    case = cases("sd1")
    path = tmp_path / "control.safetensors"
    save_controlnet_single_file(case.controlnet, path)
    state = dict(read_safetensors(path))

    missing = {k: v for k, v in state.items() if k != "control_model.zero_convs.1.0.bias"}
    write_safetensors(tmp_path / "missing.safetensors", missing)
    with pytest.raises(WeightsMismatchError, match=r"1 missing tensor\(s\): controlnet_down_blocks\.1\.bias") as e:
        load_controlnet(tmp_path / "missing.safetensors", config=case.controlnet.config)
    _one_line(e)

    extra = {**state, "control_model.zero_convs.99.0.weight": np.zeros((1,), np.float32)}
    write_safetensors(tmp_path / "extra.safetensors", extra)
    with pytest.raises(ValueError, match=r"1 tensor\(s\) have no place .* zero_convs\.99\.0\.weight") as e:
        load_controlnet(tmp_path / "extra.safetensors", config=case.controlnet.config)
    _one_line(e)


def test_diffusers_folder_with_extra_tensor_is_a_one_line_error(cases, tmp_path):
    case = cases("sd1")
    save_controlnet(case.controlnet, tmp_path)
    state = dict(read_safetensors(tmp_path / "diffusion_pytorch_model.safetensors"))
    state["controlnet_down_blocks.42.weight"] = np.zeros((1,), np.float32)
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", state)
    unexpected = r"1 unexpected tensor\(s\): controlnet_down_blocks\.42\.weight"
    with pytest.raises(WeightsMismatchError, match=unexpected) as e:
        load_controlnet(tmp_path)
    _one_line(e)


def test_controlnet_for_another_base_is_refused():
    sd2 = ControlNetConfig(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
    refused = r"ControlNet built for cross_attention_dim 1024 \(SD 2\.x\) cannot drive this U-Net \(768, SD 1\.x\)"
    with pytest.raises(ValueError, match=refused) as e:
        check_compatible(sd2, SD15.unet)
    _one_line(e)
    check_compatible(ControlNetConfig(), SD15.unet)
    with pytest.raises(ValueError, match="block_out_channels"):
        check_compatible(dataclasses.replace(ControlNetConfig(), block_out_channels=(32, 64, 64, 64)), SD15.unet)


def test_unsupported_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"addition_embed_type='text_time' \(an SDXL ControlNet\)") as e:
        ControlNetConfig.from_diffusers_config({"addition_embed_type": "text_time"})
    _one_line(e)
    (tmp_path / "config.json").write_text(json.dumps({"class_embed_type": "projection"}))
    with pytest.raises(ValueError, match="class_embed_type='projection'.*supported values: \\[None\\]"):
        load_controlnet(tmp_path)
    with pytest.raises(ValueError, match="controlnet_conditioning_channel_order"):
        ControlNetConfig.from_diffusers_config({"controlnet_conditioning_channel_order": "gbr"})


def test_hub_id_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(HubUnreachableError, match="cannot be reached"):
        load_controlnet("someone/tiny-controlnet")


def test_bad_conditioning_image_shape(cases):
    case = cases("sd1")
    with pytest.raises(ValueError, match=r"controlnet_cond must be NHWC \(2, 64, 64, 3\)"):
        case.controlnet.residuals(case.sample, case.timesteps, case.context, case.cond[:, :32, :32])
