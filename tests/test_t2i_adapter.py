"""sdjax's T2I-Adapters against diffusers' T2IAdapter / MultiAdapter with the same random weights, and the
loaders: diffusers folders, original TencentARC files, the hub cache, saving, and the errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from huggingface_hub import constants
from reference import rel_err
from safetensors.numpy import load_file, save_file

from sdjax import weights
from sdjax.config import T2IAdapterConfig
from sdjax.models.t2i_adapter import feature_shapes, pixel_unshuffle, scale_features
from sdjax.t2i_adapter import load_t2i_adapter, multi_adapter_features, save_t2i_adapter

TOLERANCE = 1e-4
CASES = {
    "full_rgb": dict(adapter_type="full_adapter", in_channels=3, channels=[8, 16, 32, 32], num_res_blocks=2),
    "full_gray": dict(adapter_type="full_adapter", in_channels=1, channels=[8, 16, 32, 32], num_res_blocks=3),
    "light_rgb": dict(adapter_type="light_adapter", in_channels=3, channels=[8, 16, 32], num_res_blocks=2),
    "light_gray": dict(adapter_type="light_adapter", in_channels=1, channels=[8, 16, 32], num_res_blocks=3),
    "xl_rgb": dict(adapter_type="full_adapter_xl", in_channels=3, channels=[8, 16, 32, 32], downscale_factor=16),
    "xl_gray": dict(adapter_type="full_adapter_xl", in_channels=1, channels=[8, 16, 32, 32], downscale_factor=16),
}


class Reference:
    """A saved random diffusers T2IAdapter, a control image its size allows, and diffusers' features (NHWC)."""

    def __init__(self, folder, overrides, seed):
        from diffusers import T2IAdapter

        torch.manual_seed(seed)
        self.folder = folder
        self.model = T2IAdapter(**overrides).eval()
        self.model.save_pretrained(folder)
        side = self.model.total_downscale_factor
        rng = np.random.RandomState(seed)
        self.image = rng.rand(2, 2 * side, 3 * side, overrides["in_channels"]).astype(np.float32)
        self.expected = self.run_torch(self.image)

    def run_torch(self, image):
        with torch.no_grad():
            features = self.model(torch.from_numpy(image).permute(0, 3, 1, 2))
        return [f.permute(0, 2, 3, 1).numpy() for f in features]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Reference(tmp_path_factory.mktemp(name), CASES[name], seed=len(cache))
        return cache[name]

    return get


def _assert_features_match(ours, expected):
    assert len(ours) == len(expected)
    for level, (a, b) in enumerate(zip(ours, expected)):
        assert a.shape == b.shape, level
        assert rel_err(a, b) <= TOLERANCE, (level, rel_err(a, b))


# --- (a) the model against diffusers ----------------------------------------------------------------------


def test_pixel_unshuffle_matches_torch():
    x = np.random.RandomState(0).rand(2, 8, 12, 3).astype(np.float32)
    expected = torch.nn.PixelUnshuffle(4)(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.asarray(pixel_unshuffle(jnp.asarray(x), 4)), expected)


@pytest.mark.parametrize("name", list(CASES))
def test_features_match_diffusers(references, name):
    ref = references(name)
    adapter = load_t2i_adapter(ref.folder, dtype=jnp.float32)
    assert adapter.total_downscale_factor == ref.model.total_downscale_factor
    ours = adapter.features(ref.image)
    _assert_features_match(ours, ref.expected)
    assert [f.shape for f in ours] == feature_shapes(adapter.config, *ref.image.shape[:3])


def test_bf16_features_are_close(references):
    ref = references("light_rgb")
    adapter = load_t2i_adapter(ref.folder, dtype=jnp.bfloat16)
    assert jax.tree.leaves(adapter.params)[0].dtype == jnp.bfloat16
    ours = adapter.features(ref.image)
    assert all(f.dtype == jnp.bfloat16 for f in ours)
    assert max(rel_err(np.asarray(a, np.float32), b) for a, b in zip(ours, ref.expected)) < 3e-2


