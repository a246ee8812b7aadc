"""JAX's multi-controller runtime for sdjax: one process per host, every process running the same program.

    import sdjax
    sdjax.distributed.initialize()                                          # Cloud TPU, Slurm, Open MPI
    sdjax.distributed.initialize("10.0.0.1:1234", num_processes=4, process_id=rank)   # anywhere else

``initialize`` is ``jax.distributed.initialize`` with the cluster detected where JAX detects it, or the three
explicit settings (all or none), checked before JAX starts. It switches JAX's CPU backend to its gloo
collectives first, so several processes on one machine (``XLA_FLAGS=--xla_force_host_platform_device_count=N``)
run the same sharded programs a pod does: that is how the tests run multi-process code without a cluster.
Call it before anything else touches JAX's devices.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax


@dataclasses.dataclass(frozen=True)
class Processes:
    """Where this process stands in the run."""

    index: int
    count: int
    local_devices: int
    global_devices: int

    @property
    def is_main(self) -> bool:
        """Process 0: the one that prints progress and writes shared files."""
        return self.index == 0


def current() -> Processes:
    return Processes(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def _check_explicit(coordinator: Optional[str], num_processes: Optional[int], process_id: Optional[int]) -> None:
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    missing = [name for name, value in given.items() if value is None]
    if missing and len(missing) < 3:
        raise ValueError(f"give coordinator, num_processes and process_id together (or none, to detect the "
                         f"cluster); missing: {', '.join(missing)}")
    if missing:
        return
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator must be HOST:PORT (the address of process 0), got {coordinator!r}")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be an integer from 0 to num_processes - 1 = {num_processes - 1}, "
                         f"got {process_id!r}")


def initialize(
    coordinator: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    local_device_ids: Optional[Sequence[int]] = None,
    timeout_s: int = 300,
) -> Processes:
    """Join the run: every process calls this with the same coordinator and count and its own id (or all
    with none, where JAX detects the cluster). A second call returns the same ``Processes``."""
    _check_explicit(coordinator, num_processes, process_id)
    if jax.distributed.is_initialized():
        return current()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)
    processes = current()
    if num_processes is not None and processes.count != num_processes:
        raise ValueError(f"JAX reports {processes.count} processes, but num_processes={num_processes} was given")
    return processes
