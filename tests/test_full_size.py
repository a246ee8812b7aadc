"""The full SD1.5 and SD2.1 (768, v) architectures, random weights made here, through sdjax's real loaders.

Every checkpoint tensor must land in a parameter (the loader is strict) and one small forward pass of each
component must match the PyTorch reference; the same weights as an A1111 single file have the released files'
key counts, give back the architecture exactly and load to the same parameters. Slow (GBs of weights), so
marked; CI still runs it.
"""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference
from reference import nchw, nhwc, rel_err
from sdjax import config as configs
from sdjax import single_file as sf
from sdjax import weights
from sdjax.layouts import files, ldm

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("full_size")]


@pytest.mark.parametrize("preset_name", ["sd15", "sd21-v"])
def test_full_size_loads_completely_and_matches_the_reference(preset_name, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = configs.PRESETS[preset_name]
    torch.manual_seed(0)
    rng = np.random.RandomState(0)
    builders = {
        "unet": lambda: UNet2DConditionModel(**preset.unet.to_diffusers_config()),
        "vae": lambda: AutoencoderKL(**preset.vae.to_diffusers_config()),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**preset.text_encoder.to_diffusers_config())),
    }
    latents = rng.randn(1, 8, 8, 4).astype(np.float32)
    context = rng.randn(1, 77, preset.unet.cross_attention_dim).astype(np.float32)
    ids = rng.randint(0, 49406, size=(1, 77)).astype(np.int32)
    expected = {}
    for name, build in builders.items():
        with torch.no_grad():
            model = build().eval()
            model.save_pretrained(tmp_path / name)
            if name == "unet":
                expected[name] = nhwc(model(nchw(latents), torch.tensor([321.0]), torch.from_numpy(context)).sample)
            elif name == "vae":
                expected[name] = nhwc(model.decode(nchw(latents)).sample)
            else:
                expected[name] = model(torch.from_numpy(ids).long()).last_hidden_state.numpy()
        del model
        gc.collect()
        # the files sdjax reads are the reference's own save_pretrained output
        state = weights.read_component(tmp_path / name)
        assert state, name

    from sdjax.models.clip import CLIPTextModel as FlaxCLIP
    from sdjax.models.unet import UNet2DConditionModel as FlaxUNet
    from sdjax.models.vae import AutoencoderKL as FlaxVAE

    states = {name: weights.read_component(tmp_path / name) for name in builders}
    params = weights.params_from_state_dicts(preset, states, jnp.float32, source=preset_name)
    for name in ("unet", "vae"):  # 100% coverage: every tensor became exactly one parameter element-wise
        assert sum(x.size for x in jax.tree.leaves(params[name])) == sum(v.size for v in states[name].values())
    del states
    gc.collect()

    ours = {
        "unet": FlaxUNet(preset.unet).apply({"params": params["unet"]}, latents, jnp.array([321.0]), context),
        "vae": FlaxVAE(preset.vae).apply({"params": params["vae"]}, latents, method="decode"),
        "text_encoder": FlaxCLIP(preset.text_encoder).apply({"params": params["text_encoder"]}, ids),
    }
    for name in builders:
        err = rel_err(ours[name], expected[name])
        print(f"{preset_name} {name}: rel err {err:.2e}")
        assert err < 1e-4, name
    del params, ours
    gc.collect()

    # The same weights as a single file, in fp16 as such files are shipped. The key counts of the released
    # checkpoints: U-Net 686, VAE 248, text encoder 196 (CLIP ViT-L) or 292 (OpenCLIP ViT-H, 24 layers, leaving
    # out text_projection and logit_scale).
    half = {name: {k: v.astype(np.float16) for k, v in weights.read_component(tmp_path / name).items()
                   if not k.endswith("position_ids")} for name in builders}
    ldm_state = ldm.diffusers_to_ldm(half, preset)
    counts = {p: sum(k.startswith(p) for k in ldm_state) for p in ("model.diffusion_model.", "first_stage_model.")}
    assert counts == {"model.diffusion_model.": 686, "first_stage_model.": 248}
    assert sum(k.startswith("cond_stage_model.") for k in ldm_state) == (196 if preset_name == "sd15" else 292)
    file = tmp_path / f"{preset_name}.safetensors"
    files.write_safetensors(file, ldm_state)
    del ldm_state
    gc.collect()
    assert sf.infer_model_config(sf.read_single_file(file)) == preset
    expected_params = weights.params_from_state_dicts(preset, half, jnp.float16)
    del half
    gc.collect()
    config, loaded = sf.load_single_file(file, dtype=jnp.float16)
    assert config == preset
    reference.assert_trees_equal(loaded, expected_params)
