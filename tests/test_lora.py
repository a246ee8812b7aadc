"""LoRA: files in every format against diffusers' PyTorch ``load_lora_weights``, fused vs unfused, scale changes
without recompiling, training and saving (round trip through diffusers), and bad input."""

import json
import re
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference
from reference import nchw, nhwc, rel_err
from sdjax import data, lora, lora_train
from sdjax.layouts.files import write_safetensors
from sdjax.layouts.ldm import unet_module_table
from sdjax.pipeline import StableDiffusion

pytest.importorskip("peft", reason="diffusers needs peft to load LoRA files")

RANK = 4
# Layers the random LoRA adapts: every kind sdjax maps (linear, 1x1 and 3x3 convs, a strided conv).
UNET_LAYERS = (
    r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)|.*ff\.net\.(0\.proj|2)|.*attentions\.\d+\.(proj_in|proj_out)"
    r"|.*resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|.*downsamplers\.0\.conv"
)
TEXT_LAYERS = r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)|.*mlp\.fc[12]"
# diffusers maps per-module kohya alphas of attention layers wrongly; uniform alphas are what trainers write.
KOHYA_ALPHA = 2.0 * RANK
PROMPTS = ["a purple star on a green background", "a red circle"]


@pytest.fixture
def sd(tiny_pipeline_dir):
    return StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype=jnp.float32)


@pytest.fixture(scope="module")
def inputs(tiny_pipeline_dir):
    rng = np.random.RandomState(0)
    sd = StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype=jnp.float32)
    return {
        "x": rng.randn(2, 8, 8, 4).astype(np.float32),
        "t": np.array([10, 500]),
        "context": rng.randn(2, 77, 32).astype(np.float32),
        "ids": sd.tokenize(PROMPTS),
    }


def torch_outputs(pipe, inputs):
    with torch.no_grad():
        unet = pipe.unet(nchw(inputs["x"]), torch.tensor(inputs["t"]), torch.from_numpy(inputs["context"])).sample
        text = pipe.text_encoder(torch.from_numpy(inputs["ids"].astype(np.int64)))[0]
    return nhwc(unet), text.numpy()


def sdjax_outputs(sd, params, inputs, adapters=()):
    unet_adapters = [(a.get("unet", {}), s) for a, s in adapters]
    text_adapters = [(a.get("text_encoder", {}), s) for a, s in adapters]
    with lora.unfused(unet_adapters):
        unet = sd.unet.apply({"params": params["unet"]}, inputs["x"], inputs["t"], inputs["context"])
    with lora.unfused(text_adapters):
        text = sd.text_encoder.apply({"params": params["text_encoder"]}, inputs["ids"])
    return np.asarray(unet), np.asarray(text)


