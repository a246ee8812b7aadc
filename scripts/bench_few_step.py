"""Speed and prompt adherence of the built-in model with fewer U-Net calls: guidance-free runs, few steps, DeepCache.

    python scripts/bench_few_step.py --num 200 --out docs/few_step.json

Every configuration draws the same captions (a seed training never used) and seeds; adherence is read back by
sdjax.eval's analyser, images/s is timed on a second, compiled run of one batch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sdjax import data
from sdjax.eval import adherence
from sdjax.pipeline import BUILTIN_GUIDANCE_SCALE, StableDiffusion

CONFIGS = {
    "25 steps dpmpp_2m, guidance 1.5": dict(steps=25, scheduler="dpmpp_2m", guidance_scale=BUILTIN_GUIDANCE_SCALE),
    "25 steps dpmpp_2m, guidance 1.5, DeepCache (3, 0)": dict(steps=25, scheduler="dpmpp_2m",
                                                             guidance_scale=BUILTIN_GUIDANCE_SCALE, deep_cache=(3, 0)),
    "25 steps dpmpp_2m, no guidance": dict(steps=25, scheduler="dpmpp_2m", guidance_scale=None),
    "4 steps dpmpp_2m, guidance 1.5": dict(steps=4, scheduler="dpmpp_2m", guidance_scale=BUILTIN_GUIDANCE_SCALE),
    "4 steps lcm, no guidance (no distilled LoRA)": dict(steps=4, scheduler="lcm", guidance_scale=None),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--caption-seed", type=int, default=12345)
    parser.add_argument("--out", default="docs/few_step.json")
    args = parser.parse_args()

    sd = StableDiffusion.default(dtype=jnp.float32)
    captions = data.random_captions(args.num, seed=args.caption_seed)
    results = {}
    for name, options in CONFIGS.items():
        images, seconds = [], []
        for start in range(0, args.num, args.batch):
            chunk = captions[start:start + args.batch]
            seeds = [args.caption_seed + start + i for i in range(len(chunk))]
            began = time.perf_counter()
            images.extend(sd.text_to_image(chunk, seed=seeds, output="np", **options))
            seconds.append(time.perf_counter() - began)
        steady = seconds[1:] or seconds  # the first batch compiles
        scores = adherence(np.stack(images), captions)
        scores["images_per_second"] = round(args.batch / (sum(steady) / len(steady)), 2)
        results[name] = scores
        print(f"{name}: all {scores['all']:.3f}, shape {scores['shape']:.3f}, "
              f"{scores['images_per_second']} images/s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"num_captions": args.num, "batch": args.batch, "results": results},
                                         indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
