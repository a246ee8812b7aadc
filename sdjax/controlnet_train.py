"""Training a ControlNet for a Stable Diffusion model, with the training core of ``sdjax.train``.

The ControlNet starts as diffusers' ``ControlNetModel.from_unet`` builds it (``controlnet_from_unet``): a copy
of the U-Net's encoder half, a freshly initialised conditioning-image encoder whose last convolution is zero,
and zero 1x1 convolutions on every residual, so before training it changes nothing. Only the ControlNet
trains; the text encoder, U-Net and VAE stay frozen, and the loss is the usual denoising loss of the U-Net
given the ControlNet's residuals for the condition image. Captions are dropped at ``caption_dropout`` (half,
as the ControlNet paper does), so the control also works with an empty prompt.

    sdjax train-controlnet --data my_images/ --out my_controlnet/              # Canny edges of the images
    sdjax train-controlnet --shapes 20000 --out shapes_canny/                   # the built-in model's shapes

The output folder receives the diffusers layout (``config.json`` + ``diffusion_pytorch_model.safetensors``:
``sdjax.load_controlnet`` and diffusers' ``ControlNetModel.from_pretrained`` read it), a resumable
``checkpoint.msgpack`` and ``loss.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import data, train
from sdjax.config import ControlNetConfig, UNetConfig
from sdjax.controlnet import ControlNet, save_controlnet
from sdjax.lora_train import check_inputs, encode_latents, latents_and_context, tokenize_captions
from sdjax.models.controlnet import ControlNetModel
from sdjax.pipeline import StableDiffusion
from sdjax.preprocess import canny
from sdjax.schedules import training_alphas_cumprod
from sdjax.train_loop import LoopPlan, run_training, write_images

# What from_unet copies from the U-Net (diffusers: conv_in, time_proj (no weights), time_embedding, down_blocks,
# mid_block); everything else of the ControlNet is new.
COPIED_FROM_UNET = ("conv_in", "time_embedding", "mid_block")
CONDITIONS = ("canny",)


@dataclasses.dataclass(frozen=True)
class ControlNetTrainConfig:
    # Four levels downsample the condition image 8x, to the latent size of an 8x VAE; diffusers' default is
    # (16, 32, 96, 256), small models do with less.
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    learning_rate: float = 1e-5
    steps: int = 1000  # optimizer steps
    batch_size: int = 1  # images per micro-batch, over all devices
    accumulate_steps: int = 1
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    clip_norm: Optional[float] = 1.0
    caption_dropout: float = 0.5  # the ControlNet paper's share of empty prompts
    # Share of the examples whose timestep is drawn from [high_noise_from, T) instead of all T training
    # timesteps. The epsilon loss weighs the noisiest steps least, yet there the layout a spatial control gives
    # is decided; drawing more of them strengthens its signal (the built-in model's ControlNet: 0.5).
    high_noise_share: float = 0.0
    high_noise_from: int = 500
    cache_latents: bool = False
    seed: int = 0  # the conditioning encoder's initialisation and the data order
    parallel: str = "mesh"
    checkpoint_every: int = 500
    log_every: int = 10
    sample_every: int = 0  # 0: no sample images
    sample_prompts: tuple[str, ...] = ()  # drawn with the first training conditions, one each
    sample_steps: int = 20


# --- the initial ControlNet ---------------------------------------------------------------------------------


def _unet_of(unet) -> tuple[UNetConfig, Any]:
    if isinstance(unet, StableDiffusion):
        return unet.config.unet, unet.params["unet"]
    if isinstance(unet, (tuple, list)) and len(unet) == 2 and isinstance(unet[0], UNetConfig):
        return unet[0], unet[1]
    raise TypeError(f"controlnet_from_unet takes a StableDiffusion or a (UNetConfig, U-Net params) pair; "
                    f"got {type(unet).__name__}")


def controlnet_config_from_unet(unet_config: UNetConfig, conditioning_embedding_out_channels: Sequence[int],
                                conditioning_channels: int = 3, channel_order: str = "rgb") -> ControlNetConfig:
    """The config diffusers' ``ControlNetModel.from_unet`` gives a ControlNet for a U-Net of ``unet_config``."""
    shared = {f.name for f in dataclasses.fields(UNetConfig)} & {f.name for f in dataclasses.fields(ControlNetConfig)}
    return ControlNetConfig(
        **{name: getattr(unet_config, name) for name in shared},
        conditioning_channels=conditioning_channels,
        conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        controlnet_conditioning_channel_order=channel_order,
    )


