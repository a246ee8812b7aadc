"""Run in a subprocess with 8 simulated CPU devices: pmap and mesh results against one device.

Each image's computation depends only on its own inputs and key, so results are bit-identical whenever
the per-device batch has the same shape (8 devices x 1 image vs. 1 device x 1 image, pmap vs. mesh).
Between different per-device batch sizes (1 device x 8 images) XLA's CPU matmul blocking changes the
summation order, so there the check is float-rounding closeness, not bit equality.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sdjax.pipeline import StableDiffusion  # noqa: E402


def run_one_image(sd, request, index):
    """Image ``index`` of ``request`` alone, through the same executor path (its key folds in ``index``)."""
    job = sd.prepare("text_to_image", **request, output="latent")
    return sd.run(job.take(slice(index, index + 1)))


def main(model_dir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    one = StableDiffusion.from_pretrained(model_dir, dtype=jnp.float32, devices=jax.devices()[:1])
    eight = StableDiffusion.from_pretrained(model_dir, dtype=jnp.float32)
    thing = np.random.RandomState(0).randn(2, one.config.text_encoder.hidden_size).astype(np.float32) * 0.1
    for sd in (one, eight):
        sd.add_embedding(thing, "<thing>")
    # plain prompts, and prompts as people write them (#20): weights, three chunks with BREAK, an embedding
    prompts = ["a red circle", "a blue square", "a (green:1.2) triangle, " + "tall grass, " * 30 + "BREAK [sky]",
               "a white star", "a <thing>"]
    for count in (8, 5):
        request = dict(
            prompt=[prompts[i % len(prompts)] for i in range(count)],
            steps=3,
            seed=4,
            guidance_scale=[1.0 + i for i in range(count)],
            scheduler="euler_a",  # stochastic: the per-step noise must follow each image too
        )
        batched = one.text_to_image(**request, output="latent")
        # One image per call on one device: the same per-device shapes as 8 devices x 1 image.
        singles = np.concatenate([run_one_image(one, request, i) for i in range(count)])
        results = {mode: eight.text_to_image(**request, output="latent", parallel_mode=mode) for mode in ("pmap", "mesh")}
        for mode, latents in results.items():
            print(
                f"batch {count} {mode}: max |diff| vs 1-device one-by-one {np.abs(latents - singles).max():.1e}, "
                f"vs 1-device batched {np.abs(latents - batched).max():.1e}"
            )
            np.testing.assert_array_equal(latents, singles)
            np.testing.assert_allclose(latents, batched, rtol=0, atol=2e-4)
        np.testing.assert_array_equal(results["pmap"], results["mesh"])
        images = {mode: eight.text_to_image(**request, output="np", parallel_mode=mode) for mode in ("pmap", "mesh")}
        np.testing.assert_array_equal(images["pmap"], images["mesh"])
        ref_images = one.text_to_image(**request, output="np").astype(int)
        assert np.abs(images["mesh"].astype(int) - ref_images).max() <= 1
    print("MULTIDEVICE OK")


if __name__ == "__main__":
    main(sys.argv[1])
