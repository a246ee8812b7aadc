"""The one data-parallel layer, used by generation and training: a ``data`` mesh axis over the local devices.

A ``DataParallel`` value says which devices and how: ``"mesh"`` (``jax.jit`` over a ``jax.sharding.Mesh``,
placements as ``NamedSharding``; the default) or ``"pmap"`` (a thin compatibility mode, since JAX keeps
``jax.pmap`` in maintenance only). Every tree an executed function takes is placed by the function for its
kind, and ``parallelize`` compiles the function to match:

- ``place_params``: weights and training states, held on the devices across calls (a whole copy per device);
- ``place_batch``: per-example data, split on the leading axis between the devices;
- ``place_broadcast``: small per-call values every device reads whole (a schedule, a key).

A batch that does not divide by the device count is padded (``pad_batch``, repeating its last example) and
the results cut back (``trim``); each example's result depends only on its own inputs and key, so results
are the same whatever the device count or mode. Multiple processes (a global mesh) and a parameter-sharding
``fsdp`` axis are meant to extend the placement functions and ``parallelize``, not their callers.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Callable, Hashable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MODES = ("mesh", "pmap")
DATA_AXIS = "data"
KINDS = ("params", "batch", "broadcast")  # how each argument of a parallelized function is placed


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Data parallelism over ``devices`` (default: all local devices) in ``mode`` ("mesh" or "pmap")."""

    devices: Optional[Sequence[jax.Device]] = None
    mode: str = "mesh"

    def __post_init__(self):
        devices = tuple(self.devices) if self.devices is not None else tuple(jax.local_devices())
        if not devices:
            raise ValueError("DataParallel needs at least one device")
        object.__setattr__(self, "devices", devices)
        if self.mode not in MODES:
            raise ValueError(f"unknown parallel mode {self.mode!r}; accepted: {', '.join(MODES)}")

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @functools.cached_property
    def mesh(self) -> Mesh:
        return Mesh(np.asarray(self.devices), (DATA_AXIS,))

    # --- placement: one function per kind of tree ------------------------------------------------------

    def place_params(self, tree):
        """A whole copy of every leaf on every device: a replicated ``NamedSharding`` on the mesh; under
        pmap, stacked on a leading device axis (what ``in_axes=0`` takes; ``unreplicate`` undoes it)."""
        if self.mode == "pmap":
            sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

            def stack(x):
                x = jnp.asarray(x)
                return jax.device_put(jnp.broadcast_to(x[None], (self.num_devices,) + x.shape), sharding)

            return jax.tree.map(stack, tree)
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def place_batch(self, tree):
        """Split every leaf on its leading (example) axis between the devices: ``NamedSharding`` over the
        ``data`` axis on the mesh; under pmap, reshaped to (devices, per_device, ...)."""
        n = self.num_devices

        def check(x):
            if x.shape[0] % n:
                raise ValueError(f"batch size {x.shape[0]} is not divisible by the {n} devices")
            return x

        tree = jax.tree.map(check, tree)
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), tree)
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec(DATA_AXIS)))

    def place_broadcast(self, tree):
        """Replicated on the mesh; under pmap left as it is (``in_axes=None`` hands it to every device).
        Uncommitted arrays may also be passed unplaced: ``jax.jit`` places them itself."""
        if self.mode == "pmap":
            return tree
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def unreplicate(self, tree):
        """One copy of a tree placed by ``place_params`` (or returned in that layout)."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x[0], tree)
        return tree

    def unshard_batch(self, tree):
        """Per-example results back to one leading example axis (undoes ``place_batch``'s layout)."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)
        return tree

    # --- compiling ------------------------------------------------------------------------------------------

    def parallelize(self, fn: Callable, kinds: Sequence[str], *, donate_argnums=()) -> Callable:
        """``fn`` compiled to run on the devices: ``jax.jit`` (the placements carry the shardings) or
        ``jax.pmap`` with axis name ``data``. ``kinds`` names how each positional argument is placed:
        "params", "batch" or "broadcast" (placed by ``place_params``, ``place_batch``, ``place_broadcast``)."""
        unknown = [kind for kind in kinds if kind not in KINDS]
        if unknown:
            raise ValueError(f"unknown argument kinds {unknown}; accepted: {', '.join(KINDS)}")
        if self.mode == "pmap":
            in_axes = tuple(None if kind == "broadcast" else 0 for kind in kinds)
            return jax.pmap(fn, axis_name=DATA_AXIS, in_axes=in_axes, donate_argnums=donate_argnums,
                            devices=self.devices)
        return jax.jit(fn, donate_argnums=donate_argnums)


def batch_size(tree) -> int:
    """The number of examples in a batch: the leading size every leaf shares."""
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays disagree on the number of images: {sorted(sizes)}")
    return sizes.pop()


def pad_batch(tree, multiple: int) -> tuple[Any, int]:
    """The batch grown to a multiple of ``multiple`` examples by repeating its last one, and its real size."""
    count = batch_size(tree)
    extra = -count % multiple
    if not extra:
        return tree, count

    def pad(x):
        xp = np if isinstance(x, np.ndarray) else jnp
        return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)])

    return jax.tree.map(pad, tree), count


