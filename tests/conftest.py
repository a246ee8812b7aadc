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
