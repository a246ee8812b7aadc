"""Image-to-image, inpainting (9-channel and blended 4-channel) and depth-to-image against diffusers'
PyTorch pipelines on the same files and the same random draws, plus recompilation, batching and
input checks.

diffusers draws the noise added to the image (``randn_tensor``) and the VAE posterior samples
(``retrieve_latents`` -> ``latent_dist.sample``) from torch generators. The tests compute sdjax's
own draws for the request (the initial noise is passed as ``latents``; ``image_normals`` gives the
posterior draws of each key stream) and inject exactly those into diffusers by patching its two
functions, so both sides sample the same posterior and add the same noise.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import reference
from reference import decode_unit, nchw, rel_err
from sdjax import images as image_inputs
from sdjax.data import render
from sdjax.generate import KeyStream, image_normals
from sdjax.inputs import image_keys
from sdjax.pipeline import StableDiffusion
from sdjax.sampling import sample
from sdjax.samplers import SCHEDULERS, add_noise, make_schedule
from test_schedulers import SD_CONFIG, draws, stand_in_jax

STEPS = 8
SEED = 3
STRENGTHS = (0.3, 0.75, 1.0)
PROMPTS = ["a red circle on a blue background", "a green square"]
LATENT = (8, 8, 4)


# --- models ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_inpaint(tiny_inpaint_dir):
    return StableDiffusion.from_pretrained(tiny_inpaint_dir, dtype=jnp.float32)


@pytest.fixture(scope="module")
def sd_depth(tiny_depth_dir):
    return StableDiffusion.from_pretrained(tiny_depth_dir, dtype=jnp.float32)


def torch_pipeline(cls_name, path, **extra):
    import diffusers

    if "Depth" not in cls_name:  # the depth pipeline has no safety checker
        extra["safety_checker"] = None
    pipe = getattr(diffusers, cls_name).from_pretrained(path, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- inputs ---------------------------------------------------------------------------------------------------


def init_images():
    return [
        Image.fromarray(render("circle", "red", "blue", 0.6, (0.45, 0.5))),
        Image.fromarray(render("triangle", "yellow", "green", 0.7, (0.5, 0.55))),
    ]


def masks():
    """A hard square, and a soft-edged disc (binarised at 0.5 on both sides)."""
    square = np.zeros((64, 64), np.uint8)
    square[16:48, 8:40] = 255
    yy, xx = np.mgrid[:64, :64]
    disc = np.clip((22.0 - np.hypot(yy - 30, xx - 34)) * 40 + 128, 0, 255).astype(np.uint8)
    return [Image.fromarray(square), Image.fromarray(disc)]


def depth_maps():
    """Smooth relative depth at a size other than the image's (diffusers resizes it bicubically)."""
    yy, xx = np.mgrid[:40, :48].astype(np.float32)
    return np.stack([np.sin(xx / 9.0) + yy / 30.0, np.cos(yy / 7.0) * 3.0 + xx / 12.0 + 5.0])


def draws_of(count, streams):
    keys = image_keys(SEED, count)
    noise = np.random.RandomState(1).randn(count, *LATENT).astype(np.float32)
    posterior = [np.asarray(image_normals(keys, stream, LATENT)) for stream in streams]
    return noise, posterior


def run_diffusers(pipe, monkeypatch, noise, posterior, *, steps=STEPS, **call):
    """Run a diffusers pipeline with its noise and its VAE posterior draws replaced by ours (the draws its own
    module makes through ``randn_tensor`` and ``retrieve_latents``)."""
    import importlib

    module = importlib.import_module(type(pipe).__module__)
    queue = list(posterior)

    def injected_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == nchw(noise).shape, shape
        return nchw(noise)

    def injected_posterior(encoder_output, generator=None, sample_mode="sample"):
        dist = encoder_output.latent_dist
        return dist.mean + dist.std * nchw(queue.pop(0))

    monkeypatch.setattr(module, "randn_tensor", injected_randn)
    monkeypatch.setattr(module, "retrieve_latents", injected_posterior)
    with torch.no_grad():
        images = pipe(num_inference_steps=steps, output_type="np", **call).images
    assert not queue, "a posterior draw was not used"
    return images