def test_multi_adapter_matches_diffusers(references):
    from diffusers import MultiAdapter

    first, second = references("full_rgb"), references("full_gray")
    multi = MultiAdapter([first.model, second.model])
    adapters = [load_t2i_adapter(r.folder, dtype=jnp.float32) for r in (first, second)]
    images = [first.image, second.image]
    for adapter_weights in ([0.3, 0.7], None):
        with torch.no_grad():
            expected = multi([torch.from_numpy(i).permute(0, 3, 1, 2) for i in images], adapter_weights)
        ours = multi_adapter_features(adapters, images, adapter_weights)
        _assert_features_match(ours, [f.permute(0, 2, 3, 1).numpy() for f in expected])


def test_conditioning_scale_is_traced_scalar_or_per_image(references):
    ref = references("full_rgb")
    features = [jnp.asarray(f) for f in ref.expected]
    scaled = jax.jit(scale_features)(features, jnp.float32(0.5))
    per_image = jax.jit(scale_features)(features, jnp.array([0.5, 2.0]))
    for f, s, p in zip(ref.expected, scaled, per_image):
        np.testing.assert_allclose(np.asarray(s), 0.5 * f, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(p), f * np.array([0.5, 2.0])[:, None, None, None], rtol=1e-6)


# --- (b) saving -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["full_rgb", "light_gray", "xl_rgb"])
def test_saved_adapter_loads_in_diffusers(references, tmp_path, name):
    from diffusers import T2IAdapter

    ref = references(name)
    save_t2i_adapter(load_t2i_adapter(ref.folder, dtype=jnp.float32), tmp_path)
    reloaded = T2IAdapter.from_pretrained(tmp_path)
    assert {k: v for k, v in reloaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in ref.model.config.items() if not k.startswith("_")
    }
    expected = ref.model.state_dict()
    state = reloaded.state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        assert torch.equal(state[key], expected[key]), key


# --- (c) original TencentARC files ------------------------------------------------------------------------


def original_state_dict(model) -> dict:
    """The state dict TencentARC's ``Adapter`` / ``Adapter_XL`` / ``Adapter_light`` would hold, written from
    their module trees: the full ones have one flat ``body`` list of ResnetBlocks (``body[i * nums_rb + j]``,
    the first of a level carrying ``in_conv`` when the width changes), the light one ``body[i]`` extractors
    with their own ``body[j]`` blocks."""
    config = model.config
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    out = {}

    def move(original, diffusers):
        for leaf in ("weight", "bias"):
            out[f"{original}.{leaf}"] = state.pop(f"adapter.{diffusers}.{leaf}")

    levels = len(config.channels) + (1 if config.adapter_type == "light_adapter" else 0)
    for i in range(levels):
        if config.adapter_type == "light_adapter":
            move(f"body.{i}.in_conv", f"body.{i}.in_conv")
            for j in range(config.num_res_blocks):
                for conv in ("block1", "block2"):
                    move(f"body.{i}.body.{j}.{conv}", f"body.{i}.resnets.{j}.{conv}")
            move(f"body.{i}.out_conv", f"body.{i}.out_conv")
            continue
        first = i * config.num_res_blocks
        if f"adapter.body.{i}.in_conv.weight" in state:
            move(f"body.{first}.in_conv", f"body.{i}.in_conv")
        for j in range(config.num_res_blocks):
            for conv in ("block1", "block2"):
                move(f"body.{first + j}.{conv}", f"body.{i}.resnets.{j}.{conv}")
    if config.adapter_type != "light_adapter":
        move("conv_in", "conv_in")
    assert not state, sorted(state)
    return out


@pytest.mark.parametrize("name", ["full_rgb", "full_gray", "light_rgb", "xl_gray"])
def test_original_single_files_load(references, tmp_path, name):
    ref = references(name)
    original = original_state_dict(ref.model)
    save_file(original, tmp_path / "t2iadapter_test.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in original.items()}, tmp_path / "t2iadapter_test.pth")
    expected_config = T2IAdapterConfig.from_diffusers_config(dict(ref.model.config))
    from_folder = load_t2i_adapter(ref.folder, dtype=jnp.float32).features(ref.image)
    for file in ("t2iadapter_test.safetensors", "t2iadapter_test.pth"):
        adapter = load_t2i_adapter(tmp_path / file, dtype=jnp.float32)
        assert adapter.config == expected_config
        for ours, folder in zip(adapter.features(ref.image), from_folder):
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(folder))