def random_peft_lora(pipe, seed: int, std: float = 0.1) -> dict:
    """diffusers/PEFT-layout LoRA tensors for the torch pipeline's layers (text keys with ``text_model.``)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    parts = (("unet.", pipe.unet, UNET_LAYERS), ("text_encoder.text_model.", pipe.text_encoder, TEXT_LAYERS))
    for prefix, model, pattern in parts:
        for name, module in model.named_modules():
            name = name.removeprefix("text_model.")
            if not re.fullmatch(pattern, name):
                continue
            module = getattr(module, "base_layer", module)  # a layer PEFT already wrapped
            if isinstance(module, torch.nn.Linear):
                down = torch.randn(RANK, module.in_features, generator=gen)
                up = torch.randn(module.out_features, RANK, generator=gen)
            else:
                down = torch.randn(RANK, module.in_channels, *module.kernel_size, generator=gen)
                up = torch.randn(module.out_channels, RANK, 1, 1, generator=gen)
            out[f"{prefix}{name}.lora_A.weight"] = (std * down).numpy()
            out[f"{prefix}{name}.lora_B.weight"] = (std * up).numpy()
    return out


def modules_of(state: dict) -> dict[str, tuple]:
    """{"unet.<module>": (down, up)} of a PEFT-layout state dict."""
    return {k[: -len(".lora_A.weight")]: (v, state[k.replace("lora_A", "lora_B")]) for k, v in state.items()
            if k.endswith(".lora_A.weight")}


def as_kohya(state: dict, ldm_names: dict | None = None) -> dict:
    """The same LoRA named the kohya way: lora_unet_<module with _>, lora_te_<...>, with .alpha."""
    out = {}
    for module, (down, up) in modules_of(state).items():
        component, name = module.split(".", 1)
        if component == "unet":
            name = "lora_unet_" + (ldm_names or {}).get(name, name).replace(".", "_")
        else:
            name = "lora_te_" + name.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up * (RANK / KOHYA_ALPHA)  # same delta as the PEFT file
        out[f"{name}.alpha"] = np.asarray(KOHYA_ALPHA, np.float32)
    return out


def as_old_diffusers(state: dict, processors: bool) -> dict:
    """Pre-PEFT diffusers names: U-Net ``lora.down`` (or the attention processors' ``to_q_lora``),
    text encoder ``lora_linear_layer``."""
    out = {}
    for module, (down, up) in modules_of(state).items():
        match = re.fullmatch(r"(unet\..*attn[12])\.(to_q|to_k|to_v|to_out)(\.0)?", module)
        if processors and match:
            stem = f"{match[1]}.processor.{match[2]}_lora"
            names = (f"{stem}.down.weight", f"{stem}.up.weight")
        elif module.startswith("unet."):
            names = (f"{module}.lora.down.weight", f"{module}.lora.up.weight")
        else:
            names = (f"{module}.lora_linear_layer.down.weight", f"{module}.lora_linear_layer.up.weight")
        out[names[0]], out[names[1]] = down, up
    return out


def write_variant(tmp_path, name: str, state: dict, sd):
    """The file of one format variant of the PEFT-layout LoRA ``state``."""
    metadata = None
    if name == "kohya":
        state = as_kohya(state)
    elif name == "kohya_ldm":  # the original LDM U-Net's module names (input_blocks_1_1_...)
        keep = {k: v for k, v in state.items() if re.search(r"attn|proj_in|proj_out|conv1|conv2|text_encoder", k)}
        ldm = {diffusers: ldm for ldm, diffusers in unet_module_table(sd.config.unet).items()}
        state = as_kohya(keep, ldm)
    elif name in ("old", "old_processors"):
        state = as_old_diffusers(state, processors=name == "old_processors")
    elif name == "peft_metadata":  # alpha != rank, stated in the header diffusers writes
        metadata = {
            "lora_adapter_metadata": json.dumps({
                "unet.r": RANK, "unet.lora_alpha": 2 * RANK, "unet.alpha_pattern": {"attn1.to_q": 1},
                "unet.target_modules": [m.removeprefix("unet.") for m in modules_of(state) if m.startswith("unet.")],
                "text_encoder.r": RANK, "text_encoder.lora_alpha": RANK // 2,
                "text_encoder.target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
            })
        }
    path = tmp_path / f"{name}.safetensors"
    write_safetensors(path, state, metadata)
    return path


FORMATS = ("peft", "peft_metadata", "kohya", "kohya_ldm", "old", "old_processors")


@pytest.mark.parametrize("variant", FORMATS)
def test_lora_file_matches_diffusers(tmp_path, torch_pipe, sd, inputs, variant):
    path = write_variant(tmp_path, variant, random_peft_lora(torch_pipe, seed=1), sd)
    # diffusers renames LDM U-Net blocks only when it is given the U-Net config
    kwargs = {"unet_config": torch_pipe.unet.config} if variant == "kohya_ldm" else {}
    base = torch_outputs(torch_pipe, inputs)
    torch_pipe.load_lora_weights(str(path), adapter_name="x", **kwargs)
    try:
        for scale in (0.5, 1.0):
            torch_pipe.set_adapters(["x"], adapter_weights=[scale])
            expected = torch_outputs(torch_pipe, inputs)
            sd.unload_lora()
            name = sd.load_lora(path, scale=scale, strict=True)
            merged = sdjax_outputs(sd, sd.merged_params(), inputs)
            unfused = sdjax_outputs(sd, sd.params, inputs, [(sd.params["lora"][name], scale)])
            for part, index in (("unet", 0), ("text encoder", 1)):
                change = rel_err(expected[index], base[index])
                errors = rel_err(merged[index], expected[index]), rel_err(unfused[index], expected[index])
                print(f"{variant} scale {scale} {part}: LoRA changes the output by {change:.2f}, "
                      f"rel err fused {errors[0]:.1e} unfused {errors[1]:.1e}")
                assert change > 0.05, "the LoRA must change the output for this test to mean anything"
                assert max(errors) < 1e-4
    finally:
        torch_pipe.delete_adapters("x")


def test_fuse_matches_diffusers_fuse_and_unload_restores(tmp_path, torch_pipe, sd, inputs):
    path = write_variant(tmp_path, "kohya", random_peft_lora(torch_pipe, seed=2), sd)
    base = sdjax_outputs(sd, sd.params, inputs)
    torch_pipe.load_lora_weights(str(path), adapter_name="f")
    try:
        torch_pipe.fuse_lora(lora_scale=0.5, adapter_names=["f"])
        expected = torch_outputs(torch_pipe, inputs)
        torch_pipe.unfuse_lora()
    finally:
        torch_pipe.delete_adapters("f")
    sd.load_lora(path, scale=0.5)
    unfused = sdjax_outputs(sd, sd.params, inputs, [(sd.params["lora"]["kohya"], 0.5)])
    sd.fuse_lora()
    assert "lora" not in sd.params and sd.lora_adapters == {}
    fused = sdjax_outputs(sd, sd.params, inputs)
    for index in (0, 1):
        assert rel_err(fused[index], expected[index]) < 1e-4
        assert rel_err(fused[index], unfused[index]) < 1e-5
    sd.unload_lora()
    restored = sdjax_outputs(sd, sd.params, inputs)
    for index in (0, 1):
        np.testing.assert_array_equal(restored[index], base[index])


def test_several_adapters_with_their_own_scales(tmp_path, torch_pipe, sd, inputs):
    first = write_variant(tmp_path, "peft", random_peft_lora(torch_pipe, seed=3), sd)
    second = write_variant(tmp_path, "kohya", random_peft_lora(torch_pipe, seed=4), sd)
    torch_pipe.load_lora_weights(str(first), adapter_name="one")
    torch_pipe.load_lora_weights(str(second), adapter_name="two")
    try:
        torch_pipe.set_adapters(["one", "two"], adapter_weights=[0.7, -0.4])
        expected = torch_outputs(torch_pipe, inputs)
    finally:
        torch_pipe.delete_adapters(["one", "two"])
    sd.load_lora(first, scale=0.7, name="one")
    sd.load_lora(second, scale=-0.4, name="two")
    assert sd.lora_adapters == {"one": 0.7, "two": -0.4}
    ours = sdjax_outputs(sd, sd.merged_params(), inputs)
    for index in (0, 1):
        assert rel_err(ours[index], expected[index]) < 1e-4
    one = sd.params["lora"]["one"]
    sd.unload_lora("two")
    assert sd.lora_adapters == {"one": 0.7}
    ours = sdjax_outputs(sd, sd.merged_params(), inputs)
    only_one = sdjax_outputs(sd, sd.params, inputs, [(one, 0.7)])
    for index in (0, 1):
        assert rel_err(ours[index], only_one[index]) < 1e-5


def test_changing_the_scale_does_not_recompile(tmp_path, torch_pipe, sd):
    path = write_variant(tmp_path, "peft", random_peft_lora(torch_pipe, seed=5), sd)
    name = sd.load_lora(path, scale=0.0)
    kwargs = dict(steps=2, seed=0, scheduler="ddim", output="latent")
    without = sd.text_to_image(PROMPTS, **kwargs)
    compiled = sd.executor.compile_count()
    sd.set_lora_scale(name, 1.0)
    with_lora = sd.text_to_image(PROMPTS, **kwargs)
    sd.set_lora_scale(name, 0.5)
    sd.text_to_image(PROMPTS, **kwargs)
    assert sd.executor.compile_count() == compiled
    assert rel_err(with_lora, without) > 0.05
    # scale 0 is the base model
    sd.unload_lora()
    np.testing.assert_allclose(sd.text_to_image(PROMPTS, **kwargs), without, rtol=1e-5, atol=1e-5)
    # a generate call with the adapter fused gives what the unfused call gave
    sd.load_lora(path, scale=1.0)
    sd.fuse_lora()
    assert rel_err(sd.text_to_image(PROMPTS, **kwargs), with_lora) < 1e-5


def test_saved_files_reload_identically(tmp_path, torch_pipe, sd):
    path = write_variant(tmp_path, "kohya", random_peft_lora(torch_pipe, seed=6), sd)
    adapter = lora.load_lora_file(path, sd.config)
    for fmt in lora.FORMATS:
        out = lora.save_lora(tmp_path / f"saved_{fmt}.safetensors", adapter, fmt)
        again = lora.load_lora_file(out, sd.config, strict=True)
        assert set(again) == set(adapter)
        for component in adapter:
            assert set(again[component]) == set(adapter[component])
            for layer, module in adapter[component].items():
                np.testing.assert_allclose(
                    lora.lora_delta(again[component][layer]), lora.lora_delta(module), rtol=1e-6, atol=1e-7
                )


def test_merge_is_the_lora_formula():
    """W + scale * alpha / r * down @ up for a dense layer; a conv's delta composes down (kxk) with up (1x1)."""
    rng = np.random.RandomState(0)
    dense = {"down": rng.randn(6, 2), "up": rng.randn(2, 5), "alpha": np.float32(3.0)}
    conv = {"down": rng.randn(3, 3, 4, 2), "up": rng.randn(2, 7), "alpha": np.float32(1.0)}
    kernels = {"a": np.ones((6, 5), np.float32), "b": np.zeros((3, 3, 4, 7), np.float32)}
    params = {"unet": {name: {"kernel": kernel} for name, kernel in kernels.items()}}
    merged = lora.merge_lora(params, [({"unet": {"a": dense, "b": conv}}, 0.5)])
    np.testing.assert_allclose(merged["unet"]["a"]["kernel"], 1 + 0.5 * 1.5 * dense["down"] @ dense["up"], rtol=1e-5)
    expected = 0.5 * 0.5 * np.einsum("hwir,ro->hwio", conv["down"], conv["up"])
    np.testing.assert_allclose(merged["unet"]["b"]["kernel"], expected, rtol=1e-5, atol=1e-6)


# --- training, and the round trip through diffusers ------------------------------------------------------------


def shapes_folder(path, count: int = 8, size: int = 64):
    images, captions, _ = data.make_dataset(count, seed=0, image_size=size, colours=("purple",))
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray(image).save(path / f"{i:03d}.png")
        (path / f"{i:03d}.txt").write_text(caption)
    return path


def test_trained_lora_round_trips_through_diffusers(tmp_path, tiny_pipeline_dir, torch_pipe, sd, inputs):
    folder = shapes_folder(tmp_path / "images")
    paths, captions = data.load_image_folder(folder)
    images = data.load_images(paths, 64)
    config = lora_train.LoRATrainConfig(
        rank=4, alpha=8.0, targets=("attention", "conv"), text_encoder_targets=("attention",),
        learning_rate=1e-2, steps=4, batch_size=2, accumulate_steps=2, checkpoint_every=2, log_every=1,
    )
    out = tmp_path / "run"
    adapter = lora_train.train_lora(sd, images, captions, config, out, progress=False)
    assert (out / lora_train.PEFT_FILE).is_file() and (out / lora_train.KOHYA_FILE).is_file()
    assert len((out / "loss.jsonl").read_text().splitlines()) == config.steps
    ups = [np.abs(m["up"]).max() for modules in adapter.values() for m in modules.values()]
    assert min(ups) > 0, "every adapted layer must have been trained away from its zero init"

    base_torch = torch_outputs(torch_pipe, inputs)
    base_ours = sdjax_outputs(sd, sd.params, inputs)
    for file in (out / lora_train.PEFT_FILE, out / lora_train.KOHYA_FILE):
        torch_pipe.load_lora_weights(str(file), adapter_name="trained")
        try:
            torch_pipe.set_adapters(["trained"], adapter_weights=[1.0])
            theirs = torch_outputs(torch_pipe, inputs)
        finally:
            torch_pipe.delete_adapters("trained")
        ours = sdjax_outputs(sd, sd.params, inputs, [(adapter, 1.0)])
        for index in (0, 1):
            change_theirs, change_ours = theirs[index] - base_torch[index], ours[index] - base_ours[index]
            assert rel_err(change_ours, base_ours[index]) > 1e-3, "training must change the output"
            assert rel_err(change_ours, change_theirs) < 1e-3, file.name


def test_training_resumes_from_its_checkpoint(tmp_path, sd):
    images, captions, _ = data.make_dataset(4, seed=1, image_size=64)
    config = lora_train.LoRATrainConfig(rank=2, learning_rate=1e-2, steps=4, batch_size=2, checkpoint_every=2,
                                        cache_latents=True)
    straight = lora_train.train_lora(sd, images, captions, config, tmp_path / "a", progress=False)
    half = lora_train.train_lora(sd, images, captions, replace(config, steps=2), tmp_path / "b", progress=False)
    resumed = lora_train.train_lora(sd, images, captions, config, tmp_path / "b", progress=False)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(half), jax.tree.leaves(resumed)))
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="other settings"):
        lora_train.train_lora(sd, images, captions, replace(config, rank=3), tmp_path / "b", progress=False)


