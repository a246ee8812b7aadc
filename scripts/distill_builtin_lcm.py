"""Distil the built-in model's LCM-LoRA with sdjax's own trainer, ship it beside the model, measure it.

    python scripts/distill_builtin_lcm.py --workdir runs/lcm --steps 1500        # train (resumes), save, measure
    python scripts/distill_builtin_lcm.py --workdir runs/lcm --measure-only      # measure the shipped LoRA

Training: latent consistency distillation (``sdjax.lcm_distill``) on images of the built-in model's own data
set (``sdjax.data``), the base model guided at a scale drawn from ``--guidance`` as the teacher. The adapter
is written in diffusers/PEFT format to ``sdjax/assets/builtin/lcm_lora/builtin_lcm_lora.safetensors`` (what ``sdjax generate --fast lcm``
loads for the built-in model). Measurement: prompt adherence (``sdjax.eval``) on held-out captions (a caption
seed training never used) at 2, 4 and 8 steps of ``lcm`` without guidance, beside the base model without the
LoRA at 4 steps and with its usual 25 guided steps; written to ``docs/lcm_lora.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sdjax import data, fast, lcm_distill, lora_train
from sdjax.eval import adherence
from sdjax.pipeline import BUILTIN_GUIDANCE_SCALE, StableDiffusion

LORA_FILE = fast.BUILTIN_LCM_LORA
EVAL_CAPTION_SEED = 12345  # scripts/bench_few_step.py's held-out captions


def measure(sd, num: int, batch: int) -> dict:
    """Adherence of each run, and its mean absolute pixel difference (0-255) to the 25-step guided image of
    the same caption and seed: the image the teacher's ODE leads to, which a distilled sampler should approach."""
    captions = data.random_captions(num, seed=EVAL_CAPTION_SEED)
    seeds = [EVAL_CAPTION_SEED + i for i in range(num)]

    def draw(**options) -> np.ndarray:
        return np.concatenate([sd.text_to_image(captions[i:i + batch], seed=seeds[i:i + batch], output="np",
                                                **options) for i in range(0, num, batch)])

    reference = draw(steps=25, scheduler="dpmpp_2m", guidance_scale=BUILTIN_GUIDANCE_SCALE)

    def score(images: np.ndarray) -> dict:
        distance = float(np.abs(images.astype(np.float32) - reference.astype(np.float32)).mean())
        return {**adherence(images, captions), "pixel_distance_to_25_steps": round(distance, 2)}

    results = {
        "base, 25 steps dpmpp_2m, guidance 1.5": score(reference),
        "base, 4 steps dpmpp_2m, guidance 1.5": score(draw(steps=4, scheduler="dpmpp_2m",
                                                           guidance_scale=BUILTIN_GUIDANCE_SCALE)),
        "base, 4 steps lcm, no guidance": score(draw(steps=4, scheduler="lcm", guidance_scale=None)),
    }
    name = sd.load_lora(LORA_FILE, 1.0, strict=True)
    for steps in (2, 4, 8):
        results[f"LCM-LoRA, {steps} steps lcm, no guidance"] = score(draw(steps=steps, scheduler="lcm",
                                                                          guidance_scale=None))
    sd.unload_lora(name)
    for key, value in results.items():
        print(f"{key}: all {value['all']:.3f} (shape {value['shape']:.3f}, colour {value['colour']:.3f}), "
              f"pixel distance to 25 steps {value['pixel_distance_to_25_steps']}", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/lcm_lora", help="checkpoint, loss log (a run resumes here)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--guidance", type=float, nargs=2, default=(1.0, 2.5), metavar=("MIN", "MAX"))
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--measure-only", action="store_true")
    parser.add_argument("--out", default="docs/lcm_lora.json")
    args = parser.parse_args()

    sd = StableDiffusion.default(dtype=jnp.float32)
    config = lora_train.LoRATrainConfig(
        rank=args.rank, targets=("attention", "proj", "feed_forward"), learning_rate=args.lr, steps=args.steps,
        batch_size=args.batch_size, warmup_steps=50, cache_latents=True, checkpoint_every=100, log_every=25,
    )
    distill = lcm_distill.ConsistencyDistillation(guidance_min=args.guidance[0], guidance_max=args.guidance[1])
    seconds = None  # --measure-only keeps the training run's, from --out
    if args.measure_only and Path(args.out).is_file():
        seconds = json.loads(Path(args.out).read_text()).get("train_seconds")
    if not args.measure_only:
        images, captions, _ = data.make_dataset(args.images, seed=0, image_size=sd.native_size)
        started = time.time()
        lcm_distill.distill_lcm_lora(sd, images, captions, config, distill, args.workdir)
        seconds = round(time.time() - started)
        LORA_FILE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(args.workdir) / lora_train.PEFT_FILE, LORA_FILE)
        print(f"wrote {LORA_FILE} ({LORA_FILE.stat().st_size / 1e6:.1f} MB) after {seconds}s", flush=True)
    results = measure(sd, args.num_eval, batch=50)
    record = {
        "settings": {"steps": args.steps, "rank": args.rank, "learning_rate": args.lr, "batch_size": args.batch_size,
                     "images": args.images, "teacher_guidance": list(args.guidance),
                     "solver_steps": distill.solver_steps, "targets": list(config.targets)},
        "train_seconds": seconds,
        "num_captions": args.num_eval,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
