"""scripts/train_builtin.py end to end at toy sizes: three phases, the model it writes loads and samples,
and a second run resumes from the checkpoints instead of starting again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.pipeline import StableDiffusion

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_builtin.py"
TOY = ["--num-images", "64", "--vae-steps", "2", "--vae-batch", "8", "--decoder-images", "64",
       "--decoder-steps", "2", "--unet-batch", "8", "--caption-swap", "0.25"]


def train(out, workdir, unet_steps):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--workdir", str(workdir), "--unet-steps", str(unet_steps),
         *TOY],
        capture_output=True, text=True, env=env, timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_train_builtin_writes_a_model_and_resumes(tmp_path):
    workdir = tmp_path / "work"
    train(tmp_path / "model", workdir, unet_steps=2)
    reached = json.loads((workdir / "summary.json").read_text())["steps_reached"]
    assert reached == {"vae": 2, "decoder": 2, "denoiser": 2}

    sd = StableDiffusion.from_pretrained(tmp_path / "model", dtype=jnp.float32)
    image = sd.text_to_image("a red circle on a blue background", steps=2, seed=0, output="np")
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    # Run again: every phase resumes from its checkpoint, none starts over (and none trains further).
    log = train(tmp_path / "model2", workdir, unet_steps=2)
    for phase in ("vae", "decoder", "denoiser"):
        assert f"{phase}: resumed at step 2" in log
    first = StableDiffusion.from_pretrained(tmp_path / "model", dtype=jnp.float32).params
    second = StableDiffusion.from_pretrained(tmp_path / "model2", dtype=jnp.float32).params
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))


def test_caption_swap_outside_zero_to_one_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--workdir", str(tmp_path), "--caption-swap", "1.5"],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120,
    )
    assert result.returncode == 2
    assert "--caption-swap is a rate: got 1.5, accepted 0 to 1" in result.stderr
