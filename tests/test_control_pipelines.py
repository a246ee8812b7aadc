"""Controls in the pipelines against diffusers: StableDiffusionControlNet(/Img2Img/Inpaint)Pipeline, MultiControlNet
(two controls, their own scales and start/end), guess mode and StableDiffusionAdapterPipeline, on the same files and
the same random draws; recompilation and bad input.

The ControlNets are diffusers' ``ControlNetModel.from_unet`` of the tiny pipeline's U-Net with every weight then
randomised (a fresh one's zero convolutions would add nothing and no test could fail)."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import reference
from reference import decode_unit, nchw, rel_err
from sdjax import Control
from sdjax.controlnet import load_controlnet
from sdjax.data import render
from sdjax.generate import KeyStream
from sdjax.pipeline import StableDiffusion
from sdjax.t2i_adapter import load_t2i_adapter
from test_image_modes import draws_of, init_images, masks, run_diffusers

pytestmark = pytest.mark.xdist_group("control_pipelines")

STEPS = 6
SEED = 3
PROMPTS = ["a red circle on a blue background", "a green square"]
NOISE = np.random.RandomState(7).randn(2, 8, 8, 4).astype(np.float32)


@pytest.fixture(scope="module")
def sd_inpaint(tiny_inpaint_dir):
    return StableDiffusion.from_pretrained(tiny_inpaint_dir, dtype=jnp.float32)


def _save_controlnet(unet_dir, path, seed):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_dir, subfolder="unet")
    reference.seeded(seed)
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    reference.randomize_(model, seed)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def controlnet_dirs(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return [_save_controlnet(tiny_pipeline_dir, root / f"cn{seed}", seed) for seed in (11, 12)]


@pytest.fixture(scope="module")
def controlnets(controlnet_dirs):
    return [load_controlnet(path, dtype=jnp.float32) for path in controlnet_dirs]


def control_images(seed=0):
    """Edge-like maps: white outlines of shapes on black, one per prompt."""
    out = []
    for shape, centre in (("circle", (0.4, 0.5)), ("triangle", (0.55, 0.5))):
        pixels = render(shape, "white", "black", 0.6 + 0.05 * seed, centre)
        grey = pixels.mean(axis=-1) > 127
        edge = grey ^ np.roll(grey, 1, axis=0) | grey ^ np.roll(grey, 1, axis=1)
        out.append(Image.fromarray(np.repeat(edge[..., None] * 255, 3, axis=-1).astype(np.uint8)))
    return out


def torch_controlnet_pipeline(cls_name, path, controlnet_dirs):
    import diffusers

    nets = [diffusers.ControlNetModel.from_pretrained(p) for p in controlnet_dirs]
    controlnet = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    pipe = getattr(diffusers, cls_name).from_pretrained(path, controlnet=controlnet, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def torch_adapter_pipeline(path, adapter_dir):
    import diffusers

    adapter = diffusers.T2IAdapter.from_pretrained(adapter_dir)
    pipe = diffusers.StableDiffusionAdapterPipeline.from_pretrained(path, adapter=adapter, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- parity ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_text_to_image_matches_diffusers(sd, tiny_pipeline_dir, controlnet_dirs, controlnets, guess_mode):
    pipe = torch_controlnet_pipeline("StableDiffusionControlNetPipeline", tiny_pipeline_dir, controlnet_dirs[:1])
    call = dict(num_inference_steps=STEPS, guidance_scale=7.5, latents=nchw(NOISE), control_guidance_start=0.2,
                control_guidance_end=0.9, guess_mode=guess_mode, output_type="np")
    with torch.no_grad():
        expected = pipe(PROMPTS, control_images(), controlnet_conditioning_scale=0.8, **call).images
        uncontrolled = pipe(PROMPTS, control_images(), controlnet_conditioning_scale=0.0, **call).images
    control = Control(controlnets[0], control_images(), scale=0.8, start=0.2, end=0.9, guess_mode=guess_mode)
    latents = sd.text_to_image(PROMPTS, steps=STEPS, seed=SEED, scheduler="pndm", latents=NOISE, controls=[control],
                               output="latent")
    ours = decode_unit(sd, latents)
    err, without = rel_err(ours, expected), rel_err(ours, uncontrolled)
    print(f"ControlNet text-to-image guess_mode={guess_mode}: rel err {err:.2e} (to the uncontrolled image {without:.2e})")
    assert err < 1e-3 and without > 30 * err


def test_controls_on_the_guidance_free_path_match_diffusers(sd, tiny_pipeline_dir, controlnet_dirs, controlnets,
                                                            adapter_dir):
    """Guidance 1: diffusers runs no classifier-free guidance, sdjax takes its guidance-free path; a ControlNet
    (guess mode: its ramp, no halves) and an adapter together."""
    pipe = torch_controlnet_pipeline("StableDiffusionControlNetPipeline", tiny_pipeline_dir, controlnet_dirs[:1])
    with torch.no_grad():
        expected = pipe(PROMPTS, control_images(), num_inference_steps=STEPS, guidance_scale=1.0,
                        latents=nchw(NOISE), controlnet_conditioning_scale=0.9, guess_mode=True,
                        output_type="np").images
    control = Control(controlnets[0], control_images(), scale=0.9, guess_mode=True)
    latents = sd.text_to_image(PROMPTS, steps=STEPS, guidance_scale=1.0, seed=SEED, scheduler="pndm", latents=NOISE,
                               controls=[control], output="latent")
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"ControlNet without guidance: rel err {err:.2e}")
    assert err < 1e-3

    adapter_pipe = torch_adapter_pipeline(tiny_pipeline_dir, adapter_dir)
    with torch.no_grad():
        expected = adapter_pipe(PROMPTS, control_images(), num_inference_steps=STEPS, guidance_scale=1.0,
                                latents=nchw(NOISE), adapter_conditioning_scale=0.6, output_type="np").images
    control = Control(load_t2i_adapter(adapter_dir, dtype=jnp.float32), control_images(), scale=0.6)
    latents = sd.text_to_image(PROMPTS, steps=STEPS, guidance_scale=None, seed=SEED, scheduler="pndm", latents=NOISE,
                               controls=[control], output="latent")
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"T2I-Adapter without guidance: rel err {err:.2e}")
    assert err < 1e-3


def test_multi_controlnet_matches_diffusers(sd, tiny_pipeline_dir, controlnet_dirs, controlnets):
    pipe = torch_controlnet_pipeline("StableDiffusionControlNetPipeline", tiny_pipeline_dir, controlnet_dirs)
    with torch.no_grad():
        expected = pipe(PROMPTS, [control_images(), control_images(1)[::-1]], num_inference_steps=STEPS,
                        guidance_scale=6.0, latents=nchw(NOISE), controlnet_conditioning_scale=[1.2, 0.5],
                        control_guidance_start=[0.0, 0.3], control_guidance_end=[0.6, 1.0], output_type="np").images
    controls = [Control(controlnets[0], control_images(), scale=1.2, start=0.0, end=0.6),
                Control(controlnets[1], control_images(1)[::-1], scale=0.5, start=0.3, end=1.0)]
    latents = sd.text_to_image(PROMPTS, steps=STEPS, guidance_scale=6.0, seed=SEED, scheduler="pndm", latents=NOISE,
                               controls=controls, output="latent")
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"MultiControlNet: rel err {err:.2e}")
    assert err < 1e-3


def test_controlnet_image_to_image_matches_diffusers(sd, tiny_pipeline_dir, controlnet_dirs, controlnets, monkeypatch):
    pipe = torch_controlnet_pipeline("StableDiffusionControlNetImg2ImgPipeline", tiny_pipeline_dir,
                                     controlnet_dirs[:1])
    noise, posterior = draws_of(2, [KeyStream.IMAGE])
    expected = run_diffusers(pipe, monkeypatch, noise, posterior, steps=STEPS, prompt=PROMPTS, image=init_images(),
                             control_image=control_images(), strength=0.7, guidance_scale=7.5,
                             controlnet_conditioning_scale=0.9, control_guidance_end=0.8)
    control = Control(controlnets[0], control_images(), scale=0.9, end=0.8)
    latents = sd.image_to_image(PROMPTS, init_images(), 0.7, steps=STEPS, seed=SEED, scheduler="pndm", latents=noise,
                                controls=[control], output="latent")
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"ControlNet image-to-image: rel err {err:.2e}")
    assert err < 1e-3


@pytest.mark.parametrize("inpainting_unet", [False, True])
def test_controlnet_inpaint_matches_diffusers(sd, sd_inpaint, tiny_pipeline_dir, tiny_inpaint_dir, controlnet_dirs,
                                              controlnets, monkeypatch, inpainting_unet):
    model, path = (sd_inpaint, tiny_inpaint_dir) if inpainting_unet else (sd, tiny_pipeline_dir)
    pipe = torch_controlnet_pipeline("StableDiffusionControlNetInpaintPipeline", path, controlnet_dirs[:1])
    noise, posterior = draws_of(2, [KeyStream.IMAGE, KeyStream.MASKED_IMAGE])  # strength < 1: both encoded
    expected = run_diffusers(pipe, monkeypatch, noise, posterior, steps=STEPS, prompt=PROMPTS, image=init_images(),
                             mask_image=masks(), control_image=control_images(), strength=0.8, guidance_scale=7.5,
                             controlnet_conditioning_scale=1.1)
    control = Control(controlnets[0], control_images(), scale=1.1)
    latents = model.inpaint(PROMPTS, init_images(), masks(), strength=0.8, steps=STEPS, seed=SEED, scheduler="pndm",
                            latents=noise, controls=[control], output="latent")
    err = rel_err(decode_unit(model, latents), expected)
    print(f"ControlNet inpaint ({'9' if inpainting_unet else '4'}-channel U-Net): rel err {err:.2e}")
    assert err < 1e-3


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    from diffusers import T2IAdapter

    path = tmp_path_factory.mktemp("adapter")
    reference.seeded(5)
    adapter = T2IAdapter(in_channels=3, channels=(32, 64), num_res_blocks=1, downscale_factor=8,
                         adapter_type="full_adapter")
    reference.randomize_(adapter, 5)
    adapter.save_pretrained(path)
    return path


def test_t2i_adapter_text_to_image_matches_diffusers(sd, tiny_pipeline_dir, adapter_dir):
    pipe = torch_adapter_pipeline(tiny_pipeline_dir, adapter_dir)
    with torch.no_grad():
        expected = pipe(PROMPTS, control_images(), num_inference_steps=STEPS, guidance_scale=7.5,
                        latents=nchw(NOISE), adapter_conditioning_scale=0.7, output_type="np").images
    control = Control(load_t2i_adapter(adapter_dir, dtype=jnp.float32), control_images(), scale=0.7)
    latents = sd.text_to_image(PROMPTS, steps=STEPS, seed=SEED, scheduler="pndm", latents=NOISE, controls=[control],
                               output="latent")
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"T2I-Adapter text-to-image: rel err {err:.2e}")
    assert err < 1e-3


# --- compilation ------------------------------------------------------------------------------------------------


def test_new_control_images_scales_and_start_end_do_not_recompile(sd, controlnets):
    # the program of the parity test above (pndm, given latents), so nothing new compiles here but `plain`
    def run(images, scale, start, end):
        control = Control(controlnets[0], images, scale=scale, start=start, end=end)
        return sd.text_to_image(PROMPTS, steps=STEPS, seed=SEED, scheduler="pndm", latents=NOISE, controls=[control],
                                output="latent")

    first = run(control_images(), 1.0, 0.0, 1.0)
    compiles = sd.executor.compile_count()
    second = run(control_images(1), [0.3, 1.7], 0.25, 0.75)
    assert sd.executor.compile_count() == compiles
    assert not np.allclose(first, second)
    # A scale of 0 everywhere is the uncontrolled image (the residuals are multiplied by it).
    off = run(control_images(), 0.0, 0.0, 1.0)
    plain = sd.text_to_image(PROMPTS, steps=STEPS, seed=SEED, scheduler="pndm", latents=NOISE, output="latent")
    np.testing.assert_allclose(off, plain, atol=1e-5)


# --- bad input --------------------------------------------------------------------------------------------------


def test_control_image_of_another_size_is_resized_with_a_warning(sd, controlnets):
    small = [image.resize((48, 48)) for image in control_images()]
    with pytest.warns(UserWarning, match=r"controls\[0\] image size 48x48 resized to 64x64 \(the output size\)"):
        sd.text_to_image(PROMPTS, steps=STEPS, seed=SEED, height=64, width=64, scheduler="pndm", latents=NOISE,
                         controls=[Control(controlnets[0], small)], output="latent")


def test_text_to_image_takes_the_control_images_size(sd, controlnets):
    images = [image.resize((80, 72)) for image in control_images()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sd.text_to_image(PROMPTS, steps=2, seed=SEED, controls=[Control(controlnets[0], images)], output="latent")
    assert out.shape == (2, 9, 10, 4)


@pytest.mark.parametrize("change, message", [
    (dict(scale=float("nan")), r"controls\[0\]\.scale must be finite; got nan"),
    (dict(scale=float("inf")), r"controls\[0\]\.scale must be finite"),
    (dict(start=0.8, end=0.2), r"controls\[0\]: start \(0\.8\) must be below end \(0\.2\)"),
    (dict(end=1.5), r"controls\[0\]\.end is a fraction of the steps: accepted 0 to 1, got 1\.5"),
    (dict(scale=[1.0, 2.0, 3.0]), r"one value or one per output image \(2\); got 3 values"),
])
def test_bad_control_knobs(sd, controlnets, change, message):
    control = Control(**{"model": controlnets[0], "image": control_images(), **change})
    with pytest.raises(ValueError, match=message):
        sd.text_to_image(PROMPTS, steps=2, controls=[control], output="latent")


def test_controlnet_for_another_base_is_refused(sd, tmp_path):
    from diffusers import ControlNetModel

    ControlNetModel(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",
                    "DownBlock2D"), cross_attention_dim=1024, attention_head_dim=(2, 4), norm_num_groups=8,
                    conditioning_embedding_out_channels=(4, 8, 8, 16)).save_pretrained(tmp_path)
    other = load_controlnet(tmp_path, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"controls\[0\]: .*1024"):
        sd.text_to_image(PROMPTS, steps=2, controls=[Control(other, control_images())], output="latent")


def test_a_model_that_is_not_a_control_is_refused(sd):
    with pytest.raises(TypeError, match=r"controls\[0\]\.model must be a ControlNet .* or a T2IAdapter"):
        sd.text_to_image(PROMPTS, steps=2, controls=[Control("lllyasviel/sd-controlnet-canny", control_images())])
    with pytest.raises(TypeError, match=r"controls\[0\] must be an sdjax\.Control"):
        sd.text_to_image(PROMPTS, steps=2, controls=[control_images()[0]])