def test_original_file_with_skip_convs_is_refused(references, tmp_path):
    original = original_state_dict(references("full_rgb").model)
    original["body.2.skep.weight"] = np.zeros((16, 8, 1, 1), np.float32)
    save_file(original, tmp_path / "sk_false.safetensors")
    with pytest.raises(ValueError, match=r"skip convolutions .*body\.2\.skep\.weight") as info:
        load_t2i_adapter(tmp_path / "sk_false.safetensors")
    assert "\n" not in str(info.value)


# --- (d) errors and the hub cache -------------------------------------------------------------------------


def _edited_copy(ref, tmp_path, edit):
    folder = tmp_path / "edited"
    shutil.copytree(ref.folder, folder)
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    edit(state)
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    return folder


def test_missing_and_extra_tensors_are_named(references, tmp_path):
    ref = references("full_rgb")
    missing = _edited_copy(ref, tmp_path / "a", lambda s: s.pop("adapter.body.1.resnets.1.block2.bias"))
    with pytest.raises(ValueError, match=r"1 missing tensor\(s\): adapter\.body\.1\.resnets\.1\.block2\.bias") as info:
        load_t2i_adapter(missing)
    assert "\n" not in str(info.value)
    bogus = {"adapter.body.0.extra.weight": np.zeros(3, np.float32)}
    extra = _edited_copy(ref, tmp_path / "b", lambda s: s.update(bogus))
    with pytest.raises(ValueError, match=r"1 unexpected tensor\(s\): adapter\.body\.0\.extra\.weight") as info:
        load_t2i_adapter(extra)
    assert "\n" not in str(info.value)


def test_unknown_adapter_type_is_refused(references, tmp_path):
    folder = _edited_copy(references("full_rgb"), tmp_path, lambda s: None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "adapter_type": "medium_adapter"}))
    accepted = (r"adapter_type='medium_adapter'.*"
                r"supported values: \['full_adapter', 'full_adapter_xl', 'light_adapter'\]")
    with pytest.raises(ValueError, match=accepted) as info:
        load_t2i_adapter(folder)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=accepted):
        T2IAdapterConfig(adapter_type="medium_adapter")


@pytest.mark.parametrize("name, shape, message", [
    ("full_rgb", (1, 64, 96, 3), r"image size 64x96 is not a multiple of 64 .*e\.g\. to 64x64"),
    ("light_gray", (1, 128, 72, 1), r"image size 128x72 is not a multiple of 64"),
    ("xl_rgb", (1, 48, 32, 3), r"image size 48x32 is not a multiple of 32"),
    ("full_rgb", (1, 64, 64, 1), r"must be NHWC \(batch, height, width, 3\); got shape \(1, 64, 64, 1\)"),
])
def test_bad_images_are_refused(references, name, shape, message):
    adapter = load_t2i_adapter(references(name).folder, dtype=jnp.float32)
    with pytest.raises(ValueError, match=message) as info:
        adapter.features(np.zeros(shape, np.float32))
    assert "\n" not in str(info.value)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf_home" / "hub"


def test_hub_repo_offline(references, offline_hub):
    with pytest.raises(weights.HubUnreachableError, match="'someorg/someadapter'.*HF_HUB_OFFLINE=1 is set") as info:
        load_t2i_adapter("someorg/someadapter")
    assert "\n" not in str(info.value)
    snapshot_id = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--org--adapter"
    shutil.copytree(references("light_rgb").folder, repo / "snapshots" / snapshot_id)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot_id)
    adapter = load_t2i_adapter("org/adapter", dtype=jnp.float32)
    assert adapter.config.adapter_type == "light_adapter"
