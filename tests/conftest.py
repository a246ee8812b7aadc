import os
import sys
import tempfile

# Tests compare against the PyTorch reference in fp32 on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent compilation cache for this run's xdist workers, the subprocesses they start and the notebook
# kernels: many tests compile the same small models in different processes. A new directory per run keeps
# each run's timings and behaviour independent of the last.
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"sdjax-test-jax-cache-{_run}"))
sys.path.insert(0, os.path.dirname(__file__))
