"""The public names DESIGN.md promises, at the top level of the package."""

import sdjax


def test_top_level_names():
    for name in ("StableDiffusion", "ModelConfig", "UNetConfig", "VAEConfig", "CLIPTextConfig", "SchedulerConfig",
                 "SD15", "SD15_INPAINT", "SD21_BASE", "SD21_V", "SD2_DEPTH"):
        assert hasattr(sdjax, name), name
    for method in ("from_pretrained", "from_single_file", "default", "save_pretrained", "save_single_file",
                   "text_to_image", "image_to_image", "inpaint", "depth_to_image", "load_lora", "fuse_lora",
                   "unload_lora"):
        assert callable(getattr(sdjax.StableDiffusion, method)), method
