"""Latent consistency distillation of a LoRA (LCM-LoRA, arXiv:2310.04378 and 2311.05556) on sdjax's LoRA
trainer: the result samples in 2-8 steps with the ``lcm`` sampler and no classifier-free guidance.

One training example: a latent noised to a timestep ``t`` of the teacher's DDIM grid (``solver_steps``
points, LCMScheduler's ``original_inference_steps``). The frozen base model with classifier-free guidance at a
scale drawn per example is the teacher; one DDIM step of sdjax's VP formula takes it to ``t - T/solver_steps``.
The student (base + adapter) maps the noisy latent to the consistency output ``c_skip x + c_out x0``; the
target is the same function, adapter held fixed, at the teacher's point one step earlier. The loss is the
pseudo-Huber distance between the two.

    sdjax train-lora --data images/ --out lcm_lora/ --distill lcm --rank 16 --steps 2000
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import lora, lora_train
from sdjax.samplers.few_step import boundary_scalings
from sdjax.samplers.schedule import parameterization


@dataclasses.dataclass(frozen=True)
class ConsistencyDistillation:
    # The teacher's classifier-free guidance scale, drawn uniformly per example; diffusers' LCM-LoRA script's
    # w of 3..15 (its teacher is uncond + (1 + w) (cond - uncond)).
    guidance_min: float = 4.0
    guidance_max: float = 16.0
    solver_steps: int = 50  # the teacher's DDIM grid (LCMScheduler's original_inference_steps)
    timestep_scaling: float = 10.0  # the boundary condition's (LCMScheduler's timestep_scaling)
    huber_c: float = 0.001

    def __post_init__(self):
        if not 0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"distillation guidance range must satisfy 0 <= min <= max, got "
                             f"{self.guidance_min}..{self.guidance_max}")
        if self.solver_steps < 1 or self.huber_c <= 0:
            raise ValueError(f"solver_steps must be positive and huber_c > 0, got {self.solver_steps}, {self.huber_c}")


class SolverGrid:
    """The teacher's DDIM grid t_i = (i + 1) T/n - 1 and, per point, the timestep one solver step earlier
    (clamped at 0), with the boundary-condition scalings of both."""

    def __init__(self, num_train_timesteps: int, distill: ConsistencyDistillation):
        if num_train_timesteps % distill.solver_steps:
            raise ValueError(f"solver_steps {distill.solver_steps} must divide the model's "
                             f"{num_train_timesteps} training timesteps")
        skip = num_train_timesteps // distill.solver_steps
        self.start = np.arange(1, distill.solver_steps + 1) * skip - 1
        self.end = np.maximum(self.start - skip, 0)
        self.c_skip_start, self.c_out_start = boundary_scalings(self.start, distill.timestep_scaling)
        self.c_skip_end, self.c_out_end = boundary_scalings(self.end, distill.timestep_scaling)


class Draws(NamedTuple):
    """The random choices of one distillation example batch."""

    index: jax.Array  # (B,) int: position on the teacher's grid
    noise: jax.Array  # like the latents
    guidance: jax.Array  # (B,) the teacher's guidance scale


def consistency_loss(student, teacher, target, latents, context, uncond, draws: Draws, grid: SolverGrid,
                     alphas_cumprod, prediction_type: str, huber_c: float):
    """The consistency distillation loss and its parts. ``student``, ``teacher``, ``target``: U-Net calls
    ``(sample, timesteps, context) -> raw output``; the teacher is guided with ``uncond`` as negative context,
    the target's output carries no gradient."""
    param = parameterization(prediction_type)

    def per_image(table):
        return jnp.asarray(table)[draws.index][:, None, None, None]

    start, end = jnp.asarray(grid.start)[draws.index], jnp.asarray(grid.end)[draws.index]
    alpha_start, alpha_end = per_image(alphas_cumprod[grid.start]), per_image(alphas_cumprod[grid.end])
    signal_start, noise_start = jnp.sqrt(alpha_start), jnp.sqrt(1 - alpha_start)
    signal_end, noise_end = jnp.sqrt(alpha_end), jnp.sqrt(1 - alpha_end)
    noisy = signal_start * latents + noise_start * draws.noise

    def consistency(raw, sample, signal, noise, c_skip, c_out):
        return per_image(c_skip) * sample + per_image(c_out) * param.x0_vp(raw, sample, signal, noise)

    prediction = consistency(student(noisy, start, context), noisy, signal_start, noise_start, grid.c_skip_start,
                             grid.c_out_start)

    # The teacher: guided, one DDIM step from its grid point to the one before.
    raw = teacher(jnp.concatenate([noisy, noisy]), jnp.concatenate([start, start]),
                  jnp.concatenate([uncond, context]))
    raw_uncond, raw_cond = jnp.split(raw, 2)
    scale = draws.guidance[:, None, None, None]

    def guided(predict):
        unguided = predict(raw_uncond, noisy, signal_start, noise_start)
        return unguided + scale * (predict(raw_cond, noisy, signal_start, noise_start) - unguided)

    earlier = jax.lax.stop_gradient(signal_end * guided(param.x0_vp) + noise_end * guided(param.eps_vp))
    aim = consistency(target(earlier, end, context), earlier, signal_end, noise_end, grid.c_skip_end, grid.c_out_end)
    aim = jax.lax.stop_gradient(aim)
    loss = jnp.mean(jnp.sqrt((prediction - aim) ** 2 + huber_c**2) - huber_c)
    return loss, {"prediction": prediction, "earlier": earlier, "target": aim}