# --- parity ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", STRENGTHS)
def test_image_to_image_matches_diffusers(sd, tiny_pipeline_dir, monkeypatch, strength):
    pipe = torch_pipeline("StableDiffusionImg2ImgPipeline", tiny_pipeline_dir)
    noise, posterior = draws_of(2, [KeyStream.IMAGE])
    expected = run_diffusers(
        pipe, monkeypatch, noise, posterior,
        prompt=PROMPTS, image=init_images(), strength=strength, guidance_scale=7.5,
    )
    latents = sd.image_to_image(
        PROMPTS, init_images(), strength, steps=STEPS, seed=SEED, scheduler="pndm", latents=noise, output="latent"
    )
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"img2img strength {strength}: rel err {err:.2e}")
    assert err < 1e-3


@pytest.mark.parametrize("strength", STRENGTHS)
def test_inpainting_model_matches_diffusers(sd_inpaint, tiny_inpaint_dir, monkeypatch, strength):
    pipe = torch_pipeline("StableDiffusionInpaintPipeline", tiny_inpaint_dir)
    # diffusers encodes the init image only when it noises it (strength < 1), then the masked image.
    streams = [KeyStream.MASKED_IMAGE] if strength == 1.0 else [KeyStream.IMAGE, KeyStream.MASKED_IMAGE]
    noise, posterior = draws_of(2, streams)
    expected = run_diffusers(
        pipe, monkeypatch, noise, posterior,
        prompt=PROMPTS, image=init_images(), mask_image=masks(), strength=strength, guidance_scale=7.5,
    )
    latents = sd_inpaint.inpaint(
        PROMPTS, init_images(), masks(), strength=strength, steps=STEPS, seed=SEED, scheduler="pndm", latents=noise, output="latent"
    )
    err = rel_err(decode_unit(sd_inpaint, latents), expected)
    print(f"inpaint 9-channel strength {strength}: rel err {err:.2e}")
    assert err < 1e-3


@pytest.mark.parametrize("scheduler", ["pndm", "euler"])
@pytest.mark.parametrize("strength", STRENGTHS)
def test_blended_inpainting_matches_diffusers(sd, tiny_pipeline_dir, monkeypatch, strength, scheduler):
    import diffusers

    pipe = torch_pipeline("StableDiffusionInpaintPipeline", tiny_pipeline_dir)
    if scheduler == "euler":
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    noise, posterior = draws_of(2, [KeyStream.IMAGE, KeyStream.MASKED_IMAGE])  # diffusers encodes both
    expected = run_diffusers(
        pipe, monkeypatch, noise, posterior,
        prompt=PROMPTS, image=init_images(), mask_image=masks(), strength=strength, guidance_scale=7.5,
    )
    latents = sd.inpaint(
        PROMPTS, init_images(), masks(), strength=strength, steps=STEPS, seed=SEED, latents=noise,
        scheduler=scheduler, output="latent",
    )
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"inpaint 4-channel {scheduler} strength {strength}: rel err {err:.2e}")
    assert err < 1e-3


@pytest.mark.parametrize("strength", STRENGTHS)
def test_depth_to_image_matches_diffusers(sd_depth, tiny_depth_dir, monkeypatch, strength):
    pipe = torch_pipeline("StableDiffusionDepth2ImgPipeline", tiny_depth_dir, depth_estimator=None, feature_extractor=None)
    noise, posterior = draws_of(2, [KeyStream.IMAGE])
    expected = run_diffusers(
        pipe, monkeypatch, noise, posterior,
        prompt=PROMPTS, image=init_images(), depth_map=torch.from_numpy(depth_maps()), strength=strength,
        guidance_scale=7.5,
    )
    latents = sd_depth.depth_to_image(
        PROMPTS, init_images(), depth_maps(), strength, steps=STEPS, seed=SEED, scheduler="pndm", latents=noise, output="latent"
    )
    err = rel_err(decode_unit(sd_depth, latents), expected)
    print(f"depth2img strength {strength}: rel err {err:.2e}")
    assert err < 1e-3


