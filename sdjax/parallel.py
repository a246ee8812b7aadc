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
    """A one-line step counter on stderr, advanced by the host between chunks of the denoising loop
    (``Executor.run_in_chunks``); repeated reports of a step are shown once."""

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


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch: compile or cache read
_CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"  # before XLA compiles what the cache lacks
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileWatch:
    """Counts what XLA really compiles while active, from JAX's monitoring events: programs read from
    the persistent compilation cache are not compiles. ``announce`` (if given) is called once, with no
    argument, just before the first real compile starts when the persistent cache is on (its miss event
    comes first); without the cache every new program is compiled, and the caller knows that beforehand."""

    def __init__(self, announce: Optional[Callable[[], None]] = None):
        self.announce = announce
        self.programs = 0  # compiled or read from the persistent cache
        self.cache_hits = 0
        self.seconds = 0.0

    @property
    def compiles(self) -> int:
        return self.programs - self.cache_hits

    def _on_event(self, event: str, **_) -> None:
        if event == _CACHE_HIT_EVENT:
            self.cache_hits += 1
        elif event == _CACHE_MISS_EVENT and self.announce is not None:
            self.announce()
            self.announce = None

    def _on_duration(self, event: str, duration: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.programs += 1
            self.seconds += duration

    def __enter__(self) -> "CompileWatch":
        jax.monitoring.register_event_listener(self._on_event)
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        return self

    def __exit__(self, *exc) -> None:
        from jax._src import monitoring  # the public module has no unregister functions

        monitoring.unregister_event_listener(self._on_event)
        monitoring.unregister_event_duration_listener(self._on_duration)


class Executor:
    """Compiles and runs generate functions on ``devices`` (default: all local devices).

    Compiled functions are cached per (function, data-parallel setup, static argument); parameters are
    placed once per parameter tree and mode, and reused: the classic flow of placing the weights once, then
    generating many batches. ``progress`` is this executor's step display. With ``verbose``, a message says
    when XLA really compiles (not when a program comes from the persistent compilation cache) and how long
    it took.
    """

    def __init__(self, devices: Optional[Sequence[jax.Device]] = None, verbose: bool = False):
        self.devices = tuple(devices) if devices is not None else tuple(jax.local_devices())
        self.verbose = verbose
        self.progress = ProgressDisplay()
        self.last_compile_seconds: Optional[float] = None
        self.last_xla_compiles = 0  # programs XLA compiled during the last run (cache reads excluded)
        self._compiled: dict[tuple, Callable] = {}
        self._seen_signatures: set = set()
        self._pmap_signatures: set = set()
        self._placed_params: dict[str, tuple[Any, DataParallel, Any]] = {}  # mode -> (params, where, placed)

    def _function(self, fn: Callable, parallel: DataParallel, static: Hashable, kinds: tuple) -> Callable:
        key = (fn, parallel, static)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = parallel.parallelize(lambda p, b, s, *rest: fn(p, b, s, static, *rest), kinds)
            self._compiled[key] = compiled
        return compiled

    def _watch(self, signature) -> tuple[bool, CompileWatch]:
        first = signature not in self._seen_signatures
        cache_on = jax.config.jax_compilation_cache_dir is not None

        def announce():
            print("compiling (XLA; first run of this shape, step count and sampler)...", file=sys.stderr,
                  flush=True)

        if first and self.verbose and not cache_on:
            announce()
        return first, CompileWatch(announce if self.verbose and cache_on else None)

    def _report(self, signature, parallel: DataParallel, first: bool, watch: CompileWatch, start: float) -> None:
        self.last_xla_compiles = watch.compiles
        if first:
            self._seen_signatures.add(signature)
            if parallel.mode == "pmap":
                self._pmap_signatures.add(signature)
            self.last_compile_seconds = time.perf_counter() - start
            if self.verbose and watch.compiles:
                print(f"compiled in {watch.seconds:.1f}s (kept in the compilation cache when it is on)",
                      file=sys.stderr, flush=True)

    def run(self, fn: Callable, params, batch, schedule, *, static: Hashable, mode: Optional[str] = None):
        """``fn(params, batch, schedule, static)`` on the devices; returns its outputs as numpy.

        ``batch`` is any pytree whose leaves all have the examples on the leading axis; it is padded to a
        multiple of the device count and the outputs trimmed back. ``static`` (hashable) is compiled in.
        ``mode``: "mesh" (default) or "pmap"."""
        parallel = DataParallel(self.devices, mode or "mesh")
        padded, count = pad_batch(batch, parallel.num_devices)
        compiled = self._function(fn, parallel, static, ("params", "batch", "broadcast"))
        signature = ((fn, parallel, static), _shapes(padded), _shapes(schedule))
        first, watch = self._watch(signature)
        start = time.perf_counter()
        with watch:
            out = compiled(
                self._params_for(parallel, params), parallel.place_batch(padded), parallel.place_broadcast(schedule)
            )
            out = jax.block_until_ready(parallel.unshard_batch(out))
        self._report(signature, parallel, first, watch, start)
        return trim(out, count)

    def run_in_chunks(
        self,
        stages: "Stages",
        params,
        batch,
        schedule,
        *,
        static: Hashable,
        total: int,
        chunk: int,
        progress: Optional[Callable[[int, int], None]] = None,
        mode: Optional[str] = None,
    ):
        """``stages.begin``, then ``stages.advance`` once per ``chunk`` of the ``total`` loop iterations, then
        ``stages.finish``, as three compiled programs; the carry stays on the devices between them and
        ``progress(last_index_done, total)`` is called on the host after each chunk. Unlike a host callback
        inside one program, this keeps every program eligible for JAX's persistent compilation cache.

        ``begin(params, batch, schedule, static) -> carry``; ``advance(params, batch, schedule, (static, chunk),
        carry, first_index) -> carry`` (``first_index`` a traced int32: every chunk is the same program);
        ``finish(params, batch, schedule, static, carry) -> outputs``. Returns the outputs as ``run`` does."""
        parallel = DataParallel(self.devices, mode or "mesh")
        padded, count = pad_batch(batch, parallel.num_devices)
        kinds = ("params", "batch", "broadcast")
        begin = self._function(stages.begin, parallel, static, kinds)
        advance = self._function(stages.advance, parallel, (static, chunk), kinds + ("batch", "broadcast"))
        finish = self._function(stages.finish, parallel, static, kinds + ("batch",))
        signature = ((stages, parallel, static, chunk), _shapes(padded), _shapes(schedule))
        first, watch = self._watch(signature)
        start = time.perf_counter()
        with watch:
            placed = (self._params_for(parallel, params), parallel.place_batch(padded),
                      parallel.place_broadcast(schedule))
            carry = begin(*placed)
            for index in range(0, total, chunk):
                carry = jax.block_until_ready(advance(*placed, carry, parallel.place_broadcast(np.int32(index))))
                if progress is not None:
                    progress(min(index + chunk, total) - 1, total)
            out = jax.block_until_ready(parallel.unshard_batch(finish(*placed, carry)))
        self._report(signature, parallel, first, watch, start)
        return trim(out, count)

    def compile_count(self) -> int:
        """How many executables the cached functions hold (for tests that check nothing recompiles); a pmap
        function keeps no count, so for those it is the distinct input shapes they ran on."""
        counted = sum(f._cache_size() for f in self._compiled.values() if hasattr(f, "_cache_size"))
        return counted + len(self._pmap_signatures)

    def _params_for(self, parallel: DataParallel, params):
        cached = self._placed_params.get(parallel.mode)
        if cached is None or cached[0] is not params or cached[1] != parallel:
            cached = (params, parallel, parallel.place_params(params))
            self._placed_params[parallel.mode] = cached
        return cached[2]


@dataclasses.dataclass(frozen=True)
class Stages:
    """A computation in three compiled parts for ``Executor.run_in_chunks``: ``begin`` makes the carry,
    ``advance`` moves it one chunk on, ``finish`` turns it into the outputs."""

    begin: Callable
    advance: Callable
    finish: Callable


def _shapes(tree) -> tuple:
    """What decides whether a call compiles anew: the tree structure and every leaf's shape and dtype."""
    leaves = jax.tree.leaves(tree)
    return jax.tree.structure(tree), tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__))) for x in leaves)
