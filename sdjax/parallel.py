"""Running a pure generate function on all local devices: ``jax.pmap`` or ``jax.jit`` over a ``data`` mesh.

Both modes take the same function ``fn(params, batch, schedule, **static)``, where every array in
``batch`` has the images on its leading axis. A batch that does not divide by the device count is
padded (by repeating its last image) and the outputs trimmed, so any batch size runs on any number
of devices. Each image's result depends only on its own inputs and key, so the images are the same
whatever the device count or mode.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MODES = ("mesh", "pmap")


class Executor:
    """Compiles and runs generate functions; caches compiled functions and device-placed parameters.

    Parameters are placed once per (parameter tree, mode) and reused: the classic Colab flow of
    replicating weights once, then generating many batches.
    """

    def __init__(self, devices=None, verbose: bool = False):
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.verbose = verbose
        self._compiled: dict[tuple, Callable] = {}
        self._seen_signatures: set = set()
        self._placed_params: dict[str, tuple[Any, Any]] = {}
        self.last_compile_seconds: Optional[float] = None

    @property
    def mesh(self) -> Mesh:
        return Mesh(np.asarray(self.devices), ("data",))

    def run(self, fn: Callable, params, batch: dict, schedule, *, static: dict, mode: Optional[str] = None):
        mode = mode or "mesh"
        if mode not in MODES:
            raise ValueError(f"unknown parallel mode {mode!r}; accepted: {', '.join(MODES)}")
        count = _batch_size(batch)
        n = len(self.devices)
        padded = _pad_batch(batch, -count % n)
        static_items = tuple(sorted(static.items()))
        signature = (fn, mode, static_items, jax.tree.map(lambda x: (x.shape, str(x.dtype)), padded))
        signature = (signature[:3], str(signature[3]), str(jax.tree.structure(schedule)))
        first = signature not in self._seen_signatures
        if first and self.verbose:
            print("compiling (first call for this shape, step count and sampler)...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        if mode == "pmap":
            out = self._run_pmap(fn, params, padded, schedule, static_items, n)
        else:
            out = self._run_mesh(fn, params, padded, schedule, static_items)
        out = jax.block_until_ready(out)
        if first:
            self._seen_signatures.add(signature)
            self.last_compile_seconds = time.perf_counter() - start
            if self.verbose:
                print(f"compiled and ran in {self.last_compile_seconds:.1f}s", file=sys.stderr, flush=True)
        return jax.tree.map(lambda x: np.asarray(x)[:count], out)

    def _params_for(self, mode: str, params, place: Callable):
        cached = self._placed_params.get(mode)
        if cached is None or cached[0] is not params:
            cached = (params, place(params))
            self._placed_params[mode] = cached
        return cached[1]

    def _run_mesh(self, fn, params, batch, schedule, static_items):
        key = ("mesh", fn, static_items)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(lambda p, b, s: fn(p, b, s, **dict(static_items)))
        mesh = self.mesh
        replicated = NamedSharding(mesh, PartitionSpec())
        placed_params = self._params_for("mesh", params, lambda p: jax.device_put(p, replicated))
        placed_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
        placed_schedule = jax.device_put(schedule, replicated)
        return self._compiled[key](placed_params, placed_batch, placed_schedule)

    def _run_pmap(self, fn, params, batch, schedule, static_items, n: int):
        key = ("pmap", fn, static_items)
        if key not in self._compiled:
            self._compiled[key] = jax.pmap(
                lambda p, b, s: fn(p, b, s, **dict(static_items)), in_axes=(0, 0, None), devices=self.devices
            )
        placed_params = self._params_for("pmap", params, lambda p: replicate(p, self.devices))
        sharded = jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)
        out = self._compiled[key](placed_params, sharded, schedule)
        return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)

    def compile_count(self) -> int:
        """How many executables the cached functions hold (for tests that check nothing recompiles)."""
        return sum(f._cache_size() for f in self._compiled.values())


def replicate(tree, devices):
    """One copy of every leaf per device, stacked on a leading axis: what ``jax.pmap`` takes for ``in_axes=0``."""
    sharding = NamedSharding(Mesh(np.asarray(devices), ("devices",)), PartitionSpec("devices"))

    def put(x):
        x = jax.numpy.asarray(x)
        return jax.device_put(jax.numpy.broadcast_to(x[None], (len(devices),) + x.shape), sharding)

    return jax.tree.map(put, tree)


def _batch_size(batch: dict) -> int:
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays disagree on the number of images: {sorted(sizes)}")
    return sizes.pop()


def _pad_batch(batch: dict, extra: int) -> dict:
    if not extra:
        return batch
    return jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]), batch)


class _Progress:
    """A one-line step counter fed from inside the scan; devices report the same step, so dedupe."""

    def __init__(self):
        self.last = None

    def __call__(self, step, total):
        step, total = int(step), int(total)
        if (step, total) == self.last:
            return
        self.last = (step, total)
        width = 30
        done = int(width * (step + 1) / max(total, 1))
        end = "\n" if step + 1 >= total else ""
        print(f"\r[{'#' * done}{'.' * (width - done)}] step {step + 1}/{total}", end=end, file=sys.stderr, flush=True)


progress_bar = _Progress()
