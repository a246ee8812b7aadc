"""The ``sdjax`` command line: a thin layer over ``sdjax.StableDiffusion``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np
from PIL import Image, PngImagePlugin

from sdjax.config import PREDICTION_TYPES
from sdjax.lora_train import run_from_args
from sdjax.pipeline import BUILTIN_GUIDANCE_SCALE, DEFAULT_GUIDANCE_SCALE, StableDiffusion

DTYPES = ("float32", "bfloat16", "float16")


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT (e.g. 512x768), got {text!r}") from None
    return width, height


def _add_generation_options(parser: argparse.ArgumentParser, default_size: str = "the model's native size") -> None:
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--negative", default=None, help="negative prompt")
    parser.add_argument("--model", default=None, help="diffusers folder or hub repo id (default: the built-in model)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--guidance", type=float, default=None,
        help=f"classifier-free guidance scale (default: {DEFAULT_GUIDANCE_SCALE}; "
        f"{BUILTIN_GUIDANCE_SCALE} with the built-in model)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-n", "--num-images", type=int, default=1, dest="num_images")
    parser.add_argument("--size", type=_size, default=None, help=f"WIDTHxHEIGHT (default: {default_size})")
    parser.add_argument("--scheduler", default="dpmpp_2m")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on TPU/GPU, float32 on CPU")
    parser.add_argument("--parallel", choices=("pmap", "mesh"), default="mesh")
    parser.add_argument("--out", default="outputs", help="output folder, or a .png file name")
    parser.add_argument("--no-progress", action="store_true", help="no per-step progress bar")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE",
                        help="a LoRA file (diffusers/PEFT or kohya/A1111); repeat for several")
    parser.add_argument("--lora-scale", action="append", type=float, default=[], metavar="SCALE",
                        help="scale of each --lora, in order (default 1.0)")


def _add_train_lora_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="image folder with same-name .txt captions or metadata.jsonl")
    parser.add_argument("--out", required=True, help="output folder (adapter files, checkpoint, log, samples)")
    parser.add_argument("--model", default=None, help="diffusers folder or hub repo id (default: the built-in model)")
    parser.add_argument("--caption-from-folder-name", action="store_true",
                        help="caption images that have none with their folder's name")
    parser.add_argument("--resolution", type=int, default=None, help="training image side (default: model native)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--targets", default="attention",
                        help="U-Net layer groups, comma separated: attention, feed_forward, proj, conv")
    parser.add_argument("--text-encoder-targets", default="",
                        help="text encoder layer groups (attention, feed_forward); default: none")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=1, help="images per micro-batch, over all devices")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--caption-dropout", type=float, default=0.0)
    parser.add_argument("--cache-latents", action="store_true", help="encode the images with the VAE once")
    parser.add_argument("--base-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="frozen base weights (default: bfloat16 on TPU/GPU, float32 on CPU)")
    parser.add_argument("--parallel", choices=("mesh", "pmap"), default="mesh")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--sample-every", type=int, default=0, help="write sample images every N steps")
    parser.add_argument("--sample-prompt", action="append", default=[], dest="sample_prompts")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--no-progress", action="store_true")


# Image-conditioned commands: (help, default strength).
IMAGE_COMMANDS = {
    "img2img": ("image to image: redraw --image after the prompt", 0.8),
    "inpaint": ("repaint the white part of --mask in --image", 1.0),
    "depth2img": ("image to image keeping --image's depth layout (needs a depth model)", 0.8),
}


def _add_image_options(parser: argparse.ArgumentParser, command: str, strength: float) -> None:
    _add_generation_options(parser, default_size="the input image's, rounded down to a multiple of 8")
    parser.add_argument("--image", required=True, help="input image file")
    if command == "inpaint":
        parser.add_argument("--mask", required=True, help="mask image file: white = repaint, black = keep")
        parser.add_argument("--soft-mask", action="store_true",
                            help="keep the mask's grey levels (default: round at 0.5, as diffusers does)")
        parser.add_argument("--no-keep-unmasked", action="store_true",
                            help="output the whole decoded image (diffusers' output) instead of pasting the "
                                 "input back outside the mask")
    if command == "depth2img":
        parser.add_argument("--depth", default=None,
                            help="depth map: a .npy (H, W) array or a grayscale image, larger = nearer "
                                 "(default: estimated by the model's depth estimator)")
    parser.add_argument("--strength", type=float, default=strength,
                        help=f"how much to change, 0..1: share of the steps that run (default {strength})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdjax", description="Stable Diffusion in JAX")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generation_options(commands.add_parser("generate", help="text to image"))
    for command, (text, strength) in IMAGE_COMMANDS.items():
        _add_image_options(commands.add_parser(command, help=text), command, strength)
    convert = commands.add_parser("convert", help="diffusers folder <-> single .safetensors file, either way")
    convert.add_argument("source", help="a diffusers folder, or a .safetensors/.ckpt single file")
    convert.add_argument("target", help="a .safetensors file name, or a folder to write the diffusers layout to")
    convert.add_argument("--config", default=None, help="config override for single files (preset name or folder)")
    convert.add_argument("--prediction-type", default=None, choices=PREDICTION_TYPES)
    convert.add_argument("--ema", action="store_true", help="use the model_ema.* weights of a single file")
    convert.add_argument("--dtype", choices=DTYPES, default="float32")
    _add_train_lora_options(commands.add_parser("train-lora", help="train a LoRA on a folder of captioned images"))
    info = commands.add_parser("info", help="JAX version, devices and a model's configuration")
    info.add_argument("--model", default=None)
    return parser


def enable_compilation_cache() -> Path:
    """JAX's persistent compilation cache, so a second run of the same shape skips compiling."""
    cache = Path(os.environ.get("SDJAX_CACHE_DIR", Path.home() / ".cache" / "sdjax" / "jax"))
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return cache