def trim(tree, count: int):
    """Results as numpy, cut back to the first ``count`` examples (drops what ``pad_batch`` added)."""
    return jax.tree.map(lambda x: np.asarray(x)[:count], tree)


class ProgressDisplay:
    """A one-line step counter fed from inside the scan through ``jax.debug.callback``; every device reports
    the same step, so repeats are shown once. Hashable by identity, so it can sit in a static argument."""

    width = 30

    def __init__(self):
        self.last: Optional[tuple[int, int]] = None

    def __call__(self, step, total) -> None:
        step, total = int(step), int(total)
        if (step, total) == self.last:
            return
        self.last = (step, total)
        done = int(self.width * (step + 1) / max(total, 1))
        end = "\n" if step + 1 >= total else ""
        bar = "#" * done + "." * (self.width - done)
        print(f"\r[{bar}] step {step + 1}/{total}", end=end, file=sys.stderr, flush=True)


class Executor:
    """Compiles and runs generate functions on ``devices`` (default: all local devices).

    Compiled functions are cached per (function, data-parallel setup, static argument); parameters are
    placed once per parameter tree and mode, and reused: the classic flow of placing the weights once, then
    generating many batches. ``progress`` is this executor's step display, for generate functions to call.
    """

    def __init__(self, devices: Optional[Sequence[jax.Device]] = None, verbose: bool = False):
        self.devices = tuple(devices) if devices is not None else tuple(jax.local_devices())
        self.verbose = verbose
        self.progress = ProgressDisplay()
        self.last_compile_seconds: Optional[float] = None
        self._compiled: dict[tuple, Callable] = {}
        self._seen_signatures: set = set()
        self._placed_params: dict[str, tuple[Any, DataParallel, Any]] = {}  # mode -> (params, where, placed)

    def run(self, fn: Callable, params, batch, schedule, *, static: Hashable, mode: Optional[str] = None):
        """``fn(params, batch, schedule, static)`` on the devices; returns its outputs as numpy.

        ``batch`` is any pytree whose leaves all have the examples on the leading axis; it is padded to a
        multiple of the device count and the outputs trimmed back. ``static`` (hashable) is compiled in.
        ``mode``: "mesh" (default) or "pmap"."""
        parallel = DataParallel(self.devices, mode or "mesh")
        padded, count = pad_batch(batch, parallel.num_devices)
        key = (fn, parallel, static)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = parallel.parallelize(lambda p, b, s: fn(p, b, s, static), ("params", "batch", "broadcast"))
            self._compiled[key] = compiled
        signature = (key, _shapes(padded), _shapes(schedule))
        first = signature not in self._seen_signatures
        if first and self.verbose:
            print("compiling (first call for this shape, step count and sampler)...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        out = compiled(
            self._params_for(parallel, params), parallel.place_batch(padded), parallel.place_broadcast(schedule)
        )
        out = jax.block_until_ready(parallel.unshard_batch(out))
        if first:
            self._seen_signatures.add(signature)
            self.last_compile_seconds = time.perf_counter() - start
            if self.verbose:
                print(f"compiled and ran in {self.last_compile_seconds:.1f}s", file=sys.stderr, flush=True)
        return trim(out, count)

    def compile_count(self) -> int:
        """How many executables the cached functions hold (for tests that check nothing recompiles); a pmap
        function keeps no count, so for those it is the distinct input shapes they ran on."""
        counted = {key: f._cache_size() for key, f in self._compiled.items() if hasattr(f, "_cache_size")}
        uncounted = sum(1 for signature in self._seen_signatures if signature[0] not in counted)
        return sum(counted.values()) + uncounted

    def _params_for(self, parallel: DataParallel, params):
        cached = self._placed_params.get(parallel.mode)
        if cached is None or cached[0] is not params or cached[1] != parallel:
            cached = (params, parallel, parallel.place_params(params))
            self._placed_params[parallel.mode] = cached
        return cached[2]


def _shapes(tree) -> tuple:
    """What decides whether a call compiles anew: the tree structure and every leaf's shape and dtype."""
    leaves = jax.tree.leaves(tree)
    return jax.tree.structure(tree), tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__))) for x in leaves)
