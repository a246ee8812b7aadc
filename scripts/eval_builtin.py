"""Prompt adherence of a model on the shapes grammar, per sampler, read back by sdjax.eval's analyser.

    python scripts/eval_builtin.py --model sdjax/assets/builtin --num 200 --out docs/builtin_eval.json

Captions are drawn from the grammar with a seed not used in training; each sampler runs the same
captions and seeds. Writes a JSON table and a grid of the first images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
from PIL import Image

from sdjax import data
from sdjax.eval import generate_and_score, image_grid
from sdjax.pipeline import BUILTIN_GUIDANCE_SCALE, StableDiffusion

SAMPLERS = ("dpmpp_2m", "ddim", "euler_a", "pndm")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="diffusers folder (default: the built-in model)")
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--caption-seed", type=int, default=12345, help="captions: a seed training never used")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=BUILTIN_GUIDANCE_SCALE)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    parser.add_argument("--out", default="docs/builtin_eval.json")
    parser.add_argument("--grid", default="docs/builtin_grid.png")
    args = parser.parse_args()

    sd = StableDiffusion.default(dtype=jnp.float32) if args.model is None else StableDiffusion.from_pretrained(
        args.model, dtype=jnp.float32
    )
    captions = data.random_captions(args.num, seed=args.caption_seed)
    results = {}
    for sampler in args.samplers:
        start = time.time()
        scores, images = generate_and_score(
            sd, captions, scheduler=sampler, steps=args.steps, guidance_scale=args.guidance, seed=args.caption_seed
        )
        scores["seconds"] = round(time.time() - start, 1)
        results[sampler] = scores
        print(f"{sampler}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()),
              flush=True)
        if sampler == args.samplers[0] and args.grid:
            Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image_grid(images[:32], columns=8)).save(args.grid)
    report = {"num_captions": args.num, "steps": args.steps, "guidance_scale": args.guidance,
              "caption_seed": args.caption_seed, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