def load_model(model: Optional[str], dtype: Optional[str] = None):
    if model is None:
        return StableDiffusion.default(dtype=dtype)
    return StableDiffusion.from_pretrained(model, dtype=dtype)


def output_paths(out: str, count: int, seed: int) -> list[Path]:
    target = Path(out)
    if target.suffix.lower() == ".png":
        if count == 1:
            return [target]
        return [target.with_name(f"{target.stem}_{i}.png") for i in range(count)]
    return [target / f"sdjax_{seed}_{i}.png" for i in range(count)]


def png_parameters(args, width: int, height: int, seed: int) -> str:
    """The A1111-style ``parameters`` text other Stable Diffusion tools read back."""
    lines = [args.prompt]
    if args.negative:
        lines.append(f"Negative prompt: {args.negative}")
    lines.append(
        f"Steps: {args.steps}, Sampler: {args.scheduler}, CFG scale: {args.guidance}, Seed: {seed}, "
        f"Size: {width}x{height}, Model: {args.model or 'sdjax-builtin'}, Generator: sdjax"
    )
    return "\n".join(lines)


def save_images(images, paths: list[Path], texts: list[str]) -> None:
    for image, path, text in zip(images, paths, texts):
        path.parent.mkdir(parents=True, exist_ok=True)
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        image.save(path, pnginfo=info)
        print(path)


def load_loras(sd, files: Sequence[str], scales: Sequence[float]) -> None:
    if len(scales) > len(files):
        raise ValueError(f"got {len(scales)} --lora-scale values for {len(files)} --lora files")
    for i, file in enumerate(files):
        sd.load_lora(file, scale=scales[i] if i < len(scales) else 1.0, name=f"{i}_{Path(file).stem}")


def generation_options(args, width, height) -> dict:
    """The keyword arguments every generation command passes through from the shared options."""
    return dict(
        num_images_per_prompt=args.num_images,
        steps=args.steps,
        guidance_scale=args.guidance,
        height=height,
        width=width,
        seed=args.seed,
        scheduler=args.scheduler,
        parallel_mode=args.parallel,
        progress=not args.no_progress,
    )


def cmd_generate(args) -> int:
    enable_compilation_cache()
    sd = load_model(args.model, args.dtype)
    load_loras(sd, args.lora, args.lora_scale)
    sd.executor.verbose = True
    width, height = args.size if args.size else (sd.native_size, sd.native_size)
    images = sd.text_to_image(args.prompt, args.negative, **generation_options(args, width, height))
    paths = output_paths(args.out, len(images), args.seed)
    texts = [png_parameters(args, width, height, args.seed) + f", Image index: {i}" for i in range(len(images))]
    save_images(images, paths, texts)
    return 0


