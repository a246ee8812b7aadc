"""pmap and mesh generation on 8 simulated CPU devices give the images of a 1-device run."""

import os
import subprocess
import sys
from pathlib import Path

import reference


def test_pmap_and_mesh_match_one_device(tmp_path):
    reference.save_pipeline(tmp_path / "model")
    script = Path(__file__).with_name("multidevice_generate.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model")], capture_output=True, text=True, env=env, timeout=900
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stderr[-5000:]
    assert "MULTIDEVICE OK" in result.stdout
