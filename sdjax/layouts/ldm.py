"""The original CompVis / LDM single-file layout (A1111, ComfyUI), as module tables, in both directions.

A single file (``*.safetensors`` or an older ``*.ckpt``) holds the whole ``LatentDiffusion`` module:

* ``model.diffusion_model.*``       the U-Net, numbered ``input_blocks`` / ``middle_block`` / ``output_blocks``
* ``first_stage_model.*``           the VAE, ``encoder.down.{i}.block.{j}`` / ``decoder.up.{i}`` ...
* ``cond_stage_model.transformer.*`` SD 1.x text encoder (a transformers ``CLIPTextModel``), or
  ``cond_stage_model.model.*``      SD 2.x text encoder (OpenCLIP ViT-H, attention q/k/v packed in ``in_proj``)
* ``model_ema.*``                   optional EMA copy of the U-Net, keys flattened without dots
* noise-schedule buffers (``betas``, ``alphas_cumprod`` ...)

``ldm_to_diffusers`` turns a single-file state dict into the per-component diffusers / transformers
state dicts that ``sdjax.weights`` loads, through explicit module tables built from the model config;
``diffusers_to_ldm`` is its inverse. Every tensor of the file is either used exactly once or listed in
``IGNORED`` with the reason; anything else is an error, so a checkpoint of another family never loads
silently wrong. Shapes are checked later, against the Flax modules.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from sdjax.config import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from sdjax.layouts.diffusers import TEXT_MODEL_PREFIX

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."

SUPPORTED_FAMILIES = (
    "SD 1.x, SD 2.x (512 epsilon and 768 v-prediction), SD 1.5 / SD 2 inpainting (9 U-Net input channels) "
    "and SD 2 depth (5 input channels)"
)
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
    if config.time_cond_proj_dim is not None:  # LCM U-Nets: single files keep diffusers' name for it
        table["time_embedding.cond_proj"] = "time_embedding.cond_proj"
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


def clip_key(key: str) -> str:
    """SD 1.x text keys, ``text_model.`` inserted for files written before transformers added it."""
    return key if key.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + key


def uses_open_clip(config: ModelConfig) -> bool:
    """Whether a model's text encoder is SD 2.x's OpenCLIP ViT-H (GELU) rather than SD 1.x's CLIP (quick GELU)."""
    return config.text_encoder.hidden_act == "gelu"


# --- LDM single file -> diffusers components -----------------------------------------------------------------


def ema_key(unet_key: str) -> str:
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
        ema = ema_key(key)
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
                _put(states["text_encoder"], clip_key(key[len(CLIP_PREFIX):]), state[key], key)
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
    text = {clip_key(k): v for k, v in states["text_encoder"].items() if not k.endswith("embeddings.position_ids")}
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