def _open_image(path: str, flag: str):
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} file not found: {path}")
    image = Image.open(path)
    image.load()
    return image


def _open_depth(path: Optional[str]):
    if path is None:
        return None
    if Path(path).suffix.lower() == ".npy":
        if not Path(path).is_file():
            raise FileNotFoundError(f"--depth file not found: {path}")
        return np.load(path)
    return _open_image(path, "--depth")


def cmd_image(args) -> int:
    """img2img, inpaint and depth2img: the generate options plus the input image(s) and strength."""
    enable_compilation_cache()
    image = _open_image(args.image, "--image")
    mask = _open_image(args.mask, "--mask") if args.command == "inpaint" else None
    depth = _open_depth(args.depth) if args.command == "depth2img" else None
    sd = load_model(args.model, args.dtype)
    load_loras(sd, args.lora, args.lora_scale)
    sd.executor.verbose = True
    width, height = args.size if args.size else (None, None)
    options = generation_options(args, width, height)
    if args.command == "img2img":
        images = sd.image_to_image(args.prompt, image, args.strength, args.negative, **options)
    elif args.command == "inpaint":
        images = sd.inpaint(
            args.prompt, image, mask, args.negative, strength=args.strength, binarize_mask=not args.soft_mask,
            keep_unmasked=not args.no_keep_unmasked, **options,
        )
    else:
        images = sd.depth_to_image(args.prompt, image, depth, args.strength, args.negative, **options)
    width, height = images[0].size
    paths = output_paths(args.out, len(images), args.seed)
    text = png_parameters(args, width, height, args.seed)
    text += f", Denoising strength: {args.strength}, Mode: {args.command}"
    save_images(images, paths, [text + f", Image index: {i}" for i in range(len(images))])
    return 0


def cmd_convert(args) -> int:
    source, target = Path(args.source), Path(args.target)
    if source.is_dir():
        if target.suffix != ".safetensors":
            raise ValueError(f"converting a diffusers folder writes a .safetensors file; got target {target}")
        StableDiffusion.from_pretrained(source, dtype=args.dtype).save_single_file(target)
    elif source.is_file():
        if target.suffix:
            raise ValueError(f"converting a single file writes a diffusers folder; got target {target}")
        sd = StableDiffusion.from_single_file(
            source, args.config, dtype=args.dtype, prediction_type=args.prediction_type, use_ema=args.ema
        )
        sd.save_pretrained(target)
    else:
        raise FileNotFoundError(f"nothing to convert at {source}")
    print(target)
    return 0


def cmd_train_lora(args) -> int:
    enable_compilation_cache()
    return run_from_args(args)


def cmd_info(args) -> int:
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    for device in jax.devices():
        print(f"  device {device.id}: {device.device_kind} ({device.platform})")
    sd = load_model(args.model)
    config = sd.config
    print(f"model: {args.model or 'built-in'}")
    print(f"  native size: {sd.native_size}px, dtype {sd.dtype}")
    print(
        f"  text encoder: {config.text_encoder.num_hidden_layers} layers, width {config.text_encoder.hidden_size}, "
        f"{config.text_encoder.hidden_act}"
    )
    print(
        f"  unet: in_channels {config.unet.in_channels}, blocks {list(config.unet.block_out_channels)}, "
        f"heads {list(config.unet.heads_per_block())}, cross-attention {config.unet.cross_attention_dim}"
    )
    print(f"  vae: {config.vae.downsample_factor}x downsampling, scaling factor {config.vae.scaling_factor}")
    print(f"  scheduler: {config.scheduler.prediction_type}, {config.scheduler.beta_schedule} betas")
    counts = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in sd.params.items()}
    print("  parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
    return 0


COMMANDS = {
    "generate": cmd_generate,
    **{command: cmd_image for command in IMAGE_COMMANDS},
    "convert": cmd_convert,
    "train-lora": cmd_train_lora,
    "info": cmd_info,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "guidance", 0) is None:
        args.guidance = BUILTIN_GUIDANCE_SCALE if args.model is None else DEFAULT_GUIDANCE_SCALE
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sdjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
