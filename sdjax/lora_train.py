"""Training a LoRA adapter on a folder of captioned images, with the training core of ``sdjax.train``.

The base model stays frozen in its own dtype (bf16 on TPUs and GPUs) while the adapter trains in fp32:
the loss applies the adapter unfused (``sdjax.lora.unfused``), so even tiny updates change the output,
which merging them into bf16 kernels would round away. One optimizer step is optax AdamW over the
adapter only, optionally accumulated over several micro-batches, data-parallel over all local devices.

    sdjax train-lora --data my_images/ --out my_lora/ --rank 8 --steps 1000
    python scripts/train_lora.py --data my_images/ --out my_lora/

The output folder receives ``pytorch_lora_weights.safetensors`` (diffusers/PEFT: ``pipe.load_lora_weights``
on the folder) and ``lora_kohya.safetensors`` (A1111, ComfyUI), a resumable ``checkpoint.msgpack``,
``loss.jsonl`` and, with ``--sample-every``, ``samples/step_<n>_<i>.png``.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import data, lora, train
from sdjax.generate import encode_images
from sdjax.pipeline import StableDiffusion
from sdjax.schedules import training_alphas_cumprod
from sdjax.tokenizer import tokenize
from sdjax.train_loop import LoopPlan, run_training, write_images

PEFT_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"


@dataclasses.dataclass(frozen=True)
class LoRATrainConfig:
    rank: int = 4
    alpha: Optional[float] = None  # None: alpha = rank
    targets: tuple[str, ...] = lora.DEFAULT_TARGETS  # U-Net layer groups or path regexes
    text_encoder_targets: tuple[str, ...] = ()  # empty: the text encoder is not adapted
    learning_rate: float = 1e-4
    steps: int = 1000  # optimizer steps
    batch_size: int = 1  # images per micro-batch, over all devices
    accumulate_steps: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    clip_norm: Optional[float] = 1.0
    caption_dropout: float = 0.0
    cache_latents: bool = False  # encode every image once instead of every step
    seed: int = 0
    parallel: str = "mesh"
    checkpoint_every: int = 500
    log_every: int = 10
    sample_every: int = 0  # 0: no sample images
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20

    def targets_by_component(self) -> dict:
        targets = {"unet": tuple(self.targets)}
        if self.text_encoder_targets:
            targets["text_encoder"] = tuple(self.text_encoder_targets)
        return targets


def tokenize_captions(sd, captions: Sequence[str]) -> np.ndarray:
    max_length = sd.config.text_encoder.max_position_embeddings
    ids, dropped = tokenize(sd.tokenizer, list(captions), max_length)
    cut = sum(1 for lost in dropped if lost)
    if cut:
        warnings.warn(f"{cut} of {len(captions)} captions are longer than CLIP's {max_length} tokens and were cut",
                      stacklevel=3)
    return ids


def to_model_range(images: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def encode_latents(sd, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Scaled VAE latent means of uint8 NHWC images (what ``cache_latents`` trains on)."""
    encode = jax.jit(lambda p, x: encode_images(sd.models, p, to_model_range(x)))
    parts = [np.asarray(encode(sd.params, images[i : i + batch_size]), np.float32)
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts)