def _torch_default_conv(rng: np.random.Generator, shape: tuple) -> dict:
    """PyTorch's ``nn.Conv2d`` initialisation (kaiming-uniform, a=sqrt(5)): kernel and bias uniform in
    +-1/sqrt(fan_in); ``shape`` is the Flax kernel's (kh, kw, in, out)."""
    bound = 1.0 / np.sqrt(shape[0] * shape[1] * shape[2])
    return {"kernel": rng.uniform(-bound, bound, shape).astype(np.float32),
            "bias": rng.uniform(-bound, bound, shape[-1:]).astype(np.float32)}


def controlnet_from_unet(
    unet,
    conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
    *,
    conditioning_channels: int = 3,
    channel_order: str = "rgb",
    seed: int = 0,
    dtype=jnp.float32,
) -> ControlNet:
    """A new ControlNet for ``unet`` (a ``StableDiffusion`` or a ``(UNetConfig, params)`` pair), as diffusers'
    ``ControlNetModel.from_unet``: conv_in, time embedding, down blocks and mid block copied from the U-Net;
    the conditioning encoder initialised as PyTorch initialises convolutions (seeded by ``seed``) but for its
    zero ``conv_out``; every ``controlnet_down_blocks_*`` and ``controlnet_mid_block`` zero."""
    unet_config, unet_params = _unet_of(unet)
    config = controlnet_config_from_unet(unet_config, conditioning_embedding_out_channels, conditioning_channels,
                                         channel_order)
    module = ControlNetModel(config, dtype=dtype, param_dtype=dtype)
    side = 2 ** (len(config.block_out_channels) - 1)
    factor = module.cond_downsample_factor
    shapes = jax.eval_shape(
        module.init, jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32),
        jax.ShapeDtypeStruct((1, side * factor, side * factor, config.conditioning_channels), jnp.float32),
    )["params"]
    # Built on the host: eager jax.random and jnp calls would compile a small program per parameter shape.
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in shapes.items():
        if name in COPIED_FROM_UNET or name.startswith("down_blocks_"):
            params[name] = jax.device_get(unet_params[name])
        elif name == "controlnet_cond_embedding":
            params[name] = {conv: (_torch_default_conv(rng, leaves["kernel"].shape) if conv != "conv_out"
                                   else jax.tree.map(lambda s: np.zeros(s.shape, np.float32), leaves))
                            for conv, leaves in sorted(shape.items())}
        else:  # the zero convolutions
            params[name] = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shape)
    if jax.tree.map(np.shape, params) != jax.tree.map(lambda s: s.shape, shapes):
        raise ValueError("the U-Net's encoder weights do not fit the ControlNet its config describes")
    params = jax.device_put(jax.tree.map(lambda x: np.asarray(x, dtype), params))
    return ControlNet(config, params, module, jnp.dtype(dtype))


# --- conditions ---------------------------------------------------------------------------------------------


