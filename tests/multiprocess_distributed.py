"""One of two processes on localhost, 2 simulated CPU devices each (tests/test_distributed.py starts both):
``sdjax.distributed.initialize`` joins them, a global mesh spans the 4 devices, each process feeds only its
own rows, and a jitted sum over the global array sees every row."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from sdjax import distributed  # noqa: E402


def main(coordinator: str, process_id: int) -> None:
    processes = distributed.initialize(coordinator, num_processes=2, process_id=process_id, timeout_s=120)
    assert processes == distributed.Processes(process_id, 2, 2, 4), processes
    assert distributed.initialize(coordinator, 2, process_id) == processes  # joining twice changes nothing
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    rows = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    mine = rows[2 * process_id: 2 * process_id + 2]  # this process's half of the global batch
    global_rows = jax.make_array_from_process_local_data(sharding, mine, rows.shape)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(global_rows)
    print(f"process {processes.index} of {processes.count}: global sum {float(total)}", flush=True)
    assert float(total) == float(rows.sum())
    print("DISTRIBUTED OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
