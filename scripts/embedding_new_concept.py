"""Teach the built-in model a new word by textual inversion, and measure prompt adherence before and after.

Only the new token's vectors train (``sdjax.embedding_train``); the text encoder, U-Net and VAE stay frozen,
so the model can only learn what its frozen U-Net and decoder can already draw when prompted right. The
built-in model was trained without the colour "purple" and the shape "star" (sdjax.data.BASE_COLOURS,
BASE_SHAPES); "triangle" is a shape it knows, under a new name. The data generator renders images of the
concept with captions naming it by the new token, e.g. "a red <zigzag> on a blue background", and the image
analyser scores generated images for prompts with the token against the concept's real name:

    python scripts/embedding_new_concept.py --concept star
    python scripts/embedding_new_concept.py --concept triangle --steps 200

It prints one JSON object: the share of images showing the concept's attribute, and all three attributes,
before (the token holding its initialisation word) and after training, and the training time.
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp

from sdjax import data, embedding_train, eval as evaluation
from sdjax.pipeline import BUILTIN_GUIDANCE_SCALE, StableDiffusion

# concept -> (attribute, data-set arguments that render it, default token, initialisation word)
CONCEPTS = {
    "star": ("shape", {"shapes": ("star",)}, "<zigzag>", "circle"),
    "purple": ("colour", {"colours": ("purple",)}, "<violetish>", "blue"),
    "triangle": ("shape", {"shapes": ("triangle",)}, "<pointy>", "circle"),
}


def _with_token(captions, concept: str, token: str) -> list[str]:
    return [c.replace(f" {concept} ", f" {token} ") for c in captions]


def measure(sd, captions: list[str], token: str, concept: str, *, steps: int, guidance: float, seed: int) -> dict:
    prompts = _with_token(captions, concept, token)
    images = sd.text_to_image(prompts, steps=steps, guidance_scale=guidance, scheduler="dpmpp_2m",
                              seed=[seed + i for i in range(len(prompts))], output="np")
    return evaluation.adherence(images, captions)


def run(concept: str = "star", *, steps: int = 400, learning_rate: float = 5e-2, batch_size: int = 32,
        num_vectors: int = 2, images: int = 512, eval_prompts: int = 64, sample_steps: int = 20,
        guidance: float = BUILTIN_GUIDANCE_SCALE, seed: int = 0, progress: bool = True) -> dict:
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; accepted: {', '.join(CONCEPTS)}")
    attribute, choice, token, init_word = CONCEPTS[concept]
    sd = StableDiffusion.default(dtype=jnp.float32)
    kwargs = {"shapes": data.BASE_SHAPES, "colours": data.BASE_COLOURS, **choice}
    pixels, captions, _ = data.make_dataset(images, seed, image_size=sd.native_size, **kwargs)
    eval_captions = data.random_captions(eval_prompts, seed + 2, **kwargs)
    config = embedding_train.EmbeddingTrainConfig(
        token=token, init_word=init_word, num_vectors=num_vectors, learning_rate=learning_rate, steps=steps,
        batch_size=batch_size, warmup_steps=min(20, steps // 10), cache_latents=True, seed=seed,
        log_every=max(1, steps // 20))
    score = dict(steps=sample_steps, guidance=guidance, seed=10_000)

    sd.add_embedding(embedding_train.initial_vectors(sd, init_word, num_vectors), token)
    before = measure(sd, eval_captions, token, concept, **score)
    started = time.time()
    embedding_train.train_embedding(sd, pixels, _with_token(captions, concept, token), config, progress=progress)
    seconds = time.time() - started
    after = measure(sd, eval_captions, token, concept, **score)
    return {
        "concept": concept, "attribute": attribute, "token": token, "init_word": init_word,
        "before": {"attribute": before[attribute], "all": before["all"]},
        "after": {"attribute": after[attribute], "all": after["all"]},
        "train_seconds": round(seconds, 1),
        "settings": {"steps": steps, "learning_rate": learning_rate, "batch_size": batch_size,
                     "num_vectors": num_vectors, "images": images, "eval_prompts": eval_prompts,
                     "sample_steps": sample_steps, "guidance": guidance},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", choices=tuple(CONCEPTS), default="star")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vectors", type=int, default=2)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run(args.concept, steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size,
                 num_vectors=args.vectors, eval_prompts=args.eval_prompts, seed=args.seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