# --- bad input ------------------------------------------------------------------------------------------------


def test_lora_for_another_architecture_names_the_first_mismatching_key(tmp_path, sd):
    from diffusers import UNet2DConditionModel

    class Wider:  # a LoRA made for a U-Net with other widths but the same layer names
        unet = UNet2DConditionModel(**{**reference.TINY_UNET, "block_out_channels": (48, 64)})
        text_encoder = torch.nn.Module()

    state = random_peft_lora(Wider, seed=7)
    path = tmp_path / "wider.safetensors"
    write_safetensors(path, state)
    first = sorted(k for k in state if "down_blocks.0" in k)[0]
    with pytest.raises(lora.LoRAError, match=re.escape(first)) as error:
        sd.load_lora(path)
    assert "different architecture" in str(error.value)
    with pytest.raises(lora.LoRAError, match="adapts no layer"):
        write_safetensors(tmp_path / "sdxl.safetensors", {"lora_unet_label_emb_0_0.lora_down.weight": np.zeros((4, 8))})
        sd.load_lora(tmp_path / "sdxl.safetensors")
    assert "lora" not in sd.params


def test_unknown_keys_are_reported(tmp_path, torch_pipe, sd):
    state = random_peft_lora(torch_pipe, seed=8)
    state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"] = np.ones(32)
    state["lora_unet_something_else.hada_w1_a"] = np.ones((4, 4))
    path = tmp_path / "extra.safetensors"
    write_safetensors(path, state)
    with pytest.warns(UserWarning, match="2 tensor.*hada_w1_a.*lora_magnitude_vector"):
        sd.load_lora(path)
    with pytest.raises(lora.LoRAError, match="lora_magnitude_vector"):
        sd.load_lora(path, strict=True)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.load_image_folder(tmp_path / "empty")
    folder = shapes_folder(tmp_path / "10_purple shape", count=3)
    (folder / "001.txt").unlink()
    with pytest.raises(ValueError, match="1 of 3 images .* no caption .*001.png"):
        data.load_image_folder(folder)
    paths, captions = data.load_image_folder(folder, caption_from_folder_name=True)
    assert captions[1] == "purple shape" and captions[0].startswith("a purple")
    (folder / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": p.name, "text": f"caption {i}"}) for i, p in enumerate(paths))
    )
    assert data.load_image_folder(folder)[1] == ["caption 0", "caption 1", "caption 2"]
    images = data.load_images(paths, 32)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8


