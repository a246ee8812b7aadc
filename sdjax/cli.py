"""The ``sdjax`` command line: a thin layer over ``sdjax.StableDiffusion``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

from sdjax import infotext, inputs, outputs, samplers, single_file
from sdjax.config import PREDICTION_TYPES, TIMESTEP_SPACINGS, SchedulerConfig
from sdjax import cli_control, cli_sample, cli_train, fast
from sdjax.pipeline import BUILTIN_GUIDANCE_SCALE, DEFAULT_GUIDANCE_SCALE, DEFAULT_SCHEDULER, StableDiffusion
from sdjax.cli_control import open_image as _open_image
from sdjax.infotext import LoraRecord
from sdjax.noise import NOISE_SOURCES
from sdjax.prompt import SYNTAXES
from sdjax.recipe import Recipe, check_loras_loaded, read_recipe
from sdjax.samplers import A1111_SAMPLERS, SCHEDULE_TYPES, SCHEDULERS

DTYPES = ("float32", "bfloat16", "float16")
SIZE_FACTOR = 8  # the VAE's downsampling factor of every supported model family


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and every option's default in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message}\nhint: {self.prog} --help lists the options", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every option's help unless the text already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT (e.g. 512x768), got {text!r}") from None
    return width, height


def _add_generation_options(parser: argparse.ArgumentParser, default_size: str = "the model's native size") -> None:
    parser.add_argument("prompt", nargs="?", default=None, help="what to draw")
    parser.add_argument("--negative", default=None, help="negative prompt (default: none)")
    _add_model_options(parser)
    parser.add_argument("--steps", type=int, default=25, action=fast.GivenFlag,
                        help=f"denoising steps, 1..{inputs.MAX_STEPS} (default: 25, or --fast's)")
    low, high = inputs.GUIDANCE_RANGE
    parser.add_argument(
        "--guidance", type=float, default=None,
        help=f"classifier-free guidance scale, {low:g}..{high:g} (default: {DEFAULT_GUIDANCE_SCALE}; "
        f"{BUILTIN_GUIDANCE_SCALE} with the built-in model; 1 = none, with --fast)",
    )
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the first image, 0..2**32-1; image i uses seed + i (as in A1111), so "
                             "any image regenerates alone from its own seed")
    parser.add_argument("-n", "--num-images", type=int, default=1, dest="num_images", help="images to generate")
    parser.add_argument("--size", type=_size, default=None,
                        help=f"WIDTHxHEIGHT, both multiples of {SIZE_FACTOR} (default: {default_size})")
    parser.add_argument("--fast", choices=fast.FAST_PRESETS, default=None,
                        help="few-step preset, for an accelerator LoRA given with --lora (lcm, tcd, hyper) or a "
                             "distilled model (turbo, lightning): sets --scheduler, --steps and --guidance unless "
                             "given (default: none)")
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER, action=fast.GivenFlag,
                        help=f"sampler (the API's default too): an sdjax name ({', '.join(SCHEDULERS)}) or an "
                             f"AUTOMATIC1111 name ({', '.join(A1111_SAMPLERS)}), optionally with its old schedule "
                             "suffix ('DPM++ 2M Karras')")
    parser.add_argument("--schedule-type", choices=SCHEDULE_TYPES, default=None,
                        help="A1111's schedule type: k-diffusion's sigma grid for Euler, Euler a, LMS, Heun and "
                             "DPM++ (Automatic = the sampler's own A1111 default; default: for sdjax names the "
                             "diffusers grid, for A1111 names Automatic)")
    parser.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=None,
                        help="diffusers' timestep spacing (default: the model's scheduler config, else the "
                             "sampler's diffusers default)")
    parser.add_argument("--quantize", action="store_true",
                        help="A1111's 'Enable quantization in K samplers': U-Net timesteps rounded to integers")
    parser.add_argument("--noise", choices=NOISE_SOURCES, default="jax",
                        help="initial and per-step noise: jax.random, or torch.randn as drawn on the CPU "
                             "(torch-cpu: ComfyUI, A1111 'CPU') or a CUDA device (torch-cuda: A1111's default 'GPU' "
                             "and 'NV'), from each image's seed")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="default: bfloat16 on TPU/GPU, float32 on CPU")
    parser.add_argument("--parallel", choices=("pmap", "mesh"), default="mesh",
                        help="data parallelism over the local devices: jit over a device mesh, or pmap")
    parser.add_argument("--out", default="outputs",
                        help="output folder: images are numbered as in A1111, NNNNN-SEED.png with each "
                             "image's own seed, the counter continuing from the highest number in the folder, "
                             "so nothing is overwritten; or a .png file name (NAME_I.png for several images), "
                             "refused if it exists unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="fixed file names that replace existing files: sdjax_SEED_I.png in the --out "
                             "folder, or the --out .png name")
    parser.add_argument("--no-progress", action="store_true", help="no per-step progress bar")
    low, high = inputs.LORA_SCALE_RANGE
    parser.add_argument("--lora", action="append", default=[], metavar="FILE",
                        help="a LoRA file (diffusers/PEFT or kohya/A1111); repeat for several (default: none)")
    parser.add_argument("--lora-scale", action="append", type=float, default=[], metavar="SCALE",
                        help=f"scale of each --lora, in order, {low:g}..{high:g} (default: 1.0 each)")
    parser.add_argument("--embedding", action="append", default=[], metavar="FILE",
                        help="a textual-inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds); "
                             "its file name without extension is the prompt token; repeat for several "
                             "(default: none)")
    parser.add_argument("--clip-skip", type=int, default=None,
                        help="A1111's Clip skip: 2 = the text encoder's penultimate layer (default: the model's own)")
    parser.add_argument("--prompt-syntax", choices=SYNTAXES, default="a1111",
                        help="prompt weighting: A1111's (red:1.3) [blurry] BREAK, compel's red++ (red)1.3, or "
                             "plain text")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="diffusers folder, hub repo id, or single-file checkpoint (.safetensors/.ckpt) "
                             "(default: the built-in model)")
    parser.add_argument("--config", default=None,
                        help="configuration of a single-file --model: a preset name (sd15, sd21-v, ...), a "
                             "diffusers folder or an LDM .yaml (default: the file's own metadata, a .yaml "
                             "beside it, else inferred from its shapes)")


# Image-conditioned commands: (help, default strength).
IMAGE_COMMANDS = {
    "img2img": ("image to image: redraw --image after the prompt", 0.8),
    "inpaint": ("repaint the white part of --mask in --image", 1.0),
    "depth2img": ("image to image keeping --image's depth layout (needs a depth model)", 0.8),
}


def _add_from_png_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-png", default=None, metavar="IMAGE",
                        help="regenerate the image a PNG's infotext describes (sdjax's or AUTOMATIC1111's): its "
                             "prompt, sampler, steps, guidance, seed, size and noise; give its LoRAs with --lora")


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
                        help=f"how much to change, 0..1: share of the steps that run (default: {strength})")
    if command != "depth2img":
        cli_control.add_control_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sdjax", description="Stable Diffusion in JAX")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="text to image")
    _add_generation_options(generate)
    _add_from_png_option(generate)
    cli_control.add_control_options(generate)
    for command, (text, strength) in IMAGE_COMMANDS.items():
        _add_image_options(commands.add_parser(command, help=text), command, strength)
    convert = commands.add_parser("convert", help="diffusers folder <-> single .safetensors file, either way")
    convert.add_argument("source", help="a diffusers folder, or a .safetensors/.ckpt single file")
    convert.add_argument("target", help="a .safetensors file name, or a folder to write the diffusers layout to")
    convert.add_argument("--config", default=None,
                         help="config of a single-file source: preset name, diffusers folder or LDM .yaml "
                              "(default: the file's metadata, a .yaml beside it, else inferred)")
    convert.add_argument("--prediction-type", default=None, choices=PREDICTION_TYPES,
                         help="override a single file's prediction type (default: from its config or metadata)")
    convert.add_argument("--ema", action="store_true", help="use the model_ema.* weights of a single file")
    convert.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    train_lora = commands.add_parser("train-lora", help="train a LoRA on a folder of captioned images")
    _add_model_options(train_lora)
    cli_train.add_train_lora_options(train_lora)
    train_embedding = commands.add_parser("train-embedding",
                                          help="learn a new prompt token (textual inversion) from captioned images")
    _add_model_options(train_embedding)
    cli_train.add_train_embedding_options(train_embedding)
    train_controlnet = commands.add_parser("train-controlnet", help="train a ControlNet on images and their condition "
                                           "images (default: Canny edges)")
    _add_model_options(train_controlnet)
    cli_train.add_train_controlnet_options(train_controlnet)
    cli_sample.add_sample_options(commands.add_parser("sample", help=cli_sample.HELP))
    info = commands.add_parser("info", help="JAX version, devices and a model's configuration")
    _add_model_options(info)
    return parser


def enable_compilation_cache() -> Path:
    """JAX's persistent compilation cache, so a second run of the same shape skips compiling."""
    cache = Path(os.environ.get("SDJAX_CACHE_DIR", Path.home() / ".cache" / "sdjax" / "jax"))
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return cache