def batch_latents(sd, base, batch, vae_key) -> jax.Array:
    """The scaled latents of a batch: its cached ``latents``, or its uint8 ``pixels`` encoded with ``base["vae"]``
    (sampling the VAE's posterior with ``vae_key``); constants to the gradient."""
    if "latents" in batch:
        latents = batch["latents"]
    else:
        count, height, width, _ = batch["pixels"].shape
        factor = sd.vae_scale_factor
        shape = (count, height // factor, width // factor, sd.config.vae.latent_channels)
        latents = encode_images(sd.models, base, to_model_range(batch["pixels"]), jax.random.normal(vae_key, shape))
    return jax.lax.stop_gradient(latents)


def latents_and_context(sd, config, frozen, adapter, batch, drop_key, vae_key):
    """The scaled latents of a batch (``batch_latents``) and the text context of its captions (dropped to the
    empty caption at ``config.caption_dropout``), through the adapter's text-encoder part (``{}``: none)."""
    base = frozen["params"]
    latents = batch_latents(sd, base, batch, vae_key)
    ids = batch["ids"]
    if config.caption_dropout > 0:
        ids = train.caption_dropout(drop_key, ids, frozen["empty_ids"], config.caption_dropout)
    with lora.unfused([(adapter.get("text_encoder", {}), 1.0)]):
        context = sd.text_encoder.apply({"params": base["text_encoder"]}, ids, skip_layers=sd.config.clip_skip)
    return latents, context


def make_loss_fn(sd, config: LoRATrainConfig):
    """``loss(trainable, frozen, batch, key)``: the diffusion loss of the base model with the adapter applied
    unfused. ``batch`` holds ``ids`` and either ``latents`` (cached) or ``pixels`` (uint8, encoded here)."""
    prediction_type = sd.config.scheduler.prediction_type

    def loss_fn(trainable, frozen, batch, key):
        adapter = lora.join_alpha(trainable, frozen["alphas"])
        drop_key, vae_key, loss_key = jax.random.split(key, 3)
        latents, context = latents_and_context(sd, config, frozen, adapter, batch, drop_key, vae_key)

        def predict(noisy, t):
            return sd.unet.apply({"params": frozen["params"]["unet"]}, noisy.astype(sd.unet.dtype), t, context)

        with lora.unfused([(adapter["unet"], 1.0)]):
            return train.diffusion_loss(predict, latents, loss_key, frozen["alphas_cumprod"], prediction_type)

    return loss_fn


@dataclasses.dataclass(frozen=True)
class Objective:
    """What ``train_lora`` minimises, when not the diffusion loss: ``loss_fn(trainable, frozen, batch, key)``
    over the trainer's frozen tree, and the settings a checkpoint must agree with to be resumed."""

    loss_fn: Callable
    record: dict


def check_inputs(sd, images: np.ndarray, captions: Sequence[str], config, devices) -> None:
    """The checks every trainer on this core makes (``config`` has batch_size, steps, accumulate_steps)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 NHWC RGB, got {images.dtype} {images.shape}")
    if len(images) != len(captions) or not len(images):
        raise ValueError(f"need at least one image and one caption per image; got {len(images)} and {len(captions)}")
    factor = sd.vae_scale_factor * 2 ** (len(sd.config.unet.block_out_channels) - 1)
    if images.shape[1] % factor or images.shape[2] % factor:
        raise ValueError(f"image size {images.shape[1:3]} must be a multiple of {factor} for this model")
    n = len(devices) if devices is not None else jax.local_device_count()
    if config.batch_size % n:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of the {n} devices (data-parallel)")
    if config.steps < 1 or config.accumulate_steps < 1:
        raise ValueError(f"steps and accumulate_steps must be positive, got {config.steps}, {config.accumulate_steps}")


def train_lora(
    sd,
    images: np.ndarray,
    captions: Sequence[str],
    config: LoRATrainConfig = LoRATrainConfig(),
    output_dir=None,
    *,
    progress: bool = True,
    devices=None,
    objective: Optional[Objective] = None,
) -> dict:
    """Train an adapter for ``sd`` (a ``StableDiffusion``; its parameters stay frozen) on uint8 NHWC
    ``images`` and their ``captions``; returns the adapter (numpy, ``sdjax.lora`` layout). ``objective``:
    another loss than the diffusion loss (``sdjax.lcm_distill``).

    With ``output_dir``: checkpoints every ``checkpoint_every`` steps and resumes from the last one, logs
    the loss, writes sample images, and saves the adapter in diffusers/PEFT and kohya formats at the end.
    """
    check_inputs(sd, images, captions, config, devices)
    output = Path(output_dir) if output_dir is not None else None
    init_key, key = jax.random.split(jax.random.PRNGKey(config.seed))
    base = {k: v for k, v in sd.params.items() if k != "lora"}
    adapter = lora.init_lora(base, config.targets_by_component(), config.rank, config.alpha, init_key)
    trainable, alphas = lora.split_alpha(adapter)
    optimizer = train.adamw(
        config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm,
        accumulate_steps=config.accumulate_steps,
    )
    loss_fn = objective.loss_fn if objective else make_loss_fn(sd, config)
    step_fn = train.make_train_step(loss_fn, optimizer, ema_decay=None, parallel=config.parallel, devices=devices)

    ids = tokenize_captions(sd, captions)
    if config.cache_latents:
        examples = {"latents": encode_latents(sd, images), "ids": ids}
        base = {k: v for k, v in base.items() if k != "vae"}
    else:
        examples = {"pixels": images, "ids": ids}
    frozen = {
        "params": base,
        "alphas": alphas,
        "empty_ids": jnp.asarray(tokenize_captions(sd, [""])[0]),
        "alphas_cumprod": jnp.asarray(training_alphas_cumprod(sd.config.scheduler, zero_snr=True, terminal_fix=False)),
    }

    record = {**_config_record(config), **(objective.record if objective else {})}
    state = train.init_state(trainable, optimizer, ema=False)

    def sample(params, step: int) -> None:
        write_samples(sd, _trained(params, alphas), config, output / "samples", step)

    params = run_training(step_fn, state, frozen, examples, key, LoopPlan.of("train-lora", config), output, record,
                          progress=progress, sample=sample if config.sample_prompts else None)
    adapter = _trained(params, alphas)
    if output:
        lora.save_lora(output / PEFT_FILE, adapter, "peft")
        lora.save_lora(output / KOHYA_FILE, adapter, "kohya")
    return adapter


def _trained(params, alphas) -> dict:
    return lora.to_host(lora.join_alpha(jax.device_get(params), jax.device_get(alphas)))


def _config_record(config: LoRATrainConfig) -> dict:
    """The settings a checkpoint must agree with to be resumed (not the run length or logging)."""
    keep = ("rank", "alpha", "targets", "text_encoder_targets", "accumulate_steps", "seed")
    return json.loads(json.dumps({k: getattr(config, k) for k in keep}))


def write_samples(sd, adapter: dict, config: LoRATrainConfig, folder: Path, step: int) -> list[Path]:
    """Images of ``config.sample_prompts`` with the adapter at scale 1 (same seeds every time)."""
    name = sd.add_lora(adapter, 1.0, "sdjax-training-sample")
    try:
        images = sd.text_to_image(list(config.sample_prompts), steps=config.sample_steps, seed=config.seed,
                                  scheduler="dpmpp_2m")
    finally:
        sd.unload_lora(name)
    return write_images(images, folder, step)


# --- command line (the options are defined in sdjax.cli) -----------------------------------------------------


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def config_from_args(args) -> LoRATrainConfig:
    return LoRATrainConfig(
        rank=args.rank,
        alpha=args.alpha,
        targets=_names(args.targets),
        text_encoder_targets=_names(args.text_encoder_targets),
        learning_rate=args.lr,
        steps=args.steps,
        batch_size=args.batch_size,
        accumulate_steps=args.accumulate,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        caption_dropout=args.caption_dropout,
        cache_latents=args.cache_latents,
        seed=args.seed,
        parallel=args.parallel,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        sample_every=args.sample_every,
        sample_prompts=tuple(args.sample_prompts),
        sample_steps=args.sample_steps,
    )


def run_from_args(args) -> int:
    config = config_from_args(args)
    paths, captions = data.load_image_folder(args.data, caption_from_folder_name=args.caption_from_folder_name)
    sd = StableDiffusion.load(args.model, config=args.config, dtype=args.base_dtype)
    images = data.load_images(paths, args.resolution or sd.native_size)
    print(f"{len(images)} images from {args.data}; training {config.steps} steps", flush=True)
    started = time.time()
    from sdjax import lcm_distill  # it builds on this module

    distill = lcm_distill.distillation_from_args(args)
    if distill is not None:
        adapter = lcm_distill.distill_lcm_lora(sd, images, captions, config, distill, args.out,
                                               progress=not args.no_progress)
    else:
        adapter = train_lora(sd, images, captions, config, args.out, progress=not args.no_progress)
    print(f"trained {lora.adapter_summary(adapter)} in {time.time() - started:.0f}s", flush=True)
    print(Path(args.out) / PEFT_FILE)
    print(Path(args.out) / KOHYA_FILE)
    return 0