def conditions_of(images: np.ndarray, condition: str = "canny") -> np.ndarray:
    """The condition images of uint8 NHWC ``images``: ``"canny"`` edge maps (``sdjax.preprocess.canny`` at its
    default thresholds, the same shape, uint8)."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; accepted: {', '.join(CONDITIONS)}")
    return np.stack([canny(image) for image in images]) if len(images) else np.zeros_like(images)


# --- training -----------------------------------------------------------------------------------------------


def make_loss_fn(sd, module: ControlNetModel, config: ControlNetTrainConfig):
    """``loss(controlnet_params, frozen, batch, key)``: the frozen U-Net's denoising loss given the ControlNet's
    residuals. ``batch``: ``ids``, ``conditions`` (uint8) and ``latents`` (cached) or ``pixels`` (uint8)."""
    prediction_type = sd.config.scheduler.prediction_type

    def loss_fn(trainable, frozen, batch, key):
        base = frozen["params"]
        drop_key, vae_key, t_key, noise_key = jax.random.split(key, 4)
        latents, context = latents_and_context(sd, config, frozen, {}, batch, drop_key, vae_key)
        condition = batch["conditions"].astype(jnp.float32) / 255.0

        def predict(noisy, t):
            down, mid = module.apply({"params": trainable}, noisy, t, context, condition)
            return sd.unet.apply({"params": base["unet"]}, noisy.astype(sd.unet.dtype), t, context,
                                 down_block_additional_residuals=down, mid_block_additional_residual=mid)

        alphas_cumprod = frozen["alphas_cumprod"]
        t = timesteps(t_key, latents.shape[0], alphas_cumprod.shape[0])
        noise = jax.random.normal(noise_key, latents.shape, jnp.float32)
        return train.denoising_loss(predict, latents, t, noise, alphas_cumprod, prediction_type)

    def timesteps(key, count: int, total: int) -> jax.Array:
        all_key, high_key, pick_key = jax.random.split(key, 3)
        uniform = jax.random.randint(all_key, (count,), 0, total)
        high = jax.random.randint(high_key, (count,), min(config.high_noise_from, total - 1), total)
        return jnp.where(jax.random.bernoulli(pick_key, config.high_noise_share, (count,)), high, uniform)

    return loss_fn


def check_conditions(sd, images: np.ndarray, conditions: np.ndarray, config: ControlNetTrainConfig) -> None:
    if conditions.shape[:3] != images.shape[:3] or conditions.ndim != 4 or conditions.dtype != np.uint8:
        raise ValueError(f"conditions must be uint8 NHWC, one per image at the images' size {images.shape[:3]}; "
                         f"got {conditions.dtype} {conditions.shape}")
    factor = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
    if factor != sd.vae_scale_factor:
        levels = int(np.log2(sd.vae_scale_factor)) + 1
        raise ValueError(f"conditioning_embedding_out_channels {config.conditioning_embedding_out_channels} "
                         f"downsample {factor}x; this model's latents are {sd.vae_scale_factor}x smaller than its "
                         f"images: give {levels} channel counts")
    for name in ("caption_dropout", "high_noise_share"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"{name} is a share: accepted 0 to 1, got {getattr(config, name)}")


def _config_record(config: ControlNetTrainConfig) -> dict:
    """The settings a checkpoint must agree with to be resumed (not the run length or logging)."""
    keep = ("conditioning_embedding_out_channels", "accumulate_steps", "seed")
    return json.loads(json.dumps({k: getattr(config, k) for k in keep}))


def train_controlnet(
    sd,
    images: np.ndarray,
    conditions: np.ndarray,
    captions: Sequence[str],
    config: ControlNetTrainConfig = ControlNetTrainConfig(),
    output_dir=None,
    *,
    progress: bool = True,
    devices=None,
) -> ControlNet:
    """Train a ControlNet for ``sd`` (a ``StableDiffusion``, frozen) on uint8 NHWC ``images``, their condition
    images ``conditions`` (uint8, the images' size, e.g. ``conditions_of(images)``) and ``captions``; returns
    it (fp32 parameters).

    With ``output_dir``: checkpoints every ``checkpoint_every`` steps and resumes from the last one, logs the
    loss, writes sample images, and saves the ControlNet in the diffusers layout at the end."""
    check_inputs(sd, images, captions, config, devices)
    conditions = np.asarray(conditions)
    check_conditions(sd, images, conditions, config)
    output = Path(output_dir) if output_dir is not None else None
    controlnet = controlnet_from_unet(sd, config.conditioning_embedding_out_channels,
                                      conditioning_channels=conditions.shape[-1], seed=config.seed)
    optimizer = train.adamw(config.learning_rate, warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
                            clip_norm=config.clip_norm, accumulate_steps=config.accumulate_steps)
    step_fn = train.make_train_step(make_loss_fn(sd, controlnet.module, config), optimizer, ema_decay=None,
                                    parallel=config.parallel, devices=devices)

    base = {k: v for k, v in sd.params.items() if k in ("text_encoder", "unet", "vae")}
    ids = tokenize_captions(sd, captions)
    if config.cache_latents:
        examples = {"latents": encode_latents(sd, images), "ids": ids, "conditions": conditions}
        base = {k: v for k, v in base.items() if k != "vae"}
    else:
        examples = {"pixels": images, "ids": ids, "conditions": conditions}
    frozen = {
        "params": base,
        "empty_ids": jnp.asarray(tokenize_captions(sd, [""])[0]),
        "alphas_cumprod": jnp.asarray(training_alphas_cumprod(sd.config.scheduler, zero_snr=True, terminal_fix=False)),
    }
    state = train.init_state(controlnet.params, optimizer, ema=False)

    def sample(params, step: int) -> None:
        write_samples(sd, _trained(controlnet, params), conditions, config, output / "samples", step)

    params = run_training(step_fn, state, frozen, examples, jax.random.PRNGKey(config.seed),
                          LoopPlan.of("train-controlnet", config), output, _config_record(config), progress=progress,
                          sample=sample if config.sample_prompts else None)
    trained = _trained(controlnet, params)
    if output:
        save_controlnet(trained, output)
    return trained


def _trained(initial: ControlNet, params) -> ControlNet:
    return dataclasses.replace(initial, params=jax.tree.map(jnp.asarray, params))


def write_samples(sd, controlnet: ControlNet, conditions: np.ndarray, config: ControlNetTrainConfig, folder: Path,
                  step: int) -> list[Path]:
    """Images of ``config.sample_prompts``, prompt i controlled by training condition i (same seeds every time)."""
    from sdjax.control import Control  # the pipeline's controls; imported late, as only sampling needs them

    count = len(config.sample_prompts)
    chosen = conditions[np.arange(count) % len(conditions)]
    images = sd.text_to_image(list(config.sample_prompts), steps=config.sample_steps, seed=config.seed,
                              scheduler="dpmpp_2m", controls=[Control(controlnet, chosen)])
    return write_images(images, folder, step)


# --- command line (the options are defined in sdjax.cli_train) ----------------------------------------------


def config_from_args(args) -> ControlNetTrainConfig:
    return ControlNetTrainConfig(
        conditioning_embedding_out_channels=tuple(int(c) for c in args.conditioning_channels.split(",")),
        learning_rate=args.lr,
        steps=args.steps,
        batch_size=args.batch_size,
        accumulate_steps=args.accumulate,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        caption_dropout=args.caption_dropout,
        high_noise_share=args.high_noise_share,
        high_noise_from=args.high_noise_from,
        cache_latents=args.cache_latents,
        seed=args.seed,
        parallel=args.parallel,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        sample_every=args.sample_every,
        sample_prompts=tuple(args.sample_prompts),
        sample_steps=args.sample_steps,
    )


def load_training_data(args, size: int) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """(images, conditions, captions, where from) of the command line: ``--data`` (with ``--conditions``, a
    folder of condition images under the same relative names) or ``--shapes N``."""
    if (args.data is None) == (args.shapes is None):
        raise ValueError("give the training images as --data FOLDER or --shapes N (the built-in shapes), one of them")
    if args.shapes is not None:
        if args.conditions is not None:
            raise ValueError("--conditions goes with --data; the shapes' conditions are their Canny edges")
        images, captions, _ = data.make_dataset(args.shapes, args.seed, image_size=size)
        return images, conditions_of(images, args.condition), captions, f"{args.shapes} shapes images"
    paths, captions = data.load_image_folder(args.data, caption_from_folder_name=args.caption_from_folder_name)
    images = data.load_images(paths, size)
    if args.conditions is None:
        return images, conditions_of(images, args.condition), captions, str(args.data)
    folder, root = Path(args.conditions).expanduser(), Path(args.data).expanduser()
    condition_paths = [folder / Path(p).relative_to(root) for p in paths]
    missing = [p for p in condition_paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} images have no condition image in {folder} "
                                f"(e.g. {missing[0].relative_to(folder)}); name each as its image")
    return images, data.load_images(condition_paths, size), captions, str(args.data)


def run_from_args(args) -> int:
    config = config_from_args(args)
    sd = StableDiffusion.load(args.model, config=args.config, dtype=args.base_dtype)
    images, conditions, captions, source = load_training_data(args, args.resolution or sd.native_size)
    print(f"{len(images)} images from {source}; training a ControlNet for {config.steps} steps", flush=True)
    started = time.time()
    train_controlnet(sd, images, conditions, captions, config, args.out, progress=not args.no_progress)
    print(f"trained in {time.time() - started:.0f}s", flush=True)
    print(Path(args.out))
    return 0