def test_cli_train_lora(tmp_path, tiny_pipeline_dir):
    from sdjax.cli import main

    folder = shapes_folder(tmp_path / "images", count=2)
    out = tmp_path / "out"
    code = main(["train-lora", "--data", str(folder), "--out", str(out), "--model", str(tiny_pipeline_dir), "--steps", "2",
                 "--rank", "2", "--no-progress", "--sample-every", "2", "--sample-prompt", "a purple circle",
                 "--sample-steps", "2", "--base-dtype", "float32"])
    assert code == 0
    assert (out / lora_train.PEFT_FILE).is_file() and (out / lora_train.KOHYA_FILE).is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000002_0.png"]
    image = tmp_path / "generated.png"
    assert main(["generate", "a purple circle", "--model", str(tiny_pipeline_dir), "--steps", "2", "--no-progress",
                 "--lora", str(out / lora_train.KOHYA_FILE), "--lora-scale", "0.5", "--out", str(image)]) == 0
    assert image.is_file()
    assert main(["train-lora", "--data", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_training_keeps_a_bf16_base_frozen_and_the_adapter_fp32(tiny_pipeline_dir):
    """(with pmap; the other training tests use the default mesh)"""
    sd = StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype=jnp.bfloat16)
    before = jax.tree.map(np.asarray, {k: sd.params[k] for k in ("unet", "text_encoder")})
    images, captions, _ = data.make_dataset(2, seed=2, image_size=64)
    config = lora_train.LoRATrainConfig(rank=2, learning_rate=1e-2, steps=2, batch_size=2, parallel="pmap",
                                        text_encoder_targets=("attention",))
    adapter = lora_train.train_lora(sd, images, captions, config, progress=False)
    leaves = jax.tree.leaves(adapter)
    assert all(leaf.dtype == np.float32 and np.all(np.isfinite(leaf)) for leaf in leaves)
    assert any(np.abs(m["up"]).max() > 0 for m in adapter["unet"].values())
    after = jax.tree.map(np.asarray, {k: sd.params[k] for k in ("unet", "text_encoder")})
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        assert a.dtype == jnp.bfloat16 and np.array_equal(a, b)


def test_training_is_data_parallel_over_devices(tiny_pipeline_dir):
    """2 simulated CPU devices (a subprocess: the device count is fixed when jax starts)."""
    reference.run_on_simulated_devices("multidevice_lora_train.py", tiny_pipeline_dir, devices=2, marker="MULTIDEVICE LORA OK")
