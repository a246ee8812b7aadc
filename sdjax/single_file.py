"""Single-file Stable Diffusion checkpoints in the original CompVis / LDM layout, read and written.

A single file (``*.safetensors`` or an older ``*.ckpt``) holds the whole ``LatentDiffusion`` module:

* ``model.diffusion_model.*``       the U-Net, numbered ``input_blocks`` / ``middle_block`` / ``output_blocks``
* ``first_stage_model.*``           the VAE, ``encoder.down.{i}.block.{j}`` / ``decoder.up.{i}`` ...
* ``cond_stage_model.transformer.*`` SD 1.x text encoder (a transformers ``CLIPTextModel``), or
  ``cond_stage_model.model.*``      SD 2.x text encoder (OpenCLIP ViT-H, attention q/k/v packed in ``in_proj``)
* ``model_ema.*``                   optional EMA copy of the U-Net, keys flattened without dots
* noise-schedule buffers (``betas``, ``alphas_cumprod`` ...)

Everything here works on flat numpy state dicts in the PyTorch layout. ``ldm_to_diffusers`` turns the
single-file layout into the per-component diffusers / transformers layout that ``sdjax.weights`` already
loads, through explicit module tables built from the model config; ``diffusers_to_ldm`` is its inverse.
Every tensor of the file is either used exactly once or listed in ``IGNORED`` with the reason; anything
else is an error, so a checkpoint of another family never loads silently wrong.

Model type inference (``infer_model_config``) reads key names and tensor shapes. Three things cannot be
read from shapes and follow the original LDM configs: the U-Net's heads (8 per block for SD 1.x, 64-wide
heads for SD 2.x), the text encoder's heads (64-wide), and 32 groups in every GroupNorm. SD 2.x files with
4 input channels default to the 768 v-prediction model (``upcast_attention``), as diffusers does; pass
``prediction_type="epsilon"`` for the 512 base model, or a full ``config``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from sdjax.config import (
    PRESETS,
    SD2_DEPTH,
    SD15,
    SD15_INPAINT,
    SD21_BASE,
    SD21_V,
    CLIPTextConfig,
    ModelConfig,
    UNetConfig,
    VAEConfig,
)
from sdjax import weights
from sdjax.weights import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SUPPORTED_FAMILIES = (
    "SD 1.x, SD 2.x (512 epsilon and 768 v-prediction), SD 1.5 / SD 2 inpainting (9 U-Net input channels) "
    "and SD 2 depth (5 input channels)"
)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# SD 2.x conditions on the penultimate layer of OpenCLIP ViT-H's 24: released files hold all 24, diffusers
# (and diffusers' own LDM export script) keep 23. A 24th layer is dropped on reading and added on writing.
OPEN_CLIP_LAYERS = 24

# Tensors real single files carry that sdjax does not run, and why. The dropped last OpenCLIP layer of
# SD 2.x and the unused EMA copy are ignored too (see ``_ignored_keys``).
IGNORED = {
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|logvar|lvlb_weights)": "training-time noise schedule buffers; the scheduler config holds the schedule",
    r"scale_factor": "the latent scale, read into the VAE config's scaling_factor",
    r"model_ema\.(decay|num_updates)": "EMA bookkeeping",
    r"cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids": "constant position-index buffer",
    r"cond_stage_model\.model\.(text_projection|logit_scale)": "CLIP's contrastive head, unused by Stable Diffusion",
    r"depth_model\..*": "the MiDaS depth estimator bundled in SD 2 depth files; sdjax takes the depth map as input",
}

# Signature keys of checkpoint families that share the LDM prefixes but are not SD 1.x / 2.x.
_OTHER_FAMILIES = (
    ("conditioner.embedders.", "SDXL (two text encoders under conditioner.embedders)"),
    ("model.diffusion_model.label_emb.", "a class- or size-conditioned U-Net (SDXL, SD x4 upscaler or unCLIP)"),
    ("model.diffusion_model.joint_blocks.", "SD 3 (an MMDiT transformer)"),
    ("double_blocks.", "Flux"),
    ("model.diffusion_model.double_blocks.", "Flux"),
    ("control_model.", "a ControlNet"),
    ("down_blocks.", "a diffusers-layout U-Net, not a whole LDM checkpoint"),
    ("lora_unet_", "a kohya LoRA, not a model (use load_lora)"),
)


# --- reading ------------------------------------------------------------------------------------------------


def read_single_file(path: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
    """All tensors of a single-file checkpoint; ``.ckpt`` pickles only through ``torch.load(weights_only=True)``."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a folder; use StableDiffusion.from_pretrained for diffusers-layout folders")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(
            f"unknown single-file checkpoint type {path.name!r}; accepted: {', '.join(SINGLE_FILE_SUFFIXES)}"
        )
    state = weights.read_checkpoint_file(path)
    if not state:
        raise CheckpointError(f"{path} holds no tensors")
    return state


