"""Run in a subprocess with 2 simulated CPU devices: LoRA training data-parallel over both devices
(jit over a ``data`` mesh, the batch split between them) gives the adapter a 1-device run gives."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sdjax import data, lora_train  # noqa: E402
from sdjax.pipeline import StableDiffusion  # noqa: E402


def main(model_dir: str) -> None:
    assert jax.device_count() == 2
    sd = StableDiffusion.from_pretrained(model_dir, dtype=jnp.float32)
    images, captions, _ = data.make_dataset(4, seed=3, image_size=64)
    config = lora_train.LoRATrainConfig(rank=2, learning_rate=1e-2, steps=2, batch_size=4, cache_latents=True,
                                        text_encoder_targets=("attention",))
    one = lora_train.train_lora(sd, images, captions, config, progress=False, devices=jax.devices()[:1])
    both = lora_train.train_lora(sd, images, captions, config, progress=False, devices=jax.devices())
    pairs = [(a, b) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(both)) if np.any(a)]
    worst = max(float(np.linalg.norm(a - b) / np.linalg.norm(a)) for a, b in pairs)
    print(f"largest relative difference between 1 and 2 devices: {worst:.2e}")
    assert worst < 1e-4
    print("MULTIDEVICE LORA OK")


if __name__ == "__main__":
    main(sys.argv[1])