def load_model(model: Optional[str], dtype: Optional[str] = None, config: Optional[str] = None):
    """--model / --config / --dtype -> a model (``StableDiffusion.load``), its errors naming the flags."""
    try:
        return StableDiffusion.load(model, config=config, dtype=dtype)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--model {model}: {e}" if model else str(e)) from None
    except ValueError as e:
        raise ValueError(str(e).replace("config=", "--config").replace("no model was", "no --model was")) from None


# --- checks before any model is loaded ----------------------------------------------------------------------


def check_generation_args(args) -> None:
    """Every numeric flag finite and in range, named as the flag (the API names its arguments)."""
    inputs.check_integer("--steps", args.steps, 1, inputs.MAX_STEPS)
    inputs.check_number("--guidance", args.guidance, *inputs.GUIDANCE_RANGE)
    inputs.check_integer("--seed", args.seed, inputs.SEED_RANGE[0], inputs.SEED_RANGE[1] - 1)
    inputs.check_integer("-n/--num-images", args.num_images, 1)
    if args.seed + args.num_images > inputs.SEED_RANGE[1]:
        raise ValueError(f"--seed {args.seed} with -n {args.num_images}: image i takes seed + i, which must stay "
                         f"below 2**32; use --seed {inputs.SEED_RANGE[1] - args.num_images} or lower")
    if args.size is not None:
        for name, value in zip(("width", "height"), args.size):
            if value <= 0 or value % SIZE_FACTOR:
                lower = max(SIZE_FACTOR, value - value % SIZE_FACTOR)
                raise ValueError(
                    f"--size {args.size[0]}x{args.size[1]}: {name} {value} must be a positive multiple of "
                    f"{SIZE_FACTOR} (the VAE's downsampling factor); nearest valid: {lower} or {lower + SIZE_FACTOR}"
                )
    if hasattr(args, "strength"):
        inputs.check_number("--strength", args.strength, *inputs.STRENGTH_RANGE)
    if len(args.lora_scale) > len(args.lora):
        raise ValueError(f"got {len(args.lora_scale)} --lora-scale values for {len(args.lora)} --lora files")
    for scale in args.lora_scale:
        inputs.check_number("--lora-scale", scale, *inputs.LORA_SCALE_RANGE)
    for file in args.lora:
        if not Path(file).expanduser().exists():
            raise FileNotFoundError(f"--lora file not found: {file}")
    for file in args.embedding:
        if not Path(file).expanduser().is_file():
            raise FileNotFoundError(f"--embedding file not found: {file}")
    if args.clip_skip is not None:
        inputs.check_integer("--clip-skip", args.clip_skip, 1)
    try:  # the library's own check of the name (and whatever names it accepts), with a default config
        name, options = sampler_choice(args)
        samplers.make_schedule(name, SchedulerConfig(), 1, **options)
    except ValueError as e:
        raise ValueError(f"--scheduler {args.scheduler!r}: {e}") from None