def declared_prediction_type(path: Union[str, os.PathLike]) -> Optional[str]:
    """The prediction type a safetensors file declares in its ModelSpec metadata (kohya, sdjax), if any."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        metadata = json.loads(f.read(header_len)).get("__metadata__") or {}
    declared = metadata.get("modelspec.prediction_type")
    return {"epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction", "sample": "sample"}.get(declared)


# --- model family and configuration from key names and shapes ------------------------------------------------


def detect_family(state: Mapping[str, np.ndarray]) -> str:
    """``"sd1"`` (CLIP ViT-L text encoder) or ``"sd2"`` (OpenCLIP ViT-H); a clear error for anything else."""
    for prefix, family in _OTHER_FAMILIES:
        if any(key.startswith(prefix) for key in state):
            raise ValueError(
                f"this checkpoint looks like {family} (it has keys starting with {prefix!r}); "
                f"sdjax loads single files of {SUPPORTED_FAMILIES}"
            )
    parts = {
        "U-Net (model.diffusion_model.*)": any(k.startswith(UNET_PREFIX) for k in state),
        "VAE (first_stage_model.*)": any(k.startswith(VAE_PREFIX) for k in state),
        "text encoder (cond_stage_model.transformer.* or cond_stage_model.model.*)": any(
            k.startswith((CLIP_PREFIX, OPEN_CLIP_PREFIX)) for k in state
        ),
    }
    missing = [name for name, present in parts.items() if not present]
    if missing:
        found = sorted({k.split(".")[0] for k in state})
        raise ValueError(
            f"not a complete Stable Diffusion single-file checkpoint: no {', no '.join(missing)}; "
            f"top-level key groups found: {', '.join(found[:12])}. Supported: {SUPPORTED_FAMILIES}"
        )
    has_clip = any(k.startswith(CLIP_PREFIX) for k in state)
    has_open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in state)
    if has_clip and has_open_clip:
        raise ValueError("checkpoint holds both an SD 1.x (cond_stage_model.transformer) and an SD 2.x "
                         "(cond_stage_model.model) text encoder; it is not a single model")
    return "sd2" if has_open_clip else "sd1"


def _tensor(state: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in state:
        raise ValueError(f"checkpoint lacks {key!r}, which every SD 1.x / 2.x checkpoint has; is the file complete? "
                         f"Supported: {SUPPORTED_FAMILIES}")
    return state[key]


def _sub(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _indices(keys, prefix: str) -> list[int]:
    """Sorted distinct integers ``i`` of keys ``{prefix}{i}.…``."""
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _heads(channels: int, head_dim: int, what: str) -> int:
    if channels % head_dim:
        raise ValueError(
            f"cannot infer the attention heads of the {what}: {channels} channels is not a multiple of the "
            f"{head_dim}-wide heads Stable Diffusion uses; pass config= explicitly"
        )
    return channels // head_dim


def _infer_unet(u: Mapping[str, np.ndarray], family: str, base: UNetConfig) -> UNetConfig:
    conv_in = _tensor(u, "input_blocks.0.0.weight")
    levels: list[list[tuple[int, bool]]] = [[]]
    for i in _indices(u, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in u:
            levels.append([])
            continue
        channels = _tensor(u, f"input_blocks.{i}.0.out_layers.3.weight").shape[0]
        levels[-1].append((int(channels), f"input_blocks.{i}.1.proj_in.weight" in u))
    layers = {len(level) for level in levels}
    if len(layers) != 1 or 0 in layers or any(len(set(level)) != 1 for level in levels):
        raise ValueError(f"unsupported U-Net layout (resnets per level, channels and attention must be uniform "
                         f"within a level): {levels}")
    layers_per_block = layers.pop()
    up_attention = [
        f"output_blocks.{level * (layers_per_block + 1)}.1.proj_in.weight" in u for level in range(len(levels))
    ]
    cross_attention = next((u[k] for k in sorted(u) if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((u[k] for k in sorted(u) if k.endswith(".proj_in.weight")), None)
    if cross_attention is None or proj_in is None:
        raise ValueError("the U-Net has no cross-attention layers; it is not a text-conditioned Stable Diffusion U-Net")
    block_out_channels = tuple(level[0][0] for level in levels)
    if family == "sd2":  # LDM v2 configs: num_head_channels 64
        heads = tuple(_heads(c, 64, "U-Net") for c in block_out_channels)
    else:  # LDM v1 configs: num_heads 8
        heads = 8
        for c in block_out_channels:
            _heads(c, 8, "U-Net")
    return UNetConfig(
        sample_size=base.sample_size,
        in_channels=int(conv_in.shape[1]),
        out_channels=int(_tensor(u, "out.2.weight").shape[0]),
        down_block_types=tuple("CrossAttnDownBlock2D" if level[0][1] else "DownBlock2D" for level in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention),
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        attention_head_dim=heads,
        cross_attention_dim=int(cross_attention.shape[1]),
        use_linear_projection=proj_in.ndim == 2,
        upcast_attention=base.upcast_attention,
    )


def _infer_vae(v: Mapping[str, np.ndarray], base: VAEConfig, scale_factor) -> VAEConfig:
    conv_in = _tensor(v, "encoder.conv_in.weight")
    levels = _indices(v, "encoder.down.")
    layers = _indices(v, "encoder.down.0.block.")
    latent_channels = int(_tensor(v, "quant_conv.weight").shape[0]) // 2
    encoder_out = int(_tensor(v, "encoder.conv_out.weight").shape[0])
    if encoder_out != 2 * latent_channels:
        raise ValueError(f"unsupported VAE: encoder emits {encoder_out} channels but quant_conv "
                         f"{2 * latent_channels}; diffusers' AutoencoderKL needs them equal")
    return VAEConfig(
        in_channels=int(conv_in.shape[1]),
        out_channels=int(_tensor(v, "decoder.conv_out.weight").shape[0]),
        down_block_types=("DownEncoderBlock2D",) * len(levels),
        up_block_types=("UpDecoderBlock2D",) * len(levels),
        block_out_channels=tuple(int(_tensor(v, f"encoder.down.{i}.block.0.conv2.weight").shape[0]) for i in levels),
        layers_per_block=len(layers),
        latent_channels=latent_channels,
        sample_size=base.sample_size,
        scaling_factor=float(np.asarray(scale_factor)) if scale_factor is not None else base.scaling_factor,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in v,
    )


def _infer_text_encoder(state: Mapping[str, np.ndarray], family: str, base: CLIPTextConfig) -> CLIPTextConfig:
    if family == "sd2":
        t = _sub(state, OPEN_CLIP_PREFIX)
        tokens = _tensor(t, "token_embedding.weight")
        positions = _tensor(t, "positional_embedding")
        layers = len(_indices(t, "transformer.resblocks."))
        if layers == OPEN_CLIP_LAYERS:
            layers -= 1
        intermediate = _tensor(t, "transformer.resblocks.0.mlp.c_fc.weight").shape[0]
        activation = "gelu"
    else:
        t = {_clip_key(k): v for k, v in _sub(state, CLIP_PREFIX).items()}
        tokens = _tensor(t, "text_model.embeddings.token_embedding.weight")
        positions = _tensor(t, "text_model.embeddings.position_embedding.weight")
        layers = len(_indices(t, "text_model.encoder.layers."))
        intermediate = _tensor(t, "text_model.encoder.layers.0.mlp.fc1.weight").shape[0]
        activation = "quick_gelu"
    hidden = int(tokens.shape[1])
    if layers < 1:
        raise ValueError("the text encoder in this checkpoint has no transformer layers")
    return CLIPTextConfig(
        vocab_size=int(tokens.shape[0]),
        hidden_size=hidden,
        intermediate_size=int(intermediate),
        num_hidden_layers=layers,
        num_attention_heads=_heads(hidden, 64, "text encoder"),
        max_position_embeddings=int(positions.shape[0]),
        hidden_act=activation,
        layer_norm_eps=base.layer_norm_eps,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
        bos_token_id=base.bos_token_id,
    )


def _family_preset(family: str, in_channels: int, prediction_type: Optional[str]) -> ModelConfig:
    accepted = {"sd1": (4, 9), "sd2": (4, 5, 9)}[family]
    if in_channels not in accepted:
        name = "SD 1.x" if family == "sd1" else "SD 2.x"
        raise ValueError(
            f"{name} U-Net with {in_channels} input channels is not supported; accepted: {list(accepted)} "
            f"(4 text-to-image, 9 inpainting{', 5 depth' if family == 'sd2' else ''}). Supported: {SUPPORTED_FAMILIES}"
        )
    if family == "sd1":
        return SD15_INPAINT if in_channels == 9 else SD15
    if in_channels == 5:
        return SD2_DEPTH
    if in_channels == 9:
        return SD21_BASE.replace(unet=dataclasses.replace(SD21_BASE.unet, in_channels=9))
    # diffusers maps every 4-channel SD 2.x file to stable-diffusion-2-1 (768, v-prediction, upcast attention).
    return SD21_BASE if prediction_type == "epsilon" else SD21_V


def _check_prediction_type(prediction_type: Optional[str]) -> None:
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; accepted: {list(PREDICTION_TYPES)}")


def infer_model_config(state: Mapping[str, np.ndarray], *, prediction_type: Optional[str] = None) -> ModelConfig:
    """The ``ModelConfig`` of a single-file checkpoint, from its key names and tensor shapes.

    ``prediction_type`` (``"epsilon"`` / ``"v_prediction"``) overrides the default, which is epsilon except
    for SD 2.x text-to-image files (v-prediction, the 768 model), as in diffusers.
    """
    _check_prediction_type(prediction_type)
    family = detect_family(state)
    unet_state = _sub(state, UNET_PREFIX)
    in_channels = int(_tensor(unet_state, "input_blocks.0.0.weight").shape[1])
    preset = _family_preset(family, in_channels, prediction_type)
    config = ModelConfig(
        text_encoder=_infer_text_encoder(state, family, preset.text_encoder),
        unet=_infer_unet(unet_state, family, preset.unet),
        vae=_infer_vae(_sub(state, VAE_PREFIX), preset.vae, state.get("scale_factor")),
        scheduler=preset.scheduler,
    )
    if prediction_type is not None:
        config = config.replace(scheduler=dataclasses.replace(config.scheduler, prediction_type=prediction_type))
    return config


# --- explicit module tables: LDM module path -> diffusers module path ----------------------------------------

_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TRANSFORMER = {
    name: name
    for name in (
        "norm",
        "proj_in",
        "proj_out",
        *(
            f"transformer_blocks.0.{m}"
            for m in (
                "norm1", "norm2", "norm3",
                "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "ff.net.0.proj", "ff.net.2",
            )
        ),
    )
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
# LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers.
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_CONV_AS_LINEAR = ("to_q", "to_k", "to_v", "to_out.0")
_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _add(table: dict, ldm: str, diffusers: str, submodules: Mapping[str, str]) -> None:
    for a, b in submodules.items():
        table[f"{ldm}.{a}"] = f"{diffusers}.{b}"


def unet_module_table(config: UNetConfig) -> dict[str, str]:
    """LDM U-Net module paths (after ``model.diffusion_model.``) -> diffusers ``UNet2DConditionModel`` paths."""
    table = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    last = len(config.block_out_channels) - 1
    per_block = config.layers_per_block
    index = 1
    for level, kind in enumerate(config.down_block_types):
        for j in range(per_block):
            _add(table, f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", _UNET_RESNET)
            if kind == "CrossAttnDownBlock2D":
                _add(table, f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", _TRANSFORMER)
            index += 1
        if level < last:
            table[f"input_blocks.{index}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            index += 1
    _add(table, "middle_block.0", "mid_block.resnets.0", _UNET_RESNET)
    _add(table, "middle_block.1", "mid_block.attentions.0", _TRANSFORMER)
    _add(table, "middle_block.2", "mid_block.resnets.1", _UNET_RESNET)
    index = 0
    for level, kind in enumerate(config.up_block_types):
        attention = kind == "CrossAttnUpBlock2D"
        for j in range(per_block + 1):
            _add(table, f"output_blocks.{index}.0", f"up_blocks.{level}.resnets.{j}", _UNET_RESNET)
            if attention:
                _add(table, f"output_blocks.{index}.1", f"up_blocks.{level}.attentions.{j}", _TRANSFORMER)
            if j == per_block and level < last:
                table[f"output_blocks.{index}.{2 if attention else 1}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
            index += 1
    return table


def vae_module_table(config: VAEConfig) -> dict[str, str]:
    """LDM VAE module paths (after ``first_stage_model.``) -> diffusers ``AutoencoderKL`` paths."""
    table = {}
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in"] = f"{part}.conv_in"
        table[f"{part}.conv_out"] = f"{part}.conv_out"
        table[f"{part}.norm_out"] = f"{part}.conv_norm_out"
        _add(table, f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET)
        _add(table, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTENTION)
        _add(table, f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET)
    table["quant_conv"] = "quant_conv"
    table["post_quant_conv"] = "post_quant_conv"
    levels = len(config.block_out_channels)
    for i in range(levels):
        for j in range(config.layers_per_block):
            _add(table, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET)
        if i < levels - 1:
            table[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        # The decoder's LDM levels count up in resolution order, diffusers' up_blocks run from the bottom.
        ldm_level = levels - 1 - i
        for j in range(config.layers_per_block + 1):
            _add(table, f"decoder.up.{ldm_level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", _VAE_RESNET)
        if i < levels - 1:
            table[f"decoder.up.{ldm_level}.upsample.conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    return table


def open_clip_module_table(config: CLIPTextConfig) -> dict[str, str]:
    """OpenCLIP text-tower module paths (after ``cond_stage_model.model.``) -> transformers ``CLIPTextModel``.

    The packed ``attn.in_proj_weight`` / ``in_proj_bias`` are split into q/k/v by the converters.
    """
    table = {
        "token_embedding": "text_model.embeddings.token_embedding",
        "ln_final": "text_model.final_layer_norm",
    }
    for i in range(config.num_hidden_layers):
        _add(table, f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", _OPEN_CLIP_LAYER)
    return table


def _clip_key(key: str) -> str:
    """SD 1.x text keys, ``text_model.`` inserted for files written before transformers added it."""
    return key if key.startswith("text_model.") else "text_model." + key


def uses_open_clip(config: ModelConfig) -> bool:
    """Whether a model's text encoder is SD 2.x's OpenCLIP ViT-H (GELU) rather than SD 1.x's CLIP (quick GELU)."""
    return config.text_encoder.hidden_act == "gelu"


