"""Does the built-in model's ControlNet draw the shape a given outline shows? Mean IoU with and without it.

Held-out outlines: shapes images of the built-in data set drawn from seeds the training never used (training
uses seed 0, scripts/train_builtin_controlnet.py), their Canny edges the control image. Images whose colours
Canny cannot tell apart (red, green, blue against each other: no edge at 100/200) give no outline and are
skipped, until 100 outlines are collected. For each, the built-in model draws one image with the control and
one without (same seed, the CLI's defaults: dpmpp_2m, 25 steps, guidance 1.5), and the drawn shape's mask
(pixels nearer the shape's colour than the background's, as ``sdjax.eval`` reads shapes) is compared with the
outline's filled region (the rendered shape's own mask, coverage > 1/2) by intersection over union.

Captions: ``same`` is the outline image's own caption (the model knows shape and colours, only the control
says where and how large); ``other`` names another shape, so the control has to win over the prompt; ``empty``
is the empty prompt.

    python scripts/eval_builtin_controlnet.py                        # 100 outlines, captions same and other
    python scripts/eval_builtin_controlnet.py --captions same --json runs/cn_eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdjax import data, eval as evaluation
from sdjax.control import Control
from sdjax.controlnet import load_controlnet
from sdjax.controlnet_train import conditions_of
from sdjax.pipeline import BUILTIN_GUIDANCE_SCALE, DEFAULT_SCHEDULER, StableDiffusion

CONTROLNET = Path(__file__).resolve().parent.parent / "sdjax" / "assets" / "builtin" / "controlnet"
EVAL_SEED = 1000  # of the outlines; the ControlNet trained on seed 0's data set
IMAGE_SEED = 20_000  # generation seeds: IMAGE_SEED + i for outline i, with and without control
MIN_EDGE_PIXELS = 20  # fewer edge pixels than this: Canny found no outline
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel may be shape (sdjax.eval's)
CAPTION_MODES = ("same", "other", "empty")


def outlines(count: int, seed: int = EVAL_SEED, size: int = 64):
    """``count`` held-out shapes images with a Canny outline: (images, edge maps, filled regions, labels)."""
    images, _, labels = data.make_dataset(4 * count, seed, image_size=size)
    edges = conditions_of(images)
    keep = np.flatnonzero((edges[..., 0] > 0).sum(axis=(1, 2)) >= MIN_EDGE_PIXELS)[:count]
    if len(keep) < count:
        raise ValueError(f"only {len(keep)} of {4 * count} images have a Canny outline; ask for fewer")
    filled = np.stack([filled_region(labels[i], size) for i in keep])
    return images[keep], edges[keep], filled, [labels[i] for i in keep], int(keep[-1]) + 1


def filled_region(label: dict, size: int) -> np.ndarray:
    """The outline's filled region: the labelled shape rendered white on black, coverage > 1/2."""
    mask = data.render(label["shape"], "white", "black", label["size"], label["center"], size)
    return mask[..., 0] > 127


def _border(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])


def shape_mask(image) -> np.ndarray:
    """The drawn shape of a generated shapes image, (H, W) bool: the background is the median border colour;
    the shape the pixels nearer the shape's (median foreground) colour than the background's, refined three
    times with a 3x3 majority filter as ``sdjax.eval.analyse`` does. Empty when nothing stands out from the background."""
    pixels = np.asarray(image, np.float32)
    background = np.median(_border(pixels), axis=0)
    distance_to_background = np.linalg.norm(pixels - background, axis=-1)
    mask = distance_to_background > FOREGROUND_DISTANCE
    for _ in range(3):
        if not mask.any():
            return mask
        shape_rgb = np.median(pixels[mask], axis=0)
        mask = _majority(np.linalg.norm(pixels - shape_rgb, axis=-1) < distance_to_background)
    return mask