# --- compilation, batching, per-image strength -------------------------------------------------------------------


def test_new_strengths_images_and_seeds_do_not_recompile(sd):
    images = init_images()
    sd.image_to_image(PROMPTS, images, 0.3, steps=4, seed=1, output="latent")
    count = sd.executor.compile_count()
    sd.image_to_image(PROMPTS, images[::-1], 0.75, steps=4, seed=2, output="latent")
    sd.image_to_image(PROMPTS, images, [1.0, 0.5], steps=4, seed=[3, 4], guidance_scale=[2.0, 5.0], output="latent")
    assert sd.executor.compile_count() == count
    sd.inpaint(PROMPTS, images, masks(), strength=0.3, steps=4, output="latent")
    count = sd.executor.compile_count()
    sd.inpaint(PROMPTS, images, masks()[::-1], strength=[0.9, 1.0], steps=4, seed=5, output="latent")
    assert sd.executor.compile_count() == count


@pytest.mark.parametrize("scheduler", ["pndm", "dpmpp_2m", "heun"])
def test_per_image_strengths_equal_one_strength_per_call(sd, scheduler):
    """Images of one batch may start at different steps, each with a fresh sampler state."""
    strengths = [0.25, 0.75, 1.0]
    request = dict(prompt="a cat", image=init_images()[0], num_images_per_prompt=3, steps=4, seed=7,
                   scheduler=scheduler, output="latent")
    mixed = sd.image_to_image(strength=strengths, **request)
    for i, strength in enumerate(strengths):
        alone = sd.image_to_image(strength=strength, **request)
        np.testing.assert_allclose(mixed[i], alone[i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_sample_with_per_image_start_steps(name):
    """sample(start_step=(B,)) gives each image the trajectory of a scalar start step."""
    noise, _ = draws(1)
    x0 = 0.5 * draws(2)[0]
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    schedule = make_schedule(name, SD_CONFIG, 6)
    run = jax.jit(lambda start, s: sample(stand_in_jax, add_noise(s, x0, noise, start), keys, s, start_step=start))
    mixed = run(jnp.array([1, 4]), schedule)
    for b, start in enumerate([1, 4]):
        np.testing.assert_allclose(mixed[b], run(start, schedule)[b], rtol=0, atol=1e-5)


def test_images_per_prompt_and_outputs(sd):
    pil = sd.image_to_image(PROMPTS, init_images()[0], 0.5, num_images_per_prompt=2, steps=2)
    assert len(pil) == 4 and pil[0].size == (64, 64)
    array = sd.inpaint("a cat", np.asarray(init_images()[1]), np.asarray(masks()[0]) > 127, steps=2, output="np")
    assert array.shape == (1, 64, 64, 3) and array.dtype == np.uint8


def test_uint8_float_and_pil_inputs_agree(sd):
    pil = init_images()[0]
    as_uint8 = np.asarray(pil)
    as_float = as_uint8.astype(np.float32) / 255.0
    mask = masks()[0]
    results = [
        sd.inpaint("a cat", image, m, strength=0.6, steps=3, output="latent")
        for image, m in [(pil, mask), (as_uint8, np.asarray(mask)), (as_float, np.asarray(mask)[..., None] / 255.0)]
    ]
    np.testing.assert_allclose(results[1], results[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(results[2], results[0], rtol=0, atol=1e-5)


def test_blended_inpainting_keeps_the_unmasked_latents(sd):
    """After the last step the blend sets the latents outside the mask to the init image's."""
    mask = np.zeros((64, 64), np.float32)
    mask[:, :32] = 1.0
    image = init_images()[0]
    latents = sd.inpaint("a cat", image, mask, steps=3, seed=2, output="latent")
    keys = image_keys(2, 1)
    pixels = image_inputs.load_images([image], 64, 64)
    mean, logvar = sd.vae.apply({"params": sd.params["vae"]}, pixels, method="encode")
    known = (mean + np.exp(0.5 * logvar) * image_normals(keys, KeyStream.IMAGE, LATENT)) * sd.config.vae.scaling_factor
    np.testing.assert_allclose(latents[:, :, 4:], known[:, :, 4:], rtol=0, atol=1e-5)
    assert np.abs(latents[:, :, :4] - known[:, :, :4]).mean() > 0.1


def test_keep_unmasked_pastes_the_input_back_outside_the_mask(sd):
    image, mask = np.asarray(init_images()[0]), np.asarray(masks()[0])  # mask: rows 16..47, columns 8..39
    request = dict(prompt="a cat", image=image, mask=mask, steps=3, seed=4)
    kept = sd.inpaint(**request, output="np")
    count = sd.executor.compile_count()
    plain = sd.inpaint(**request, keep_unmasked=False, output="np")
    assert sd.executor.compile_count() == count
    latents = sd.inpaint(**request, output="latent")
    decoded = np.round(decode_unit(sd, latents) * 255)
    assert np.abs(plain.astype(np.float32) - decoded).max() <= 1  # diffusers' output: the plain decode
    inside = mask > 127
    np.testing.assert_array_equal(kept[0][inside], plain[0][inside])
    rows, columns = np.mgrid[:64, :64]
    distance = np.maximum(np.maximum(16 - rows, rows - 47), np.maximum(8 - columns, columns - 39))  # Chebyshev
    far = distance > image_inputs.FEATHER_PIXELS
    np.testing.assert_array_equal(kept[0][far], image[far])
    assert np.abs(plain[0][far].astype(np.float32) - image[far]).mean() > 1.0  # the VAE round trip alone does not
    ramp = distance == 2  # weight 3/5 on the decoded pixel (before clipping to 0..255), 2/5 on the input
    unclipped = (np.asarray(sd.vae.apply({"params": sd.params["vae"]}, latents / sd.config.vae.scaling_factor,
                                         method="decode"))[0] + 1) * 127.5
    expected = np.clip(0.6 * unclipped[ramp] + 0.4 * image[ramp], 0, 255)
    assert np.abs(kept[0][ramp] - expected).max() <= 1.0


def test_soft_masks_blend_softly(sd):
    mask = np.full((64, 64), 0.5, np.float32)
    hard = sd.inpaint("a cat", init_images()[0], mask, steps=3, output="latent")
    soft = sd.inpaint("a cat", init_images()[0], mask, steps=3, binarize_mask=False, output="latent")
    full = sd.inpaint("a cat", init_images()[0], np.ones((64, 64)), steps=3, output="latent")
    np.testing.assert_allclose(hard, full, rtol=0, atol=1e-6)  # 0.5 rounds up to "repaint"
    assert rel_err(soft, full) > 0.05


def test_sizes_not_multiple_of_8_are_resized_with_a_warning(sd):
    image = Image.fromarray(render("circle", "red", "blue", 0.6, (0.5, 0.5), image_size=70)).crop((0, 0, 70, 67))
    with pytest.warns(UserWarning, match=r"image size 70x67 resized to 64x64 \(sides must be multiples of 8"):
        out = sd.image_to_image("a cat", image, 0.5, steps=2, output="np")
    assert out.shape == (1, 64, 64, 3)
    array = np.asarray(image)
    with pytest.warns(UserWarning, match="resized to 64x64"):
        sd.inpaint("a cat", array, np.ones(array.shape[:2], np.uint8) * 255, steps=2, output="np")
    with pytest.warns(UserWarning, match=r"resized to 80x48 \(the requested height/width\)"):
        out = sd.image_to_image("a cat", image, 0.5, steps=2, height=48, width=80, output="np")
    assert out.shape == (1, 48, 80, 3)


def test_strength_zero_returns_the_image_through_the_vae(sd):
    with pytest.warns(UserWarning, match="runs no denoising step"):
        latents = sd.image_to_image("a cat", init_images()[0], 0.1, steps=4, seed=9, output="latent")
    keys = image_keys(9, 1)
    pixels = image_inputs.load_images(init_images()[:1], 64, 64)
    mean, logvar = sd.vae.apply({"params": sd.params["vae"]}, pixels, method="encode")
    known = (mean + np.exp(0.5 * logvar) * image_normals(keys, KeyStream.IMAGE, LATENT)) * sd.config.vae.scaling_factor
    np.testing.assert_allclose(latents, known, rtol=0, atol=1e-5)


def test_rgb_mask_is_converted_with_a_note(sd):
    coloured = np.zeros((64, 64, 3), np.uint8)
    coloured[16:48, 16:48] = (255, 255, 0)
    with pytest.warns(UserWarning, match="converted to grayscale"):
        converted = image_inputs.load_masks([coloured], 64, 64)
    np.testing.assert_array_equal(converted[0, 16:48, 16:48], 1.0)  # luma of yellow is 0.886
    gray = np.repeat(np.asarray(masks()[0])[..., None], 3, axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal channels: nothing to tell
        from_gray_rgb = image_inputs.load_masks([gray], 64, 64)
    np.testing.assert_array_equal(from_gray_rgb, image_inputs.load_masks([masks()[0]], 64, 64))


# --- depth estimator ----------------------------------------------------------------------------------------------


def save_tiny_dpt(path):
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    reference.seeded(0)
    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32,
        patch_size=8, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3],
        head_in_index=-1, is_hybrid=False,
    )
    model = reference.randomize_(DPTForDepthEstimation(config), 0)
    with torch.no_grad():
        model.head.head[-2].bias.fill_(1.0)  # past the final ReLU: random weights alone predict zero depth
    model.save_pretrained(path / "depth_estimator")
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path / "feature_extractor")
    return model


def test_depth_estimator_matches_diffusers(tiny_depth_dir, tmp_path, monkeypatch):
    """With no depth map, both sides estimate depth with the same (tiny random) DPT."""
    from transformers import DPTImageProcessor

    from sdjax.depth import DepthEstimator

    dpt = save_tiny_dpt(tmp_path)
    pipe = torch_pipeline(
        "StableDiffusionDepth2ImgPipeline", tiny_depth_dir, depth_estimator=dpt,
        feature_extractor=DPTImageProcessor.from_pretrained(tmp_path / "feature_extractor"),
    )
    sd = StableDiffusion.from_pretrained(tiny_depth_dir, dtype=jnp.float32)
    sd.depth_estimator = DepthEstimator(str(tmp_path / "depth_estimator"), str(tmp_path / "feature_extractor"))
    noise, posterior = draws_of(2, [KeyStream.IMAGE])
    expected = run_diffusers(
        pipe, monkeypatch, noise, posterior,
        prompt=PROMPTS, image=init_images(), strength=0.75, guidance_scale=7.5,
    )
    latents = sd.depth_to_image(PROMPTS, init_images(), strength=0.75, steps=STEPS, seed=SEED, scheduler="pndm", latents=noise,
                                output="latent")
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"depth2img with the depth estimator: rel err {err:.2e}")
    assert err < 1e-3


def test_model_folder_with_a_depth_estimator_uses_it(tiny_depth_dir, tmp_path):
    import shutil

    folder = tmp_path / "with_dpt"
    shutil.copytree(tiny_depth_dir, folder)
    save_tiny_dpt(folder)
    sd = StableDiffusion.from_pretrained(folder, dtype=jnp.float32)
    assert sd.depth_estimator is not None and sd.depth_estimator.model_source.endswith("depth_estimator")
    out = sd.depth_to_image("a cat", init_images()[0], steps=2, output="np")
    assert out.shape == (1, 64, 64, 3)


# --- bad input -----------------------------------------------------------------------------------------------------


def test_image_and_mask_of_different_sizes(sd):
    with pytest.raises(ValueError, match=r"image 0 is 64x64 but its mask is 32x48; give a mask of the image's size"):
        sd.inpaint("a cat", init_images()[0], np.ones((48, 32), np.uint8), steps=2)


def test_mask_that_is_not_single_channel(sd):
    with pytest.raises(ValueError, match=r"mask 0 must be single-channel: \(H, W\) or \(H, W, 1\)"):
        sd.inpaint("a cat", init_images()[0], np.ones((64, 64, 2), np.uint8), steps=2)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), [0.5, 2.0]])
