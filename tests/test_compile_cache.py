"""The CLI's progress display keeps JAX's persistent compilation cache working: a second run of the same
shape compiles nothing (judged from the cache folder and JAX's compile events, not from wall time), and
the progress display's chunked loop gives the same images as one compiled program."""

import os
import subprocess
import sys

import numpy as np
import pytest

import sdjax


def _cached_programs(cache_dir) -> set[str]:
    return {p.name for p in cache_dir.iterdir() if p.name.endswith("-cache")}


def _generate(out, cache_dir):
    env = {**os.environ, "SDJAX_CACHE_DIR": str(cache_dir), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "sdjax.cli", "generate", "a red circle", "--steps", "4", "--size", "64x64",
               "--seed", "3", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_second_cli_run_with_progress_compiles_nothing(tmp_path):
    cache = tmp_path / "cache"
    first = _generate(tmp_path / "first", cache)
    assert "step 4/4" in first.stderr and "compiling" in first.stderr and "compiled in" in first.stderr
    programs = _cached_programs(cache)
    assert len(programs) >= 3  # the loop's begin, chunk and finish programs, each cacheable

    second = _generate(tmp_path / "second", cache)
    assert "step 4/4" in second.stderr
    assert "compil" not in second.stderr, second.stderr  # no compile event: every program came from the cache
    assert _cached_programs(cache) == programs
    first_png, second_png = (sorted((tmp_path / name).glob("*.png")) for name in ("first", "second"))
    assert len(first_png) == len(second_png) == 1
    assert first_png[0].read_bytes() == second_png[0].read_bytes()


@pytest.fixture(scope="module")
def builtin():
    return sdjax.StableDiffusion.default()


@pytest.mark.parametrize("scheduler", ["euler_a", "heun"])  # stochastic; two evaluations per step
def test_progress_chunks_give_the_same_images(builtin, scheduler, capsys):
    options = dict(steps=7, seed=[3, 4], scheduler=scheduler, output="np")
    whole = builtin.text_to_image(["a red circle", "a blue square"], **options)
    chunked = builtin.text_to_image(["a red circle", "a blue square"], progress=True, **options)
    np.testing.assert_array_equal(chunked, whole)
    total = 13 if scheduler == "heun" else 7
    assert f"step {total}/{total}" in capsys.readouterr().err


def test_progress_chunks_with_per_image_strength_and_inpainting(builtin):
    image = builtin.text_to_image("a red circle", steps=4, seed=1, output="np")[0]
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[8:40, 8:40] = 255
    for method, extra in [(builtin.image_to_image, dict(strength=[0.3, 0.9])), (builtin.inpaint, dict(mask=mask))]:
        options = dict(image=image, steps=6, seed=[1, 2], scheduler="dpmpp_2m", output="np", **extra)
        np.testing.assert_array_equal(method(["a", "b"], progress=True, **options), method(["a", "b"], **options))


def test_progress_run_does_not_recompile_for_new_values(builtin):
    executor = builtin.executor
    builtin.text_to_image("a", steps=5, seed=1, progress=True, output="np")
    before = executor.compile_count()
    builtin.text_to_image("b", steps=5, seed=2, guidance_scale=3.0, progress=True, output="np")
    assert executor.compile_count() == before and executor.last_xla_compiles == 0
