"""The reusable training core: losses, AdamW with warm-up, EMA, a jitted data-parallel step, checkpoints.

Used by the built-in model's training script and by LoRA training. A loss function has the
signature ``loss_fn(trainable_params, frozen, batch, key) -> (loss, metrics)``; ``make_train_step``
turns it into one jitted optimizer step that runs data-parallel over all local devices through
``sdjax.parallel``: ``jax.jit`` over a 1-D ``data`` mesh (the batch sharded, parameters replicated, XLA
inserting the all-reduce) or, for compatibility, ``jax.pmap`` (gradients averaged with ``lax.pmean``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdjax.parallel import DATA_AXIS, DataParallel


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    opt_state: Any
    ema_params: Any


def adamw(
    learning_rate: float,
    *,
    warmup_steps: int = 0,
    total_steps: Optional[int] = None,
    weight_decay: float = 1e-2,
    b1: float = 0.9,
    b2: float = 0.999,
    clip_norm: Optional[float] = 1.0,
    accumulate_steps: int = 1,
) -> optax.GradientTransformation:
    """AdamW with linear warm-up, then constant (or cosine decay when ``total_steps`` is given)."""
    if total_steps:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, max(warmup_steps, 1), max(total_steps, warmup_steps + 1), learning_rate * 0.1
        )
    else:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)), optax.constant_schedule(learning_rate)],
            [max(warmup_steps, 1)],
        )
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    optimizer = optax.chain(*parts)
    if accumulate_steps > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=accumulate_steps)
    return optimizer


def init_state(params: Any, optimizer: optax.GradientTransformation, *, ema: bool = True) -> TrainState:
    # Own copies: the train step donates the state, which must not delete the caller's arrays.
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,  # own buffers: the step donates both
    )


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)


# --- losses -------------------------------------------------------------------------------------------------


def vae_loss(vae, params, images: jnp.ndarray, key: jax.Array, *, kl_weight: float = 1e-6):
    """Reconstruction (L1 + MSE) plus a KL term towards N(0, 1); images NHWC in [-1, 1]."""
    mean, logvar = vae.apply({"params": params}, images, method="encode")
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    recon = vae.apply({"params": params}, z, method="decode")
    error = recon.astype(jnp.float32) - images
    recon_loss = jnp.mean(jnp.abs(error)) + jnp.mean(error**2)
    kl = 0.5 * jnp.mean(jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
    loss = recon_loss + kl_weight * kl
    return loss, {"loss": loss, "recon": recon_loss, "kl": kl}


def caption_dropout(key: jax.Array, ids: jnp.ndarray, empty_ids: jnp.ndarray, rate: float) -> jnp.ndarray:
    """Replace each caption by the empty caption with probability ``rate`` (what makes CFG possible)."""
    drop = jax.random.bernoulli(key, rate, (ids.shape[0],))
    return jnp.where(drop[:, None], empty_ids[None, :], ids)


def mismatch_captions(
    key: jax.Array, context: jnp.ndarray, timesteps: jnp.ndarray, rate: float, below: int
) -> jnp.ndarray:
    """Give each example whose timestep is below ``below`` another example's caption encoding with
    probability ``rate`` (the next one in the batch).

    With captions that always match, a model learns that the caption alone decides colour and shape, and at
    low noise it repaints an image to fit a contradicting prompt. Seeing wrong captions at low noise teaches
    it that there the noisy image, not the caption, says what is in the picture — what image-to-image at low
    strength relies on. High-noise training, where the caption must decide, is left as it was."""
    mismatched = jax.random.bernoulli(key, rate, (context.shape[0],)) & (timesteps < below)
    return jnp.where(mismatched[:, None, None], jnp.roll(context, 1, axis=0), context)


def diffusion_target(x0, noise, alphas_cumprod_t, prediction_type: str):
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = jnp.sqrt(alphas_cumprod_t)[:, None, None, None]
        s = jnp.sqrt(1.0 - alphas_cumprod_t)[:, None, None, None]
        return a * noise - s * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; accepted: epsilon, v_prediction, sample")


def diffusion_loss(
    predict: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    latents: jnp.ndarray,
    key: jax.Array,
    alphas_cumprod: jnp.ndarray,
    prediction_type: str = "epsilon",
):
    """Denoising loss at uniformly drawn training timesteps. ``predict(noisy, t)`` is the U-Net."""
    t_key, n_key = jax.random.split(key)
    t = jax.random.randint(t_key, (latents.shape[0],), 0, alphas_cumprod.shape[0])
    noise = jax.random.normal(n_key, latents.shape, jnp.float32)
    return denoising_loss(predict, latents, t, noise, alphas_cumprod, prediction_type)


def denoising_loss(predict, latents, t, noise, alphas_cumprod, prediction_type: str = "epsilon"):
    """The mean squared error of ``predict`` at given timesteps ``t`` (B,) and ``noise`` (as latents)."""
    a_t = alphas_cumprod[t]
    noisy = jnp.sqrt(a_t)[:, None, None, None] * latents + jnp.sqrt(1.0 - a_t)[:, None, None, None] * noise
    prediction = predict(noisy, t).astype(jnp.float32)
    target = diffusion_target(latents, noise, a_t, prediction_type)
    loss = jnp.mean((prediction - target) ** 2)
    return loss, {"loss": loss}


# --- the data-parallel step ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """``step(state, frozen, batch, key) -> (state, metrics)``: one compiled optimizer step, and the
    data-parallel setup it runs under. Place ``state`` and ``frozen`` with ``step.parallel.place_params``
    and every batch with ``step.parallel.place_batch``; ``step.parallel.unreplicate`` gives one copy of a
    state back. (On one device, or with ``"mesh"``, unplaced arrays work too: jit places them.)"""

    fn: Callable
    parallel: DataParallel

    def __call__(self, state: TrainState, frozen, batch, key: jax.Array):
        return self.fn(state, frozen, batch, key)


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    ema_decay: Optional[float] = 0.999,
    parallel: Union[DataParallel, str] = "mesh",
    devices=None,
) -> TrainStep:
    """One optimizer step, data-parallel over ``devices`` (default: all local devices).

    ``parallel``: a ``DataParallel`` value, or its mode ("mesh" or "pmap") to build one over ``devices``.
    On the mesh XLA inserts the gradient all-reduce; under pmap each device folds its index into the key
    and the gradients and metrics are averaged with ``lax.pmean``. The state argument is donated.
    """
    if isinstance(parallel, DataParallel):
        if devices is not None:
            raise ValueError("give the devices either in the DataParallel value or as devices=, not both")
    else:
        parallel = DataParallel(devices, parallel)

    def update(state: TrainState, frozen, batch, key, grad_reduce):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, key)
        grads = grad_reduce(grads)
        metrics = grad_reduce(metrics)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None and ema_decay is not None:
            ema = ema_update(ema, params, ema_decay)
        return TrainState(state.step + 1, params, opt_state, ema), metrics

    if parallel.mode == "pmap":

        def step(state, frozen, batch, key):
            key = jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))
            return update(state, frozen, batch, key, lambda t: jax.lax.pmean(t, DATA_AXIS))

    else:

        def step(state, frozen, batch, key):
            return update(state, frozen, batch, key, lambda t: t)

    kinds = ("params", "params", "batch", "broadcast")
    return TrainStep(parallel.parallelize(step, kinds, donate_argnums=(0,)), parallel)


# --- checkpoints and logs ----------------------------------------------------------------------------------


def save_checkpoint(path: os.PathLike, state: TrainState, extra: Optional[dict] = None) -> None:
    """Write the full training state atomically (a crash never leaves a half-written checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host_state = jax.device_get(state)
    payload = flax.serialization.to_bytes({"state": host_state, "extra": json.dumps(extra or {})})
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def restore_checkpoint(path: os.PathLike, like: TrainState) -> tuple[TrainState, dict]:
    """Read a checkpoint written by ``save_checkpoint`` into the structure of ``like``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    template = {"state": jax.device_get(like), "extra": ""}
    restored = flax.serialization.from_bytes(template, path.read_bytes())
    return restored["state"], json.loads(restored["extra"] or "{}")


class LossLog:
    """Appends one JSON line per logged step, and prints a short progress line."""

    def __init__(self, path: Optional[os.PathLike] = None, *, every: int = 50, total: Optional[int] = None):
        self.path = Path(path) if path else None
        self.every = every
        self.total = total
        self.start = time.time()
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, metrics: dict) -> None:
        if step % self.every and step != self.total:
            return
        values = {k: float(np.mean(np.asarray(v))) for k, v in metrics.items()}
        record = {"step": step, "seconds": round(time.time() - self.start, 1), **values}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        total = f"/{self.total}" if self.total else ""
        shown = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        print(f"step {step}{total} {shown} ({record['seconds']}s)", flush=True)
