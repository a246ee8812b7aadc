"""sdjax: Stable Diffusion in JAX/Flax."""

from sdjax.config import (
    PRESETS,
    SD2_DEPTH,
    SD15,
    SD15_INPAINT,
    SD21_BASE,
    SD21_V,
    CLIPTextConfig,
    ModelConfig,
    SchedulerConfig,
    UNetConfig,
    VAEConfig,
)

__version__ = "0.1.0"
from sdjax.pipeline import StableDiffusion
from sdjax import parts, prompt, recipe  # noqa: E402  (the low-level parts; prompt syntax; infotext recipes)
