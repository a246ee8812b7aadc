"""sdjax: Stable Diffusion in JAX/Flax."""

from sdjax.config import (
    PRESETS,
    SD2_DEPTH,
    SD15,
    SD15_INPAINT,
    SD21_BASE,
    SD21_V,
    SDXL_BASE,
    SDXL_REFINER,
    CLIPTextConfig,
    ModelConfig,
    SchedulerConfig,
    UNetConfig,
    VAEConfig,
)

__version__ = "0.1.0"
from sdjax.pipeline import StableDiffusion
from sdjax.control import Control
from sdjax.controlnet import ControlNet, load_controlnet
from sdjax.t2i_adapter import T2IAdapter, load_t2i_adapter
from sdjax import distributed, parts, preprocess, prompt, recipe  # noqa: E402  (processes; low-level parts; control preprocessors; prompt syntax; infotext recipes)