# --- LDM single file -> diffusers components -----------------------------------------------------------------


def _ema_key(unet_key: str) -> str:
    """``model.diffusion_model.a.0.b`` -> ``model_ema.diffusion_modela0b`` (LDM's LitEma drops the dots)."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def _ignored_keys(state: Mapping[str, np.ndarray], config: ModelConfig, use_ema: bool) -> set[str]:
    patterns = [re.compile(p) for p in IGNORED]
    if not use_ema:
        patterns.append(re.compile(re.escape(EMA_PREFIX) + ".*"))
    if uses_open_clip(config) and config.text_encoder.num_hidden_layers == OPEN_CLIP_LAYERS - 1:
        dropped = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{OPEN_CLIP_LAYERS - 1}."
        patterns.append(re.compile(re.escape(dropped) + ".*"))
    return {key for key in state if any(p.fullmatch(key) for p in patterns)}


def _put(out: dict, key: str, value: np.ndarray, source: str) -> None:
    if key in out:
        raise ValueError(f"checkpoint tensor {source} maps to {key}, which another tensor already filled")
    out[key] = value


def _map_modules(state, prefix: str, table: Mapping[str, str], out: dict, used: set, value_of) -> None:
    """Rename the not yet used tensors under ``prefix`` whose module is in ``table``; mark them used."""
    for key in state:
        if not key.startswith(prefix) or key in used:
            continue
        module, _, leaf = key[len(prefix):].rpartition(".")
        target = table.get(module)
        if target is not None:
            _put(out, f"{target}.{leaf}", value_of(key, target), key)
            used.add(key)


def ldm_to_diffusers(
    state: Mapping[str, np.ndarray], config: ModelConfig, *, use_ema: bool = False
) -> dict[str, dict[str, np.ndarray]]:
    """A single-file state dict -> ``{"text_encoder", "unet", "vae"}`` diffusers / transformers state dicts.

    With ``use_ema`` the U-Net comes from the ``model_ema.*`` copy. Every tensor is used once or is
    ignored by ``IGNORED``; leftovers raise a ``ValueError`` naming them. Shapes are checked later,
    against the Flax modules, by ``sdjax.weights.params_from_state_dicts``.
    """
    used = _ignored_keys(state, config, use_ema)
    if use_ema and not any(k.startswith(EMA_PREFIX) and k not in used for k in state):
        raise ValueError("use_ema=True, but this checkpoint has no EMA weights (no model_ema.* tensors)")
    missing_ema: list[str] = []

    def unet_value(key, _):
        if not use_ema:
            return state[key]
        ema = _ema_key(key)
        if ema not in state:
            missing_ema.append(ema)
            return state[key]
        used.add(ema)
        return state[ema]

    def vae_value(key, target):
        value = state[key]
        if target.endswith(_VAE_CONV_AS_LINEAR) and value.ndim == 4:
            return value[:, :, 0, 0]
        return value

    states: dict[str, dict[str, np.ndarray]] = {"text_encoder": {}, "unet": {}, "vae": {}}
    _map_modules(state, UNET_PREFIX, unet_module_table(config.unet), states["unet"], used, unet_value)
    _map_modules(state, VAE_PREFIX, vae_module_table(config.vae), states["vae"], used, vae_value)
    if uses_open_clip(config):
        _open_clip_to_transformers(state, config.text_encoder, states["text_encoder"], used)
    else:
        for key in state:
            if key.startswith(CLIP_PREFIX) and key not in used:
                _put(states["text_encoder"], _clip_key(key[len(CLIP_PREFIX):]), state[key], key)
                used.add(key)

    if missing_ema:
        raise ValueError(f"use_ema=True, but {len(missing_ema)} U-Net tensor(s) have no EMA copy, "
                         f"e.g. {', '.join(missing_ema[:5])}")
    leftovers = sorted(k for k in state if k not in used)
    if leftovers:
        shown = ", ".join(leftovers[:12]) + (" ..." if len(leftovers) > 12 else "")
        raise ValueError(
            f"{len(leftovers)} tensor(s) of the checkpoint have no place in the "
            f"{'SD 2.x' if uses_open_clip(config) else 'SD 1.x'} model its config describes: {shown}. "
            f"Supported: {SUPPORTED_FAMILIES}; pass config= if the shapes are unusual"
        )
    return states


def _open_clip_to_transformers(state, config: CLIPTextConfig, out: dict, used: set) -> None:
    table = open_clip_module_table(config)
    hidden = config.hidden_size
    for key in state:
        if not key.startswith(OPEN_CLIP_PREFIX) or key in used:
            continue
        rest = key[len(OPEN_CLIP_PREFIX):]
        packed = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", rest)
        if rest == "positional_embedding":
            _put(out, "text_model.embeddings.position_embedding.weight", state[key], key)
        elif packed and int(packed.group(1)) < config.num_hidden_layers and state[key].shape[0] == 3 * hidden:
            layer, leaf = packed.groups()
            for n, name in enumerate(("q_proj", "k_proj", "v_proj")):
                value = state[key][n * hidden : (n + 1) * hidden]
                _put(out, f"text_model.encoder.layers.{layer}.self_attn.{name}.{leaf}", value, key)
        else:
            module, _, leaf = rest.rpartition(".")
            if module not in table:
                continue
            _put(out, f"{table[module]}.{leaf}", state[key], key)
        used.add(key)


# --- diffusers components -> LDM single file -----------------------------------------------------------------


def _unmap_modules(state, table: Mapping[str, str], prefix: str, out: dict, unknown: list, what: str, value_of=None):
    inverse = {v: k for k, v in table.items()}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        ldm = inverse.get(module)
        if ldm is None:
            unknown.append(f"{what} {key}")
            continue
        out[f"{prefix}{ldm}.{leaf}"] = value_of(module, value) if value_of else value


def diffusers_to_ldm(states: Mapping[str, Mapping[str, np.ndarray]], config: ModelConfig) -> dict[str, np.ndarray]:
    """``{"text_encoder", "unet", "vae"}`` diffusers / transformers state dicts -> a single-file state dict.

    SD 1.x configs get the ``cond_stage_model.transformer.*`` layout, SD 2.x configs (GELU text encoder)
    the OpenCLIP ``cond_stage_model.model.*`` layout with q/k/v packed into ``in_proj``.
    """
    out: dict[str, np.ndarray] = {}
    unknown: list[str] = []

    def vae_value(module, value):
        if module.endswith(_VAE_CONV_AS_LINEAR) and value.ndim == 2:
            return value[:, :, None, None]
        return value

    _unmap_modules(states["unet"], unet_module_table(config.unet), UNET_PREFIX, out, unknown, "unet")
    _unmap_modules(states["vae"], vae_module_table(config.vae), VAE_PREFIX, out, unknown, "vae", vae_value)
    text = {_clip_key(k): v for k, v in states["text_encoder"].items() if not k.endswith("embeddings.position_ids")}
    if uses_open_clip(config):
        _transformers_to_open_clip(text, config.text_encoder, out, unknown)
    else:
        out.update({CLIP_PREFIX + key: value for key, value in text.items()})
    if unknown:
        shown = ", ".join(sorted(unknown)[:12]) + (" ..." if len(unknown) > 12 else "")
        raise ValueError(f"{len(unknown)} tensor(s) have no place in the single-file layout of this config: {shown}")
    return out


def _transformers_to_open_clip(text: dict, config: CLIPTextConfig, out: dict, unknown: list) -> None:
    text = dict(text)
    prefix = OPEN_CLIP_PREFIX
    positions = text.pop("text_model.embeddings.position_embedding.weight", None)
    if positions is None:
        unknown.append("text_encoder text_model.embeddings.position_embedding.weight (missing)")
    else:
        out[prefix + "positional_embedding"] = positions
    for i in range(config.num_hidden_layers):
        for leaf in ("weight", "bias"):
            names = [f"text_model.encoder.layers.{i}.self_attn.{n}_proj.{leaf}" for n in "qkv"]
            if not all(n in text for n in names):
                unknown.append(f"text_encoder layer {i} q/k/v {leaf} (missing)")
                continue
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{leaf}"] = np.concatenate([text.pop(n) for n in names])
    _unmap_modules(text, open_clip_module_table(config), prefix, out, unknown, "text_encoder")
    if positions is not None and config.num_hidden_layers == OPEN_CLIP_LAYERS - 1:
        out.update(_identity_open_clip_layer(config, positions.dtype, OPEN_CLIP_LAYERS - 1))


def _identity_open_clip_layer(config: CLIPTextConfig, dtype, index: int) -> dict[str, np.ndarray]:
    """The 24th OpenCLIP layer that SD 2.x never runs, written as an exact identity (zero residual branches).

    Files then have the 24 layers SD 2.x tools expect, and a tool that does run the last layer gets the
    penultimate layer's output, which is what the model was trained on.
    """
    h, m = config.hidden_size, config.intermediate_size
    shapes = {
        "ln_1.weight": (h,), "ln_1.bias": (h,), "ln_2.weight": (h,), "ln_2.bias": (h,),
        "attn.in_proj_weight": (3 * h, h), "attn.in_proj_bias": (3 * h,),
        "attn.out_proj.weight": (h, h), "attn.out_proj.bias": (h,),
        "mlp.c_fc.weight": (m, h), "mlp.c_fc.bias": (m,), "mlp.c_proj.weight": (h, m), "mlp.c_proj.bias": (h,),
    }
    fill = {"ln_1.weight": np.ones, "ln_2.weight": np.ones}
    return {
        f"{OPEN_CLIP_PREFIX}transformer.resblocks.{index}.{name}": fill.get(name, np.zeros)(shape, dtype)
        for name, shape in shapes.items()
    }


# --- loading and saving ---------------------------------------------------------------------------------------


def resolve_config(config: Union[ModelConfig, str, os.PathLike]) -> ModelConfig:
    """A ``ModelConfig``, a preset name (``"sd15"``, ``"sd21-v"`` ...) or a diffusers-layout folder."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, str) and config in PRESETS:
        return PRESETS[config]
    if isinstance(config, (str, os.PathLike)) and Path(config).expanduser().is_dir():
        return weights.read_model_config(Path(config).expanduser())
    raise ValueError(
        f"config={config!r} is not understood; give a ModelConfig, a preset name ({', '.join(PRESETS)}) "
        "or a diffusers-layout model folder"
    )


