"""Image-to-image and inpainting on 8 simulated CPU devices (pmap and mesh) give a 1-device run's latents."""

import os
import subprocess
import sys
from pathlib import Path

import reference


def test_image_modes_on_pmap_and_mesh_match_one_device(tmp_path):
    reference.save_pipeline(tmp_path / "model")
    script = Path(__file__).with_name("multidevice_image_modes.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model")], capture_output=True, text=True, env=env, timeout=1200
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stderr[-5000:]
    assert "MULTIDEVICE IMAGE MODES OK" in result.stdout
