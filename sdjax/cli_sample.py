"""``sdjax sample``: a resumable batch-sampling job over a prompts file (``sdjax.batch`` plans it,
``sdjax.batch_output`` keeps its folder). ``sdjax.cli`` registers the command."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from sdjax import batch, batch_output, distributed, inputs, samplers
from sdjax.config import SchedulerConfig
from sdjax.noise import NOISE_SOURCES
from sdjax.pipeline import BUILTIN_GUIDANCE_SCALE, DEFAULT_GUIDANCE_SCALE, DEFAULT_SCHEDULER
from sdjax.recipe import Recipe
from sdjax.samplers import SCHEDULE_TYPES

HELP = "sample every prompt of a prompts file into a folder; killed, it resumes where it stopped"


def add_sample_options(parser: argparse.ArgumentParser) -> None:
    from sdjax import cli  # cli imports this module to register the command

    parser.add_argument("prompts_file",
                        help="prompts: .txt, one per line (blank lines and lines starting with # skipped), or "
                             ".jsonl / .csv rows with 'prompt' and optionally negative_prompt, seed, guidance (or "
                             "guidance_scale), width, height, steps, which override the flags for that row")
    parser.add_argument("--out", required=True,
                        help="output folder: ROW_IMAGE.png per image (00012_2.png), manifest.jsonl, run.json; "
                             "the same command again resumes an interrupted run there")
    parser.add_argument("--per-prompt", type=int, default=1, help="images per prompt")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="images per batch; images with the same size, steps and guidance path are batched "
                             "together, a short last batch padded to this size so each size compiles once")
    cli._add_model_options(parser)
    parser.add_argument("--dtype", choices=cli.DTYPES, default=None,
                        help="default: bfloat16 on TPU/GPU, float32 on CPU")
    parser.add_argument("--steps", type=int, default=25, help=f"denoising steps, 1..{inputs.MAX_STEPS}")
    low, high = inputs.GUIDANCE_RANGE
    parser.add_argument("--guidance", type=float, default=None,
                        help=f"classifier-free guidance scale, {low:g}..{high:g} (default: {DEFAULT_GUIDANCE_SCALE}; "
                             f"{BUILTIN_GUIDANCE_SCALE} with the built-in model)")
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER,
                        help="sampler: an sdjax or AUTOMATIC1111 name, as for generate")
    parser.add_argument("--schedule-type", choices=SCHEDULE_TYPES, default=None,
                        help="A1111's schedule type, as for generate (default: the sampler's own)")
    parser.add_argument("--noise", choices=NOISE_SOURCES, default="jax", help="noise source, as for generate")
    parser.add_argument("--size", type=cli._size, default=None,
                        help="WIDTHxHEIGHT, multiples of 8 (default: the model's native size)")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed: image i of row r takes seed + r * per_prompt + i, so every image has its "
                             "own seed; a row's own seed s gives its images s + i")
    parser.add_argument("--negative-prompt", default="", help="negative prompt of rows without one (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--distributed", action="store_true",
                        help="one process per host, the cluster detected by JAX (Cloud TPU, Slurm, Open MPI); "
                             "each process samples its share of the batches on its own devices")
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="several processes, explicitly: process 0's address (with --num-processes, "
                             "--process-id)")
    parser.add_argument("--num-processes", type=int, default=None, help="with --coordinator: how many processes")
    parser.add_argument("--process-id", type=int, default=None, help="with --coordinator: this process, from 0")


def _check_flags(args) -> tuple[str, dict]:
    """The numeric flags in range and the sampler known, before any model loads; returns the sampler."""
    inputs.check_integer("--per-prompt", args.per_prompt, 1)
    inputs.check_integer("--batch-size", args.batch_size, 1)
    inputs.check_integer("--steps", args.steps, 1, inputs.MAX_STEPS)
    inputs.check_number("--guidance", args.guidance, *inputs.GUIDANCE_RANGE)
    inputs.check_integer("--seed", args.seed, inputs.SEED_RANGE[0], inputs.SEED_RANGE[1] - 1)
    if args.size is not None and any(v <= 0 or v % batch.SIZE_FACTOR for v in args.size):
        raise ValueError(f"--size {args.size[0]}x{args.size[1]}: width and height must be positive multiples of "
                         f"{batch.SIZE_FACTOR}")
    try:
        name, options = samplers.resolve_sampler(args.scheduler, args.schedule_type, {})
        samplers.make_schedule(name, SchedulerConfig(), 1, **options)
    except ValueError as e:
        raise ValueError(f"--scheduler {args.scheduler!r}: {e}") from None
    return name, options


def run_sample(args) -> int:
    """Check the flags, the prompts file and the folder's run.json before the model loads; then run this
    process's batches that still miss an image, writing each missing one, and rewrite the manifest in order."""
    from sdjax import cli

    processes = _join(args)  # before anything touches JAX's devices
    sampler, sampler_options = _check_flags(args)
    rows = batch.read_prompts(args.prompts_file)
    folder = Path(args.out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder")
    settings = batch_output.RunSettings(
        model=args.model, config=args.config, dtype=args.dtype, scheduler=args.scheduler,
        schedule_type=args.schedule_type, noise=args.noise, steps=args.steps, size=args.size,
        guidance=args.guidance, negative_prompt=args.negative_prompt, seed=args.seed, per_prompt=args.per_prompt,
        batch_size=args.batch_size, prompts_sha256=batch.file_sha256(Path(args.prompts_file).expanduser()),
    )
    batch_output.check_settings(folder, settings)
    cli.enable_compilation_cache()
    sd = cli.load_model(args.model, args.dtype, args.config)
    width, height = args.size or (sd.native_size, sd.native_size)
    defaults = batch.Defaults(per_prompt=args.per_prompt, batch_size=args.batch_size, steps=args.steps,
                              guidance=args.guidance, width=width, height=height, seed=args.seed,
                              negative_prompt=args.negative_prompt)
    try:
        plan = batch.make_plan(rows, defaults)
    except ValueError as e:  # a row's seeds past 2**32: name the file as read_prompts does
        raise ValueError(f"{args.prompts_file} {e}") from None
    if processes.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        batch_output.record_settings(folder, settings)
        batch_output.start(folder, plan, sampler)
    _barrier(processes, "sdjax-sample-start")  # the others read the folder once process 0 has tidied it
    done = batch_output.finished(folder, plan)
    model, model_hash = cli.model_record(args.model)
    # each image's own recipe: it regenerates alone from its seed (batch size 1), up to XLA's rounding
    recipe = partial(Recipe, scheduler=sampler, noise=args.noise, model=model, model_hash=model_hash,
                     scheduler_options=tuple(sorted(sampler_options.items())), clip_skip=sd.config.clip_skip + 1)
    mine = batch.process_batches(plan, processes.index, processes.count)
    todo = [b for b in mine if any(image.id not in done for image in b)]
    with tqdm(total=sum(image.id not in done for b in todo for image in b), unit="img", desc="sample",
              disable=args.no_progress or not processes.is_main) as progress:
        for images in todo:
            pictures = _generate(sd, images, args.batch_size, sampler, sampler_options, args.noise)
            for image, picture in zip(images, pictures):
                if image.id in done:
                    continue  # made before the interruption; the batch ran again only for its other images
                text = recipe(prompt=image.prompt, negative_prompt=image.negative_prompt, steps=image.steps,
                              guidance_scale=image.guidance, seed=image.seed, width=image.width,
                              height=image.height).infotext()
                # one writer of the manifest: the others' rows come with the final rewrite, from their files
                batch_output.save_image(folder, image, picture, text, sampler, append_row=processes.is_main)
                done.add(image.id)
                progress.update(1)
    _barrier(processes, "sdjax-sample-end")
    if processes.is_main:
        batch_output.rewrite_manifest(folder, plan, sampler, batch_output.finished(folder, plan))
        print(f"{len(plan.images)} images in {folder}")
    return 0


def _join(args) -> distributed.Processes:
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if args.distributed or any(value is not None for value in explicit):
        try:
            return distributed.initialize(*explicit)
        except ValueError as e:  # name the flags, not the function's arguments
            message = str(e)
            for name in ("coordinator", "num_processes", "process_id"):
                message = message.replace(name, "--" + name.replace("_", "-"))
            raise ValueError(message) from None
    return distributed.current()


def _barrier(processes: distributed.Processes, name: str) -> None:
    if processes.count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _generate(sd, images, batch_size: int, sampler: str, sampler_options: dict, noise: str):
    """One planned batch as PIL images; a short batch padded with copies of its last image, so every batch of a
    size is one compiled program and an image always shares its batch with the same images."""
    padded = list(images) + [images[-1]] * (batch_size - len(images))
    negatives = [image.negative_prompt for image in padded]
    first = images[0]
    return sd.text_to_image(
        [image.prompt for image in padded], negatives if any(negatives) else None,
        seed=[image.seed for image in padded], guidance_scale=[image.guidance for image in padded],
        steps=first.steps, width=first.width, height=first.height, scheduler=sampler,
        scheduler_options=sampler_options, noise=noise, output="pil",
    )[:len(images)]