def sampler_choice(args) -> tuple[str, dict]:
    """The sdjax sampler and options of --scheduler, --schedule-type and --quantize (or --from-png's)."""
    options = dict(getattr(args, "scheduler_options", None) or {})
    if args.quantize:
        options["quantize"] = True
    if getattr(args, "timestep_spacing", None) is not None:
        options["timestep_spacing"] = args.timestep_spacing
    return samplers.resolve_sampler(args.scheduler, args.schedule_type, options)


def model_record(model: Optional[str]) -> tuple[str, Optional[str]]:
    """The infotext's ``Model`` and ``Model hash``: A1111's hash (SHA-256 of the file, 10 digits) for a single
    file; a folder or hub id has no file to hash."""
    if model is None:
        return "sdjax-builtin", None
    if single_file.is_single_file(model):
        return Path(model).stem, infotext.model_hash(Path(model).expanduser())
    return Path(model).name or model, None


def load_loras(sd, files: Sequence[str], scales: Sequence[float]) -> tuple[LoraRecord, ...]:
    """Load each --lora under its file name (as A1111's <lora:NAME:scale> names it); returns their records."""
    if len(scales) > len(files):
        raise ValueError(f"got {len(scales)} --lora-scale values for {len(files)} --lora files")
    records = []
    for i, file in enumerate(files):
        name, scale = Path(file).stem, scales[i] if i < len(scales) else 1.0
        if any(record.name == name for record in records):
            name = f"{name}_{i}"
        try:
            sd.load_lora(file, scale=scale, name=name)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--lora {file}: {e}") from None
        except ValueError as e:  # CheckpointError too: corrupt, truncated or not a LoRA
            raise ValueError(f"--lora {file}: {e}") from None
        records.append(LoraRecord(name, scale, infotext.lora_hash(Path(file).expanduser())))
    return tuple(records)


