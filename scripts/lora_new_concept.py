"""Teach the built-in model a concept it never saw with a LoRA, and measure prompt adherence before and after.

The built-in model was trained without the colour "purple" and the shape "star" (sdjax.data.BASE_COLOURS,
BASE_SHAPES). This script renders images of the new concept with the data generator, mixed with images of
the old concepts (so the adapter does not drift on them), trains a LoRA on the U-Net's and the text
encoder's attention layers, and scores generated images with the image analyser (sdjax.eval.adherence):

    python scripts/lora_new_concept.py --concept purple
    python scripts/lora_new_concept.py --concept star --steps 600

It prints one JSON object: the adherence on new-concept prompts (the concept's attribute, and all three
attributes) and on old prompts (all three), before and after, the training time, and the VAE ceiling: the
share of concept images the frozen VAE reconstructs recognisably, the most an adapter can reach.
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

from sdjax import data, eval as evaluation, lora_train
from sdjax.pipeline import BUILTIN_GUIDANCE_SCALE, StableDiffusion

# The attribute of a caption a concept is about, and the data-set arguments that render it.
CONCEPTS = {
    "purple": ("colour", {"colours": ("purple",)}),
    "star": ("shape", {"shapes": ("star",)}),
}


def concept_dataset(concept: str, num: int, seed: int, image_size: int):
    attribute, choice = CONCEPTS[concept]
    kwargs = {"shapes": data.BASE_SHAPES, "colours": data.BASE_COLOURS, **choice}
    images, captions, _ = data.make_dataset(num, seed, image_size=image_size, **kwargs)
    return images, captions, kwargs


def vae_ceiling(sd, concept: str, num: int = 64, seed: int = 7) -> float:
    """Share of concept images whose VAE reconstruction still shows the concept: the most any U-Net or
    text-encoder adapter can reach, since the VAE stays frozen (a VAE trained only on the base colours
    and shapes may not be able to draw the new one)."""
    attribute, _ = CONCEPTS[concept]
    images, captions, _ = concept_dataset(concept, num, seed, sd.native_size)
    mean, _ = sd.vae.apply({"params": sd.params["vae"]}, jnp.asarray(images, jnp.float32) / 127.5 - 1, method="encode")
    decoded = sd.vae.apply({"params": sd.params["vae"]}, mean, method="decode")
    decoded = np.clip((np.asarray(decoded, np.float32) + 1) * 127.5, 0, 255).round().astype(np.uint8)
    return evaluation.adherence(decoded, captions)[attribute]


def measure(sd, prompts: list[str], *, steps: int, guidance: float, seed: int, batch: int = 64) -> dict:
    images = np.concatenate([
        sd.text_to_image(prompts[i : i + batch], steps=steps, guidance_scale=guidance, scheduler="dpmpp_2m",
                         seed=[seed + i + j for j in range(len(prompts[i : i + batch]))], output="np")
        for i in range(0, len(prompts), batch)
    ])
    return evaluation.adherence(images, prompts)


def run(
    concept: str = "purple",
    *,
    model: str | None = None,
    steps: int = 400,
    rank: int = 8,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    new_images: int = 512,
    old_images: int = 512,
    eval_prompts: int = 64,
    sample_steps: int = 20,
    guidance: float = BUILTIN_GUIDANCE_SCALE,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; accepted: {', '.join(CONCEPTS)}")
    sd = StableDiffusion.default(dtype=jnp.float32) if model is None else StableDiffusion.from_pretrained(
        model, dtype=jnp.float32
    )
    size = sd.native_size
    attribute, _ = CONCEPTS[concept]
    new_images_, new_captions, kwargs = concept_dataset(concept, new_images, seed, size)
    old_images_, old_captions, _ = data.make_dataset(old_images, seed + 1, image_size=size)
    new_prompts = data.random_captions(eval_prompts, seed + 2, **kwargs)
    old_prompts = data.random_captions(eval_prompts, seed + 3)
    score = dict(steps=sample_steps, guidance=guidance, seed=10_000)

    ceiling = vae_ceiling(sd, concept)
    before_new, before_old = measure(sd, new_prompts, **score), measure(sd, old_prompts, **score)
    config = lora_train.LoRATrainConfig(
        rank=rank,
        targets=("attention",),
        text_encoder_targets=("attention",),
        learning_rate=learning_rate,
        steps=steps,
        batch_size=batch_size,
        warmup_steps=min(50, steps // 10),
        cache_latents=True,
        caption_dropout=0.1,
        seed=seed,
        log_every=max(1, steps // 20),
    )
    started = time.time()
    adapter = lora_train.train_lora(
        sd, np.concatenate([new_images_, old_images_]), new_captions + old_captions, config, progress=progress
    )
    train_seconds = time.time() - started
    sd.add_lora(adapter, 1.0, concept)
    after_new, after_old = measure(sd, new_prompts, **score), measure(sd, old_prompts, **score)
    return {
        "concept": concept,
        "attribute": attribute,
        "new_concept": {"before": before_new[attribute], "after": after_new[attribute],
                        "before_all": before_new["all"], "after_all": after_new["all"]},
        "old_concepts": {"before": before_old["all"], "after": after_old["all"]},
        "vae_ceiling": ceiling,
        "train_seconds": round(train_seconds, 1),
        "settings": {"steps": steps, "rank": rank, "learning_rate": learning_rate, "batch_size": batch_size,
                     "new_images": new_images, "old_images": old_images, "eval_prompts": eval_prompts,
                     "sample_steps": sample_steps, "guidance": guidance},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", choices=tuple(CONCEPTS), default="purple")
    parser.add_argument("--model", default=None, help="diffusers folder (default: the built-in model)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run(args.concept, model=args.model, steps=args.steps, rank=args.rank, learning_rate=args.lr,
                 batch_size=args.batch_size, eval_prompts=args.eval_prompts, seed=args.seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
