"""Train the built-in model's Canny ControlNet on the shapes data set and write it beside the model.

The ControlNet (``sdjax.controlnet_train``) learns to draw the shape a Canny edge map outlines: its training
pairs are shapes images (``sdjax.data.make_dataset``, the built-in model's own data) and their Canny edges
(``sdjax.preprocess.canny``, OpenCV's defaults 100/200), captions dropped half the time. The written
folder (``sdjax/assets/builtin/controlnet``, fp16 weights) is what ``sdjax generate --control canny:IMAGE``
uses with the built-in model; checkpoints in ``--workdir`` make an interrupted run resume. The shipped weights
are 3000 steps at 1e-3, then resumed at 3e-4 to 4500 (about 36 minutes of training on two CPU cores):

    python scripts/train_builtin_controlnet.py
    python scripts/train_builtin_controlnet.py --steps 4500 --lr 3e-4
    python scripts/eval_builtin_controlnet.py        # IoU of the drawn shape with the outline's filled region
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from sdjax import controlnet_train, data
from sdjax.controlnet import save_controlnet
from sdjax.pipeline import StableDiffusion

OUT = Path(__file__).resolve().parent.parent / "sdjax" / "assets" / "builtin" / "controlnet"
# Small enough for a 64x64 model, four levels so the 64x64 condition image meets the 8x8 latents.
CHANNELS = (16, 32, 64, 128)
TRAIN_SEED = 0  # the data set; scripts/eval_builtin_controlnet.py draws its outlines from other seeds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--workdir", default="runs/builtin_controlnet", help="checkpoint, loss log, summary")
    parser.add_argument("--num-images", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--caption-dropout", type=float, default=0.5)
    parser.add_argument("--high-noise-share", type=float, default=0.5,
                        help="examples with a timestep from --high-noise-from up (ControlNetTrainConfig)")
    parser.add_argument("--high-noise-from", type=int, default=500)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="of the written weights")
    args = parser.parse_args()

    started = time.time()
    sd = StableDiffusion.default(dtype=jnp.float32)
    images, captions, _ = data.make_dataset(args.num_images, TRAIN_SEED, image_size=sd.native_size)
    conditions = controlnet_train.conditions_of(images, "canny")
    config = controlnet_train.ControlNetTrainConfig(
        conditioning_embedding_out_channels=CHANNELS, learning_rate=args.lr, steps=args.steps,
        batch_size=args.batch_size, warmup_steps=args.warmup, caption_dropout=args.caption_dropout,
        high_noise_share=args.high_noise_share, high_noise_from=args.high_noise_from, cache_latents=True,
        checkpoint_every=args.checkpoint_every, log_every=20)
    controlnet = controlnet_train.train_controlnet(sd, images, conditions, captions, config, args.workdir)

    dtype = jnp.dtype(args.dtype)
    shipped = dataclasses.replace(controlnet, params=jax.tree.map(lambda x: x.astype(dtype), controlnet.params),
                                  dtype=dtype)
    save_controlnet(shipped, args.out)
    log = [json.loads(line) for line in (Path(args.workdir) / "loss.jsonl").read_text().splitlines()]
    summary = {"seconds": round(time.time() - started), "final_loss": log[-1]["loss"], "steps": args.steps,
               "args": vars(args), "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__}
    (Path(args.workdir) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
