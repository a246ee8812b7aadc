"""Image-to-image and inpainting on 8 simulated CPU devices (pmap and mesh) give a 1-device run's latents."""

import reference


def test_image_modes_on_pmap_and_mesh_match_one_device(tmp_path):
    reference.save_pipeline(tmp_path / "model")
    reference.run_on_simulated_devices(
        "multidevice_image_modes.py", tmp_path / "model", marker="MULTIDEVICE IMAGE MODES OK", timeout=1200
    )
