import ctypes
import gc
import os
import sys

# Tests compare against the PyTorch reference in fp32 on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

import reference  # noqa: E402


# Tiny random diffusers pipelines, built once per test process and shared by every module that loads them.


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_pipeline")
    reference.save_pipeline(path)
    return path


@pytest.fixture(scope="session")
def tiny_inpaint_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_inpaint")
    reference.save_pipeline(path, unet={"in_channels": 9})
    return path


@pytest.fixture(scope="session")
def tiny_depth_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_depth")
    reference.save_pipeline(path, unet={"in_channels": 5})
    return path


# The tiny pipeline in sdjax and in diffusers, one of each per module (modules add adapters, embeddings and
# schedulers to them); a module that needs another model defines its own ``sd``.


@pytest.fixture(scope="module")
def sd(tiny_pipeline_dir):
    import jax.numpy as jnp

    from sdjax.pipeline import StableDiffusion

    return StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype=jnp.float32)


@pytest.fixture(scope="module")
def torch_pipe(tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", autouse=True)
def _return_memory_after_each_module():
    """Each module's models (GBs for the full-size ones) are garbage once it ends; hand the freed heap back to the
    OS, so that two xdist workers and the subprocesses of the last tests fit in the CI machine's memory (glibc
    keeps freed blocks otherwise, and a CI run once slowed to a crawl at the end of the suite)."""
    yield
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
