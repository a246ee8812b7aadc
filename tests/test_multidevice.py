"""pmap and mesh generation on 8 simulated CPU devices give the images of a 1-device run."""

import reference


def test_pmap_and_mesh_match_one_device(tmp_path):
    reference.save_pipeline(tmp_path / "model")
    reference.run_on_simulated_devices("multidevice_generate.py", tmp_path / "model", marker="MULTIDEVICE OK")
