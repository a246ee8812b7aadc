"""Latent consistency distillation (sdjax.lcm_distill): the loss against diffusers' DDIM solver and LCM boundary
condition on the same U-Net and draws; a distillation run through the LoRA trainer, its file loaded by diffusers;
the built-in model's shipped LCM-LoRA against diffusers' pipeline and on held-out captions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from reference import decode_unit, rel_err
from sdjax import fast, lcm_distill, lora, lora_train
from sdjax.pipeline import StableDiffusion, builtin_model_dir
from sdjax.schedules import training_alphas_cumprod

PROMPTS = ["a red circle on a blue background", "a green square"]


def diffusers_consistency_loss(unet, latents, context, uncond, index, noise, guidance, scheduler_config,
                               prediction_type, huber_c):
    """The same example through diffusers: DDIMScheduler.step as the teacher's solver (50 steps, no clipping,
    alpha_bar(0) at the end), LCMScheduler's boundary scalings, DDIMScheduler.add_noise."""
    import diffusers

    config = {**scheduler_config, "prediction_type": prediction_type, "clip_sample": False,
              "set_alpha_to_one": False}
    solver = diffusers.DDIMScheduler.from_config(config)
    solver.set_timesteps(50)
    boundary = diffusers.LCMScheduler.from_config({**config, "timestep_scaling": 10.0})
    predictions, earliers, targets = [], [], []
    for i, grid_index in enumerate(index):
        start = torch.tensor(20 * (grid_index + 1) - 1)
        end = torch.clamp(start - 20, min=0)
        x0 = torch.from_numpy(latents[i : i + 1])
        text, empty = torch.from_numpy(context[i : i + 1]), torch.from_numpy(uncond[i : i + 1])
        noisy = solver.add_noise(x0, torch.from_numpy(noise[i : i + 1]), start[None])

        def consistency(sample, t):
            raw = unet(sample, t, encoder_hidden_states=text).sample
            c_skip, c_out = boundary.get_scalings_for_boundary_condition_discrete(t)
            x0_pred = solver.step(raw, t, sample).pred_original_sample  # step's x0 does not depend on t_prev
            return c_skip * sample + c_out * x0_pred

        predictions.append(consistency(noisy, start))
        raw_cond = unet(noisy, start, encoder_hidden_states=text).sample
        raw_uncond = unet(noisy, start, encoder_hidden_states=empty).sample
        guided = raw_uncond + float(guidance[i]) * (raw_cond - raw_uncond)
        earlier = solver.step(guided, start, noisy).prev_sample
        earliers.append(earlier)
        targets.append(consistency(earlier, end))
    prediction, earlier, target = (torch.cat(x).numpy() for x in (predictions, earliers, targets))
    loss = np.mean(np.sqrt((prediction - target) ** 2 + huber_c**2) - huber_c)
    return loss, prediction, earlier, target


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_consistency_loss_matches_diffusers_solver_and_boundary(sd, tiny_pipeline_dir, prediction_type):
    import diffusers

    torch_unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet").eval()
    rng = np.random.RandomState(0)
    size = sd.config.unet.sample_size
    latents = rng.randn(3, 4, size, size).astype(np.float32)
    noise = rng.randn(3, 4, size, size).astype(np.float32)
    width = sd.config.unet.cross_attention_dim
    context, uncond = (rng.randn(3, 7, width).astype(np.float32) for _ in range(2))
    index, guidance = np.array([0, 17, 49]), np.array([1.0, 1.7, 3.0], np.float32)
    with torch.no_grad():
        expected = diffusers_consistency_loss(torch_unet, latents, context, uncond, index, noise, guidance,
                                              sd.config.scheduler.to_diffusers_config(),
                                              prediction_type, 1e-3)

    def unet(sample, timesteps, text):
        return sd.unet.apply({"params": sd.params["unet"]}, sample, timesteps, text)

    nhwc = (lambda x: jnp.asarray(x.transpose(0, 2, 3, 1)))
    grid = lcm_distill.SolverGrid(1000, lcm_distill.ConsistencyDistillation())
    alphas_cumprod = jnp.asarray(training_alphas_cumprod(sd.config.scheduler, zero_snr=True, terminal_fix=False))
    draws = lcm_distill.Draws(jnp.asarray(index), nhwc(noise), jnp.asarray(guidance))
    loss, parts = lcm_distill.consistency_loss(unet, unet, unet, nhwc(latents), jnp.asarray(context),
                                               jnp.asarray(uncond), draws, grid, alphas_cumprod, prediction_type, 1e-3)
    for name, want in zip(("prediction", "earlier", "target"), expected[1:]):
        err = rel_err(np.asarray(parts[name]).transpose(0, 3, 1, 2), want)
        print(f"{prediction_type} {name}: rel err {err:.2e}")
        assert err < 1e-4, name
    assert abs(float(loss) - float(expected[0])) <= 1e-4 * abs(float(expected[0])), (float(loss), expected[0])