def test_strength_outside_zero_one(sd, strength):
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        sd.image_to_image(PROMPTS, init_images(), strength, steps=2)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        sd.inpaint(PROMPTS, init_images(), masks(), strength=strength, steps=2)


def test_depth_to_image_needs_a_depth_model(sd, sd_inpaint):
    for model, channels in ((sd, 4), (sd_inpaint, 9)):
        with pytest.raises(ValueError, match=rf"depth_to_image needs a U-Net with 5 input channels.*takes {channels}"):
            model.depth_to_image("a cat", init_images()[0], depth_maps()[0], steps=2)


def test_depth_to_image_without_depth_map_or_estimator(sd_depth):
    with pytest.raises(ValueError, match=r"needs a depth map and this model has no depth estimator: pass depth_map"):
        sd_depth.depth_to_image("a cat", init_images()[0], steps=2)


def test_inpainting_model_without_a_mask(sd_inpaint):
    with pytest.raises(ValueError, match=r"inpaint needs a mask .*this 9-channel inpainting U-Net takes it"):
        sd_inpaint.inpaint("a cat", init_images()[0], None, steps=2)
    with pytest.raises(ValueError, match=r"image_to_image needs a U-Net with 4 input channels.*an inpainting model"):
        sd_inpaint.image_to_image("a cat", init_images()[0], 0.5, steps=2)
    with pytest.raises(ValueError, match=r"text_to_image needs a U-Net with 4 .*takes 9 \(an inpainting model"):
        sd_inpaint.text_to_image("a cat", steps=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image=np.zeros((64, 64, 3), np.int32)), r"image must be uint8, bool or float in \[0, 1\], got .*int32"),
        (dict(image=np.full((64, 64, 3), 2.0)), r"float image values must be in \[0, 1\], got \[2, 2\]"),
        (dict(image=np.zeros((64, 64, 5), np.uint8)), r"image 0 must be \(H, W\), \(H, W, 1\), \(H, W, 3\)"),
        (dict(image="photo.png"), r"image must be a PIL image, an array of 2 or 3 dimensions"),
        (dict(image=[]), r"image is an empty list"),
        (dict(image=np.zeros((4, 4, 3), np.uint8)), r"both sides must be at least 8 pixels"),
        (dict(image=init_images() * 3), r"got 6 images for 2 prompt\(s\) x 1 image\(s\) per prompt"),
        (dict(height=60), r"height=60 is not a multiple of the VAE's downsampling factor 8"),
    ],
)
def test_bad_images(sd, kwargs, message):
    request = {**dict(prompt=PROMPTS, image=init_images(), strength=0.5, steps=2), **kwargs}
    with pytest.raises(ValueError, match=message):
        sd.image_to_image(**request)


def test_bad_masks_and_depth_maps(sd, sd_depth):
    with pytest.raises(ValueError, match=r"got 3 masks for 2 prompt\(s\)"):
        sd.inpaint(PROMPTS, init_images(), masks() + masks()[:1], steps=2)
    with pytest.raises(ValueError, match=r"depth map 0 is constant"):
        sd_depth.depth_to_image("a cat", init_images()[0], np.ones((16, 16)), steps=2)
    with pytest.raises(ValueError, match=r"got 3 depth maps for 1 prompt"):
        sd_depth.depth_to_image("a cat", init_images()[0], np.stack([depth_maps()[0]] * 3), steps=2)