def make_loss_fn(sd, config: lora_train.LoRATrainConfig, distill: ConsistencyDistillation):
    """``loss(trainable, frozen, batch, key)`` with the frozen tree of ``lora_train.train_lora``."""
    if config.text_encoder_targets:
        raise ValueError("consistency distillation adapts the U-Net only; text_encoder_targets must be empty")
    scheduler = sd.config.scheduler
    grid = SolverGrid(scheduler.num_train_timesteps, distill)

    def loss_fn(trainable, frozen, batch, key):
        adapter = lora.join_alpha(trainable, frozen["alphas"])
        base = frozen["params"]
        drop_key, vae_key, index_key, noise_key, guidance_key = jax.random.split(key, 5)
        latents, context = lora_train.latents_and_context(sd, config, frozen, adapter, batch, drop_key, vae_key)
        count = latents.shape[0]
        draws = Draws(
            index=jax.random.randint(index_key, (count,), 0, distill.solver_steps),
            noise=jax.random.normal(noise_key, latents.shape),
            guidance=jax.random.uniform(guidance_key, (count,), minval=distill.guidance_min,
                                        maxval=distill.guidance_max),
        )

        def unet(adapter_unet):
            def call(sample, timesteps, text):
                with lora.unfused([(adapter_unet, 1.0)] if adapter_unet is not None else []):
                    return sd.unet.apply({"params": base["unet"]}, sample.astype(sd.unet.dtype), timesteps,
                                         text).astype(jnp.float32)

            return call

        empty = sd.text_encoder.apply({"params": base["text_encoder"]}, frozen["empty_ids"][None],
                                      skip_layers=sd.config.clip_skip)
        loss, _ = consistency_loss(
            unet(adapter["unet"]), unet(None), unet(jax.lax.stop_gradient(adapter["unet"])), latents, context,
            jnp.broadcast_to(empty, context.shape), draws, grid, frozen["alphas_cumprod"],
            scheduler.prediction_type, distill.huber_c,
        )
        return loss, {"loss": loss}

    return loss_fn


def distill_lcm_lora(
    sd,
    images: np.ndarray,
    captions: Sequence[str],
    config: lora_train.LoRATrainConfig = lora_train.LoRATrainConfig(targets=("attention", "proj", "feed_forward")),
    distill: ConsistencyDistillation = ConsistencyDistillation(),
    output_dir=None,
    *,
    progress: bool = True,
    devices=None,
) -> dict:
    """An LCM-LoRA for ``sd`` distilled on ``images`` and ``captions`` (the run, checkpoints and outputs of
    ``lora_train.train_lora``); sample with it through scheduler ``lcm`` at guidance 1."""
    return lora_train.train_lora(
        sd, images, captions, config, output_dir, progress=progress, devices=devices,
        objective=lora_train.Objective(make_loss_fn(sd, config, distill), record={"lcm": dataclasses.asdict(distill)}),
    )


def distillation_from_args(args) -> Optional[ConsistencyDistillation]:
    if args.distill is None:
        return None
    return ConsistencyDistillation(guidance_min=args.distill_guidance[0], guidance_max=args.distill_guidance[1],
                                   solver_steps=args.distill_solver_steps)