def lcm_lora_error(sd, model_dir, lora_file, steps: int, seed: int) -> float:
    """diffusers' pipeline from ``model_dir`` with ``LCMScheduler.from_config`` and the LoRA file at guidance 1,
    against sdjax with the same file on its guidance-free lcm path and the same torch draws: relative error of
    the decoded images."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(lora_file.parent, weight_name=lora_file.name)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]
    with torch.no_grad():
        expected = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=1.0, generator=generators,
                        output_type="np").images
    name = sd.load_lora(lora_file, strict=True)
    try:
        latents = sd.text_to_image(PROMPTS, steps=steps, guidance_scale=None, scheduler="lcm", seed=seed,
                                   noise="torch-cpu", output="latent")
    finally:
        sd.unload_lora(name)
    return rel_err(decode_unit(sd, latents), expected)


def test_cli_distillation_writes_a_lora_diffusers_loads(sd, tiny_pipeline_dir, tmp_path):
    """``sdjax train-lora --distill lcm``: the run logs and saves an adapter; diffusers' LCM pipeline with the
    file equals sdjax with it; going on with other settings is refused."""
    from sdjax.cli import main
    from test_lora import shapes_folder

    folder, out = shapes_folder(tmp_path / "images", count=4), tmp_path / "out"
    common = ["train-lora", "--data", str(folder), "--out", str(out), "--model", str(tiny_pipeline_dir), "--rank", "4",
              "--targets", "attention,proj", "--lr", "3e-2", "--batch-size", "4", "--cache-latents", "--log-every",
              "1", "--no-progress", "--base-dtype", "float32"]
    assert main([*common, "--steps", "3", "--distill", "lcm", "--distill-guidance", "1", "3"]) == 0
    assert (out / "loss.jsonl").read_text().count("\n") == 3

    trained = lora.load_lora_file(out / lora_train.PEFT_FILE, sd.config, strict=True)
    assert any(np.abs(np.asarray(leaf)).max() > 0 for leaf in jax.tree.leaves(trained))  # it trained
    err = lcm_lora_error(sd, tiny_pipeline_dir, out / lora_train.PEFT_FILE, steps=2, seed=5)
    print(f"distilled LoRA in diffusers vs sdjax: rel err {err:.2e}")
    assert err < 1e-3

    # Resuming the distillation with the diffusion loss, or with another guidance range, mixes two objectives.
    assert main([*common, "--steps", "4"]) == 2
    assert main([*common, "--steps", "4", "--distill", "lcm", "--distill-guidance", "1", "4"]) == 2


def test_bad_distillation_settings(sd):
    with pytest.raises(ValueError, match="guidance range"):
        lcm_distill.ConsistencyDistillation(guidance_min=3.0, guidance_max=2.0)
    with pytest.raises(ValueError, match="must divide"):
        lcm_distill.SolverGrid(1000, lcm_distill.ConsistencyDistillation(solver_steps=30))
    config = lora_train.LoRATrainConfig(text_encoder_targets=("attention",))
    with pytest.raises(ValueError, match="U-Net only"):
        lcm_distill.make_loss_fn(sd, config, lcm_distill.ConsistencyDistillation())


@pytest.fixture(scope="module")
def builtin():
    return StableDiffusion.default(dtype=jnp.float32)


def test_builtin_lcm_lora_matches_diffusers(builtin):
    err = lcm_lora_error(builtin, builtin_model_dir(), fast.BUILTIN_LCM_LORA, steps=4, seed=3)
    print(f"built-in LCM-LoRA, 4 steps: diffusers vs sdjax rel err {err:.2e}")
    assert err < 1e-3
    assert fast.BUILTIN_LCM_LORA.stat().st_size < 5e6


def test_builtin_lcm_lora_keeps_the_prompt_at_4_steps(builtin):
    """The README's figure, on half its captions (the script's held-out caption seed): >= 85% at 4 steps."""
    from sdjax import data
    from sdjax.eval import adherence

    captions = data.random_captions(100, seed=12345)
    name = builtin.load_lora(fast.BUILTIN_LCM_LORA, strict=True)
    try:
        images = np.concatenate([
            builtin.text_to_image(captions[i:i + 50], seed=[12345 + i + j for j in range(50)], steps=4,
                                  scheduler="lcm", guidance_scale=None, output="np") for i in (0, 50)])
    finally:
        builtin.unload_lora(name)
    score = adherence(images, captions)
    print(f"built-in LCM-LoRA, 4 steps, 100 held-out captions: {score}")
    assert score["all"] >= 0.85
