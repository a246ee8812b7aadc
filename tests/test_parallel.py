"""The data-parallel layer: padding any batch pytree, the Executor's contract and caches, the progress display."""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from sdjax import parallel


@dataclasses.dataclass(frozen=True)
class Condition:
    pixels: jax.Array
    mask: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class Batch:
    """Shaped like the pipeline's request: array leaves, a nested dataclass, optional (None) leaves, a mode."""

    x: np.ndarray
    keys: jax.Array
    condition: Optional[Condition]
    scales: Optional[np.ndarray]
    mode: str


jax.tree_util.register_dataclass(Condition, data_fields=["pixels", "mask"], meta_fields=[])
jax.tree_util.register_dataclass(Batch, data_fields=["x", "keys", "condition", "scales"], meta_fields=["mode"])


@dataclasses.dataclass(frozen=True)
class Static:
    steps: int
    scale: float


def make_batch(count: int) -> Batch:
    rng = np.random.default_rng(count)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(3), i))(jnp.arange(count))
    condition = Condition(pixels=jnp.asarray(rng.normal(size=(count, 4, 4, 3)), jnp.float32))
    return Batch(rng.normal(size=(count, 8)).astype(np.float32), keys, condition, None, "image")


def toy_generate(params, batch: Batch, schedule, static: Static):
    noise = jax.vmap(lambda k: jax.random.normal(k, (8,)))(batch.keys)
    x = batch.x + noise * schedule["sigma"] + batch.condition.pixels.mean(axis=(1, 2, 3))[:, None]

    def step(x, s):
        return jnp.tanh(x @ params["w"]) * s + x, None

    x, _ = jax.lax.scan(step, x, schedule["steps"][: static.steps])
    return {"x": x * static.scale, "mode": jnp.full((x.shape[0],), len(batch.mode))}


PARAMS = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)) / 3, jnp.float32)}
SCHEDULE = {"steps": np.linspace(1.0, 0.1, 6).astype(np.float32), "sigma": np.float32(1.5)}


def test_pad_and_trim_any_pytree():
    batch = make_batch(3)
    padded, count = parallel.pad_batch(batch, 4)
    assert count == 3 and isinstance(padded, Batch) and padded.mode == "image" and padded.scales is None
    assert padded.condition.mask is None
    assert padded.x.shape == (4, 8) and padded.keys.shape == (4, 2) and padded.condition.pixels.shape == (4, 4, 4, 3)
    np.testing.assert_array_equal(padded.x[3], batch.x[2])  # the last example repeated
    np.testing.assert_array_equal(padded.keys[3], batch.keys[2])
    same, count = parallel.pad_batch(batch, 3)
    assert same is batch and count == 3
    trimmed = parallel.trim(padded, 3)
    assert isinstance(trimmed.x, np.ndarray) and isinstance(trimmed.condition.pixels, np.ndarray)
    np.testing.assert_array_equal(trimmed.condition.pixels, batch.condition.pixels)
    typed = jax.random.split(jax.random.key(0), 3)  # new-style key arrays pad too
    assert parallel.pad_batch({"keys": typed}, 8)[0]["keys"].shape == (8,)
    with pytest.raises(ValueError, match=r"batch arrays disagree on the number of images: \[2, 3\]"):
        parallel.pad_batch({"a": np.zeros((3, 1)), "b": np.zeros((2, 1))}, 2)


def test_bad_mode_and_bad_batch_split():
    with pytest.raises(ValueError, match="unknown parallel mode 'tpu'; accepted: mesh, pmap"):
        parallel.DataParallel(mode="tpu")
    with pytest.raises(ValueError, match="unknown parallel mode 'tpu'; accepted: mesh, pmap"):
        parallel.Executor().run(toy_generate, PARAMS, make_batch(1), SCHEDULE, static=Static(2, 1.0), mode="tpu")
    with pytest.raises(ValueError, match="unknown argument kinds"):
        parallel.DataParallel().parallelize(lambda x: x, ("weights",))


def test_data_parallel_is_a_value():
    a, b = parallel.DataParallel(), parallel.DataParallel(jax.local_devices(), "mesh")
    assert a == b and hash(a) == hash(b) and a.devices == tuple(jax.local_devices())
    assert a.num_devices == len(jax.local_devices()) and a.mesh.axis_names == ("data",)
    assert a != parallel.DataParallel(mode="pmap")


@pytest.mark.parametrize("mode", ["mesh", "pmap"])
def test_executor_runs_a_pytree_batch_and_caches_per_static(mode):
    executor = parallel.Executor()
    calls = []

    def generate(params, batch, schedule, static):
        calls.append(static)
        return toy_generate(params, batch, schedule, static)

    batch = make_batch(3)
    out = executor.run(generate, PARAMS, batch, SCHEDULE, static=Static(4, 2.0), mode=mode)
    assert calls == [Static(4, 2.0)]  # static reaches fn as itself, its fourth argument
    assert isinstance(out["x"], np.ndarray) and out["x"].shape == (3, 8)
    np.testing.assert_array_equal(out["mode"], [5, 5, 5])
    expected = jax.jit(toy_generate, static_argnums=3)(PARAMS, batch, SCHEDULE, Static(4, 2.0))["x"]
    np.testing.assert_allclose(out["x"], expected, rtol=1e-6, atol=1e-6)
    first_compile = executor.last_compile_seconds
    assert first_compile is not None and executor.compile_count() == 1

    # new values, same shapes and an equal static: no recompilation
    again = executor.run(generate, PARAMS, make_batch(3), {k: v * 0.5 for k, v in SCHEDULE.items()},
                         static=Static(4, 2.0), mode=mode)
    assert executor.compile_count() == 1 and len(calls) == 1 and executor.last_compile_seconds == first_compile
    assert not np.array_equal(again["x"], out["x"])
    executor.run(generate, PARAMS, batch, SCHEDULE, static=Static(4, 3.0), mode=mode)
    assert executor.compile_count() == 2 and calls[-1] == Static(4, 3.0)


def test_progress_display_dedupes_and_keeps_its_format(capsys):
    progress = parallel.ProgressDisplay()
    for step in (0, 0, 0, 1, 1, 2):  # each device reports every step
        progress(np.int32(step), 3)
    err = capsys.readouterr().err
    assert err == (
        "\r[##########....................] step 1/3"
        "\r[####################..........] step 2/3"
        "\r[##############################] step 3/3\n"
    )
    other = parallel.ProgressDisplay()
    other(0, 3)  # no state shared between displays
    assert capsys.readouterr().err == "\r[##########....................] step 1/3"
    a, b = parallel.Executor(), parallel.Executor()
    assert a.progress is a.progress and a.progress is not b.progress
    assert a.progress != b.progress and hash(Static(1, a.progress)) == hash(Static(1, a.progress))


def test_executor_matches_one_device_on_8_devices():
    reference.run_on_simulated_devices("multidevice_parallel.py", marker="PARALLEL MULTIDEVICE OK", timeout=300)