def _majority(mask: np.ndarray) -> np.ndarray:
    """Keeps a pixel set when at least 5 of its 3x3 neighbourhood are: removes speckle, keeps shapes."""
    padded = np.pad(mask.astype(np.int32), 1)
    h, w = mask.shape
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) >= 5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def captions_for(labels: list[dict], mode: str) -> list[str]:
    if mode == "empty":
        return [""] * len(labels)
    if mode == "same":
        return [data.caption(l["shape"], l["colour"], l["background"]) for l in labels]
    others = {s: [o for o in data.BASE_SHAPES if o != s] for s in data.BASE_SHAPES}
    return [data.caption(others[l["shape"]][i % 2], l["colour"], l["background"]) for i, l in enumerate(labels)]


def generate(sd, captions, controls, *, steps: int, guidance: float, batch: int = 50) -> np.ndarray:
    """One image per caption, image i with seed IMAGE_SEED + i; ``controls(lo, hi)`` the controls of a chunk."""
    out = []
    for lo in range(0, len(captions), batch):
        hi = min(lo + batch, len(captions))
        out.append(sd.text_to_image(captions[lo:hi], steps=steps, guidance_scale=guidance,
                                    scheduler=DEFAULT_SCHEDULER, seed=[IMAGE_SEED + i for i in range(lo, hi)],
                                    output="np", controls=controls(lo, hi)))
    return np.concatenate(out)


def run(controlnet_path=CONTROLNET, count: int = 100, modes=("same", "other"), steps: int = 25,
        guidance: float = BUILTIN_GUIDANCE_SCALE, scale: float = 1.0, grid=None) -> dict:
    sd = StableDiffusion.default(dtype=jnp.float32)
    controlnet = load_controlnet(controlnet_path, dtype=jnp.float32)
    images, edges, filled, labels, drawn = outlines(count, size=sd.native_size)
    result = {"outlines": count, "outline_images_drawn": drawn, "steps": steps, "guidance": guidance,
              "scheduler": DEFAULT_SCHEDULER, "control_scale": scale, "modes": {}}
    shown = []
    for mode in modes:
        captions = captions_for(labels, mode)
        row = {}
        for name, controls in (("with", lambda lo, hi: [Control(controlnet, edges[lo:hi], scale=scale)]),
                               ("without", lambda lo, hi: None)):
            started = time.time()
            generated = generate(sd, captions, controls, steps=steps, guidance=guidance)
            scores = [iou(shape_mask(g), f) for g, f in zip(generated, filled)]
            row[name] = {"mean_iou": float(np.mean(scores)), "share_at_least_0.8": float(np.mean(np.array(scores) >= 0.8)),
                         "adherence": evaluation.adherence(generated, captions) if mode != "empty" else None,
                         "seconds": round(time.time() - started, 1)}
            shown.append(generated[:8])
        result["modes"][mode] = row
    if grid:
        rows = [images[:8], edges[:8], np.repeat(filled[:8, ..., None] * 255, 3, -1).astype(np.uint8), *shown]
        Image.fromarray(evaluation.image_grid(np.concatenate(rows), columns=8)).save(grid)
    return result


def table(result: dict) -> str:
    lines = [f"mean IoU of the drawn shape with the outline's filled region, {result['outlines']} held-out outlines",
             f"{'caption':<8} {'with control':>13} {'without':>9}   (share with IoU >= 0.8: with / without)"]
    for mode, row in result["modes"].items():
        w, wo = row["with"], row["without"]
        lines.append(f"{mode:<8} {w['mean_iou']:>13.3f} {wo['mean_iou']:>9.3f}   "
                     f"({w['share_at_least_0.8']:.2f} / {wo['share_at_least_0.8']:.2f})")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controlnet", default=str(CONTROLNET))
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--captions", nargs="+", choices=CAPTION_MODES, default=["same", "other"])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=BUILTIN_GUIDANCE_SCALE)
    parser.add_argument("--scale", type=float, default=1.0, help="the control's conditioning scale")
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--grid", default=None, help="write a PNG: outlines, filled regions, first 8 per run")
    args = parser.parse_args()
    result = run(args.controlnet, args.count, tuple(args.captions), args.steps, args.guidance, args.scale, args.grid)
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