def load_single_file(
    path: Union[str, os.PathLike],
    config: Union[ModelConfig, str, os.PathLike, None] = None,
    *,
    prediction_type: Optional[str] = None,
    use_ema: bool = False,
    dtype=None,
) -> tuple[ModelConfig, dict]:
    """A single-file checkpoint -> ``(ModelConfig, params)``; params are ``dtype`` (default float32) arrays.

    ``config`` overrides the inferred configuration; ``prediction_type`` overrides the prediction type
    (otherwise: the file's ModelSpec metadata, then the family default); ``use_ema`` takes the U-Net from
    the ``model_ema.*`` copy.
    """
    import jax.numpy as jnp

    _check_prediction_type(prediction_type)
    state = read_single_file(path)
    family = detect_family(state)
    if config is None:
        config = infer_model_config(state, prediction_type=prediction_type or declared_prediction_type(path))
    else:
        config = resolve_config(config)
        if uses_open_clip(config) != (family == "sd2"):
            raise ValueError(
                f"config describes an {'SD 2.x (OpenCLIP)' if uses_open_clip(config) else 'SD 1.x (CLIP)'} text "
                f"encoder, but {path} holds an {'SD 2.x' if family == 'sd2' else 'SD 1.x'} one"
            )
        if prediction_type is not None:
            config = config.replace(scheduler=dataclasses.replace(config.scheduler, prediction_type=prediction_type))
    states = ldm_to_diffusers(state, config, use_ema=use_ema)
    params = weights.params_from_state_dicts(config, states, jnp.dtype(dtype or jnp.float32), source=str(path))
    return config, params


def save_single_file(path: Union[str, os.PathLike], config: ModelConfig, params: dict, *, dtype=None) -> None:
    """Write ``params`` as an original-layout ``.safetensors`` single file (optionally cast to ``dtype``).

    The prediction type is recorded as ModelSpec metadata (``modelspec.prediction_type``).
    """
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(
            f"save_single_file writes .safetensors files only (pickles can run code when loaded); got {path.name!r}"
        )
    tensors = diffusers_to_ldm(weights.state_dicts_from_params(params), config)
    if dtype is not None:
        tensors = {k: np.asarray(v).astype(dtype) for k, v in tensors.items()}
    prediction = {"v_prediction": "v"}.get(config.scheduler.prediction_type, config.scheduler.prediction_type)
    weights.write_safetensors(path, tensors, metadata={"modelspec.prediction_type": prediction})