def image_infotexts(args, sd, loras, width: int, height: int, count: int, strength=None, controls=()) -> list[str]:
    """Each image's A1111 infotext (``sdjax.recipe.Recipe``): its own seed, the sampler by A1111 name and
    schedule type, the model and its hash, the LoRAs, the controls (``cli_control.ControlRecord``s); image
    commands add the denoising strength."""
    name, options = sampler_choice(args)
    model, model_hash = model_record(args.model)
    texts = []
    for position, seed in enumerate(inputs.image_seeds(args.seed, count)):
        recipe = Recipe(prompt=args.prompt, negative_prompt=args.negative or "", steps=args.steps, scheduler=name,
                        guidance_scale=args.guidance, seed=int(seed), width=width, height=height, noise=args.noise,
                        scheduler_options=tuple(sorted(options.items())), loras=loras, model=model,
                        model_hash=model_hash, batch_size=count, batch_pos=position,
                        clip_skip=args.clip_skip or sd.config.clip_skip + 1, prompt_syntax=args.prompt_syntax)
        parameters = recipe.to_parameters()
        if controls:
            extra = parameters.extra + cli_control.infotext_fields(controls)
            parameters = dataclasses.replace(parameters, extra=extra)
        if strength is not None:
            extra = parameters.extra + (("Mode", args.command),)
            parameters = dataclasses.replace(parameters, denoising_strength=strength, extra=extra)
        texts.append(infotext.format_infotext(parameters))
    return texts


def generation_options(args, width, height) -> dict:
    """The keyword arguments every generation command passes through from the shared options."""
    scheduler, scheduler_options = sampler_choice(args)
    return dict(
        num_images_per_prompt=args.num_images,
        steps=args.steps,
        guidance_scale=args.guidance,
        height=height,
        width=width,
        seed=args.seed,
        scheduler=scheduler,
        scheduler_options=scheduler_options,
        noise=args.noise,
        clip_skip=args.clip_skip,
        prompt_syntax=args.prompt_syntax,
        parallel_mode=args.parallel,
        progress=not args.no_progress,
    )


def prepare_model(args):
    """Load the model and LoRAs (``prepare`` then refuses a request that cannot fit in device memory)."""
    sd = load_model(args.model, args.dtype, args.config)
    loras = load_loras(sd, args.lora, args.lora_scale)
    for file in args.embedding:
        try:
            sd.load_embedding(Path(file).expanduser())
        except ValueError as e:
            raise ValueError(f"--embedding {file}: {e}") from None
    if getattr(args, "recipe", None) is not None:
        check_loras_loaded(sd, args.recipe)
        loras = tuple(dataclasses.replace(r, scale=sd.lora_adapters[r.name]) for r in loras)
    sd.executor.verbose = True
    return sd, loras


def apply_recipe(args) -> None:
    """--from-png: the PNG's recorded settings replace the generation flags (one image)."""
    if args.prompt is not None:
        raise ValueError("give either a prompt or --from-png (which brings its own prompt), not both")
    try:
        args.recipe = read_recipe(Path(args.from_png).expanduser())
    except ValueError as e:
        raise ValueError(f"--from-png {args.from_png}: {e}") from None
    cli_control.warn_if_recorded(Path(args.from_png).expanduser(), args)
    recipe = args.recipe
    args.prompt, args.negative, args.steps, args.guidance = recipe.prompt, recipe.negative_prompt, recipe.steps, \
        recipe.guidance_scale
    args.scheduler, args.schedule_type, args.quantize, args.timestep_spacing = recipe.scheduler, None, False, None
    args.scheduler_options = dict(recipe.scheduler_options)
    args.size, args.noise = (recipe.width, recipe.height), recipe.noise
    args.clip_skip, args.prompt_syntax = recipe.clip_skip, recipe.prompt_syntax
    args.seed, args.num_images = recipe.seed - recipe.batch_pos, recipe.batch_size  # the image's whole batch


