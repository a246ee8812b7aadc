"""sdjax.distributed: two processes on localhost join one run (JAX's CPU collectives), and bad settings are
refused before JAX starts."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdjax import distributed

SCRIPT = Path(__file__).with_name("multiprocess_distributed.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_join_one_run_with_a_global_mesh():
    coordinator = f"localhost:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    runs = [subprocess.Popen([sys.executable, str(SCRIPT), coordinator, str(i)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    for i, (run, output) in enumerate(zip(runs, outputs)):
        assert run.returncode == 0 and "DISTRIBUTED OK" in output, f"process {i}:\n{output[-3000:]}"
        assert f"process {i} of 2: global sum 66.0" in output


@pytest.mark.parametrize("args, message", [
    (("localhost:1234", 2, None), "give coordinator, num_processes and process_id together"),
    ((None, 2, 0), "missing: coordinator"),
    (("localhost", 2, 0), "coordinator must be HOST:PORT"),
    (("localhost:1234", 0, 0), "num_processes must be a positive integer, got 0"),
    (("localhost:1234", 2, 2), "process_id must be an integer from 0 to num_processes - 1 = 1, got 2"),
])
def test_bad_settings_are_refused_before_jax_starts(args, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(*args)
