"""Loading diffusers-layout folders: file formats, strict key checks, clear errors, and the round trip."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference
from sdjax import weights
from sdjax.layouts import files
from sdjax.pipeline import StableDiffusion


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd")
    reference.save_pipeline(path)
    return path


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_dir, target)
    return target


def test_loads_every_component_with_full_coverage(tiny_dir):
    sd = StableDiffusion.from_pretrained(tiny_dir, dtype=jnp.float32)
    assert set(sd.params) == {"text_encoder", "unet", "vae"}
    for component in ("unet", "vae"):
        state = weights.read_component(tiny_dir / component)
        count = sum(np.asarray(x).size for x in __import__("jax").tree.leaves(sd.params[component]))
        assert count == sum(v.size for v in state.values())


def test_round_trip_into_pytorch_diffusers_is_bit_identical(tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusion.from_pretrained(tiny_dir, dtype=jnp.float32)
    sd.save_pretrained(tmp_path / "saved")
    original = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        a = getattr(original, name).state_dict()
        b = getattr(reloaded, name).state_dict()
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
    assert reloaded.tokenizer("a red circle").input_ids == original.tokenizer("a red circle").input_ids


def test_bf16_loading_casts_parameters(tiny_dir):
    sd = StableDiffusion.from_pretrained(tiny_dir, dtype=jnp.bfloat16)
    leaves = __import__("jax").tree.leaves(sd.params)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    assert sd.unet.dtype == jnp.bfloat16


def test_fp16_variant_and_sharded_files(tiny_copy):
    state = files.read_safetensors(tiny_copy / "unet" / "diffusion_pytorch_model.safetensors")
    (tiny_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"part-00001-of-00002.safetensors": keys[:half], "part-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        files.write_safetensors(tiny_copy / "unet" / name, {k: state[k] for k in shard_keys})
        weight_map.update({k: name for k in shard_keys})
    (tiny_copy / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    vae_state = files.read_safetensors(tiny_copy / "vae" / "diffusion_pytorch_model.safetensors")
    files.write_safetensors(
        tiny_copy / "vae" / "diffusion_pytorch_model.fp16.safetensors",
        {k: v.astype(np.float16) for k, v in vae_state.items()},
    )
    sharded = StableDiffusion.from_pretrained(tiny_copy, dtype=jnp.float32)
    np.testing.assert_array_equal(
        sharded.params["unet"]["conv_in"]["kernel"], state["conv_in.weight"].transpose(2, 3, 1, 0)
    )
    found = weights.find_weights(tiny_copy / "vae", variant="fp16")
    assert found[0].name == "diffusion_pytorch_model.fp16.safetensors"
    half_vae = weights.read_component(tiny_copy / "vae", variant="fp16")
    assert half_vae["decoder.conv_out.weight"].dtype == np.float16


def test_bin_files_load_only_through_weights_only_torch_load(tiny_copy):
    file = tiny_copy / "vae" / "diffusion_pytorch_model.safetensors"
    state = files.read_safetensors(file)
    file.unlink()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, tiny_copy / "vae" / "diffusion_pytorch_model.bin")
    loaded = weights.read_component(tiny_copy / "vae")
    assert loaded.keys() == state.keys()


def test_missing_subfolder_is_named(tiny_copy):
    shutil.rmtree(tiny_copy / "vae")
    with pytest.raises(FileNotFoundError, match=r"missing subfolder\(s\) vae/"):
        StableDiffusion.from_pretrained(tiny_copy)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        StableDiffusion.from_pretrained(tmp_path / "nope" / "deeper")


def test_truncated_safetensors_is_reported(tiny_copy):
    file = tiny_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.CheckpointError, match="truncated"):
        StableDiffusion.from_pretrained(tiny_copy)


def test_corrupt_header_is_reported(tiny_copy):
    file = tiny_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:16] = b"\xff" * 8
    file.write_bytes(bytes(data))
    with pytest.raises(weights.CheckpointError, match="corrupt"):
        StableDiffusion.from_pretrained(tiny_copy)


def test_extra_and_missing_keys_are_listed(tiny_copy):
    file = tiny_copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = dict(files.read_safetensors(file))
    del state["conv_in.bias"]
    state["conv_in.extra_thing"] = np.zeros(3, np.float32)
    files.write_safetensors(file, state)
    with pytest.raises(weights.WeightsMismatchError) as info:
        StableDiffusion.from_pretrained(tiny_copy)
    message = str(info.value)
    assert "1 missing tensor(s): conv_in.bias" in message
    assert "1 unexpected tensor(s): conv_in.extra_thing" in message


def test_wrong_shape_is_listed(tiny_copy):
    file = tiny_copy / "vae" / "diffusion_pytorch_model.safetensors"
    state = dict(files.read_safetensors(file))
    state["quant_conv.bias"] = np.zeros(5, np.float32)
    files.write_safetensors(file, state)
    with pytest.raises(weights.WeightsMismatchError, match=r"quant_conv.bias: checkpoint \(5,\) vs model \(8,\)"):
        StableDiffusion.from_pretrained(tiny_copy)


def test_unsupported_config_value_is_named(tiny_copy):
    config_file = tiny_copy / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["class_embed_type"] = "timestep"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        StableDiffusion.from_pretrained(tiny_copy)


def test_safetensors_writer_round_trips_bf16(tmp_path):
    import ml_dtypes

    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16), "b": np.ones(2, np.int64)}
    files.write_safetensors(tmp_path / "x.safetensors", tensors)
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded["a"].dtype == torch.bfloat16 and loaded["a"].float().tolist() == [[0, 1, 2], [3, 4, 5]]
    back = files.read_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(back["a"], tensors["a"])
