"""Tiny random PyTorch reference models (diffusers / transformers), saved with save_pretrained.

sdjax never imports torch at run time; the tests build the reference here, save it in the
diffusers layout and load those files through sdjax's real loader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    norm_num_groups=8,
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)

TINY_CLIP = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter a random value, so zero-initialised layers (conv_out, proj_out) are tested too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("weight") and param.ndim == 1:  # norm scales near 1
                param.copy_(1.0 + std * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(std * torch.randn(param.shape, generator=gen))
    return module.eval()


def save_unet(path: Path, seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    seeded(seed)
    model = randomize_(UNet2DConditionModel(**{**TINY_UNET, **overrides}), seed)
    model.save_pretrained(path)
    return model


def save_vae(path: Path, seed: int = 0, **overrides):
    from diffusers import AutoencoderKL

    seeded(seed)
    model = randomize_(AutoencoderKL(**{**TINY_VAE, **overrides}), seed)
    model.save_pretrained(path)
    return model


def save_text_encoder(path: Path, seed: int = 0, **overrides):
    from transformers import CLIPTextConfig, CLIPTextModel

    seeded(seed)
    model = randomize_(CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP, **overrides})), seed)
    model.save_pretrained(path)
    return model


def assert_trees_equal(ours, expected) -> None:
    """Two parameter trees hold the same paths, dtypes and values, bit for bit."""
    import jax

    flat_ours = jax.tree_util.tree_leaves_with_path(ours)
    flat_expected = jax.tree_util.tree_leaves_with_path(expected)
    assert [p for p, _ in flat_ours] == [p for p, _ in flat_expected]
    for (path, a), (_, b) in zip(flat_ours, flat_expected):
        assert a.dtype == b.dtype, jax.tree_util.keystr(path)
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def decode_unit(sd, latents) -> np.ndarray:
    """sdjax latents decoded in fp32 and mapped to [0, 1] the way diffusers' output_type='np' does."""
    images = sd.vae.apply({"params": sd.params["vae"]}, latents / sd.config.vae.scaling_factor, method="decode")
    return np.clip(np.asarray(images) / 2 + 0.5, 0, 1)


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def save_pipeline(
    path: Path,
    seed: int = 0,
    unet: dict | None = None,
    vae: dict | None = None,
    text_encoder: dict | None = None,
    scheduler: dict | None = None,
):
    """A whole tiny diffusers StableDiffusionPipeline (random weights, bundled CLIP tokenizer), saved to ``path``."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdjax.tokenizer import bundled_tokenizer_dir

    seeded(seed)
    unet_model = randomize_(UNet2DConditionModel(**{**TINY_UNET, "sample_size": 8, **(unet or {})}), seed)
    vae_model = randomize_(AutoencoderKL(**{**TINY_VAE, **(vae or {})}), seed + 1)
    text_model = randomize_(CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP, **(text_encoder or {})})), seed + 2)
    pipe = StableDiffusionPipeline(
        unet=unet_model,
        vae=vae_model,
        text_encoder=text_model,
        tokenizer=CLIPTokenizer.from_pretrained(str(bundled_tokenizer_dir())),
        scheduler=PNDMScheduler(
            **{
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "skip_prk_steps": True,
                "steps_offset": 1,
                "set_alpha_to_one": False,
                **(scheduler or {}),
            }
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    # Like the real SD 1.x/2.x scheduler configs, state clip_sample explicitly (DDIM's default is True).
    config_file = Path(path) / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.setdefault("clip_sample", False)
    config_file.write_text(json.dumps(config, indent=2))
    pipe.scheduler = type(pipe.scheduler).from_pretrained(path, subfolder="scheduler")
    return pipe


def run_on_simulated_devices(script: str, *args, devices: int = 8, marker: str, timeout: int = 900) -> str:
    """Run ``tests/<script>`` in a subprocess with ``devices`` simulated CPU devices (the device count is fixed
    when jax starts, so it cannot change inside the test process); assert it exits 0 and prints ``marker``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, str(Path(__file__).with_name(script)), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stderr[-5000:]
    assert marker in result.stdout
    return result.stdout


# A tiny SDXL base: CLIP ViT-L-like and bigG-like towers (hidden 32 each: a 64-wide context), the released
# configs' legacy token ids (eos 2: pool at the largest id), a U-Net with SDXL's text-time conditioning.
TINY_SDXL_TEXT = {**TINY_CLIP, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
TINY_SDXL_TEXT_2 = {**TINY_SDXL_TEXT, "hidden_act": "gelu", "num_hidden_layers": 4, "projection_dim": 16}
TINY_SDXL_UNET = dict(
    TINY_UNET,
    sample_size=8,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 4),
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
)
# As stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json.
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear",
                      use_karras_sigmas=False)


def save_sdxl_pipeline(path: Path, seed: int = 0, force_zeros_for_empty_prompt: bool = True):
    """A whole tiny diffusers StableDiffusionXLPipeline (random weights; the bundled CLIP vocabulary for both
    tokenizers, the second padding with "!" as SDXL's tokenizer_2 does), saved to ``path``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdjax.tokenizer import bundled_tokenizer_dir

    seeded(seed)
    pipe = StableDiffusionXLPipeline(
        vae=randomize_(AutoencoderKL(**{**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}), seed + 1),
        text_encoder=randomize_(CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TEXT)), seed + 2),
        text_encoder_2=randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_2)), seed + 3),
        tokenizer=CLIPTokenizer.from_pretrained(str(bundled_tokenizer_dir())),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(bundled_tokenizer_dir()), pad_token="!"),
        unet=randomize_(UNet2DConditionModel(**TINY_SDXL_UNET), seed),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return pipe