def cmd_generate(args) -> int:
    if args.from_png is not None:
        apply_recipe(args)
    elif args.prompt is None:
        raise ValueError("give a prompt (or --from-png IMAGE to regenerate an image from its infotext)")
    check_generation_args(args)
    plan = cli_control.plan_controls(args)
    outputs.check_output(args)
    enable_compilation_cache()
    sd, loras = prepare_model(args)
    width, height = args.size if args.size else (sd.native_size, sd.native_size)
    options = generation_options(args, width, height)
    records = _add_controls(options, plan, sd, (width, height))
    images = sd.text_to_image(args.prompt, args.negative, **options)
    texts = image_infotexts(args, sd, loras, width, height, len(images), controls=records)
    if args.from_png is not None:  # only the image the PNG holds, from its batch
        position = args.recipe.batch_pos
        images, texts, args.seed = images[position:position + 1], texts[position:position + 1], args.recipe.seed
    outputs.save_images(images, texts, args)
    return 0


def _add_controls(options: dict, plan, sd, size: tuple[int, int]) -> tuple:
    """``options["controls"]`` from the checked control flags (``cli_control``); returns their records."""
    if plan is None:
        return ()
    options["controls"], records = cli_control.build_controls(plan, sd, size)
    return records


def _open_depth(path: Optional[str]):
    if path is None:
        return None
    if Path(path).suffix.lower() == ".npy":
        if not Path(path).is_file():
            raise FileNotFoundError(f"--depth file not found: {path}")
        try:
            depth = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"--depth {path} is not a readable .npy array ({e})") from None
        if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number) or not np.all(np.isfinite(depth)):
            raise ValueError(
                f"--depth {path} must hold a finite (H, W) numeric array, got shape {depth.shape} {depth.dtype}"
            )
        return depth
    return _open_image(path, "--depth")


def cmd_image(args) -> int:
    """img2img, inpaint and depth2img: the generate options plus the input image(s) and strength."""
    if args.prompt is None:
        raise ValueError("give a prompt: what the image should become")
    check_generation_args(args)
    image = _open_image(args.image, "--image")
    mask = _open_image(args.mask, "--mask") if args.command == "inpaint" else None
    depth = _open_depth(args.depth) if args.command == "depth2img" else None
    plan = cli_control.plan_controls(args)
    outputs.check_output(args)
    enable_compilation_cache()
    sd, loras = prepare_model(args)
    width, height = args.size if args.size else (None, None)
    options = generation_options(args, width, height)
    factor = sd.vae_scale_factor  # the output size of an unsized image command: the image's, rounded down
    size = args.size or (image.width - image.width % factor, image.height - image.height % factor)
    records = _add_controls(options, plan, sd, size)
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
    texts = image_infotexts(args, sd, loras, width, height, len(images), strength=args.strength, controls=records)
    outputs.save_images(images, texts, args)
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
    return cli_train.run_lora(args)


def cmd_train_controlnet(args) -> int:
    enable_compilation_cache()
    return cli_train.run_controlnet(args)


def cmd_train_embedding(args) -> int:
    enable_compilation_cache()
    return cli_train.run_embedding(args)


def cmd_info(args) -> int:
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    for device in jax.devices():
        print(f"  device {device.id}: {device.device_kind} ({device.platform})")
    sd = load_model(args.model, config=args.config)
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
    "train-embedding": cmd_train_embedding,
    "train-controlnet": cmd_train_controlnet,
    "sample": cli_sample.run_sample,
    "info": cmd_info,
}


def error_lines(command: str, error: BaseException) -> str:
    """``sdjax COMMAND: error: <first line>`` plus, for longer messages, one ``hint:`` line."""
    message = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.filename and error.filename not in message:
        message = f"{message}: {error.filename}"
    first, _, rest = message.partition("\n")
    text = f"sdjax {command}: error: {first}"
    rest = " ".join(rest.split())
    return text + (f"\nhint: {rest}" if rest else "")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"sdjax: warning: {message}", file=file or sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line per warning, no source line
        try:
            note = fast.apply_fast(args)
            if note:
                print(f"sdjax: note: {note}", file=sys.stderr)
            if getattr(args, "guidance", 0) is None:
                args.guidance = BUILTIN_GUIDANCE_SCALE if args.model is None else DEFAULT_GUIDANCE_SCALE
            return COMMANDS[args.command](args)
        except (ValueError, OSError) as e:  # FileNotFoundError, HubUnreachableError, CheckpointError, PIL errors
            print(error_lines(args.command, e), file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
