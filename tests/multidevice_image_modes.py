"""Run in a subprocess with 8 simulated CPU devices: image-to-image and inpainting batches on pmap and
mesh against a 1-device run (per-image images, masks, seeds and strengths)."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sdjax.data import render  # noqa: E402
from sdjax.pipeline import StableDiffusion  # noqa: E402

SHAPES = [("circle", "red", "blue"), ("square", "green", "white"), ("triangle", "yellow", "black")]


def inputs(count: int):
    images = [render(*SHAPES[i % 3], 0.4 + 0.05 * i, (0.5, 0.5)) for i in range(count)]
    masks = []
    for i in range(count):
        mask = np.zeros((64, 64), np.uint8)
        mask[8 + 2 * i : 40 + 2 * i, 16:48] = 255
        masks.append(mask)
    return images, masks


def main(model_dir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    one = StableDiffusion.from_pretrained(model_dir, dtype=jnp.float32, devices=jax.devices()[:1])
    eight = StableDiffusion.from_pretrained(model_dir, dtype=jnp.float32)
    for count in (8, 5):
        images, masks = inputs(count)
        common = dict(
            prompt=[f"a shape number {i}" for i in range(count)],
            image=images,
            steps=4,
            seed=[10 + i for i in range(count)],
            strength=[(0.3, 0.6, 1.0)[i % 3] for i in range(count)],
            guidance_scale=[1.0 + i for i in range(count)],
            output="latent",
        )
        runs = {
            "img2img": lambda sd, **kw: sd.image_to_image(**common, scheduler="euler_a", **kw),  # stochastic
            "inpaint": lambda sd, **kw: sd.inpaint(mask=masks, **common, scheduler="pndm", **kw),
        }
        for name, run in runs.items():
            reference = run(one)
            for mode in ("pmap", "mesh"):
                latents = run(eight, parallel_mode=mode)
                # Per-image relative error: a different per-device batch only changes float rounding
                # (~1e-7); a wrong key, strength or mask for an image changes it completely.
                errors = [
                    float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)) for ours, ref in zip(latents, reference)
                ]
                print(f"{name} batch {count} {mode}: max per-image rel err {max(errors):.2e}")
                assert latents.shape == reference.shape and max(errors) < 1e-4, errors
    print("MULTIDEVICE IMAGE MODES OK")


if __name__ == "__main__":
    main(sys.argv[1])
