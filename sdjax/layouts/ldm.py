"""The original CompVis / LDM single-file layout (A1111, ComfyUI), as module tables, in both directions.

A single file (``*.safetensors`` or an older ``*.ckpt``) holds the whole ``LatentDiffusion`` module:

* ``model.diffusion_model.*``       the U-Net, numbered ``input_blocks`` / ``middle_block`` / ``output_blocks``
* ``first_stage_model.*``           the VAE, ``encoder.down.{i}.block.{j}`` / ``decoder.up.{i}`` ...
* ``cond_stage_model.transformer.*`` SD 1.x text encoder (a transformers ``CLIPTextModel``), or
  ``cond_stage_model.model.*``      SD 2.x text encoder (OpenCLIP ViT-H, attention q/k/v packed in ``in_proj``), or
  ``conditioner.embedders.*``       SDXL's CLIP ViT-L and OpenCLIP ViT-bigG (``sdxl_text_encoders_to_transformers``)
* ``model_ema.*``                   optional EMA copy of the U-Net, keys flattened without dots
* noise-schedule buffers (``betas``, ``alphas_cumprod`` ...)

``ldm_to_diffusers`` turns a single-file state dict into the per-component diffusers / transformers
state dicts that ``sdjax.weights`` loads, through explicit module tables built from the model config;
``diffusers_to_ldm`` is its inverse. Every tensor of the file is either used exactly once or listed in
``IGNORED`` with the reason; anything else is an error, so a checkpoint of another family never loads
silently wrong. Shapes are checked later, against the Flax modules.
"""

from __future__ import annotations

import dataclasses
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

# Tensors real single files carry that sdjax does not run, and why. The unused EMA copy (``_ignored_keys``)
# and the dropped last OpenCLIP layer of SD 2.x (``TextEncoderSlot.extra_last_layer``) are ignored too.
IGNORED = {
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|logvar|lvlb_weights)": "training-time noise schedule buffers; the scheduler config holds the schedule",
    r"scale_factor": "the latent scale, read into the VAE config's scaling_factor",
    r"model_ema\.(decay|num_updates)": "EMA bookkeeping",
    r"(cond_stage_model|conditioner\.embedders\.0)\.transformer\.(text_model\.)?embeddings\.position_ids":
        "constant position-index buffer",
    r"cond_stage_model\.model\.(text_projection|logit_scale)": "CLIP's contrastive head, unused by Stable Diffusion",
    r"conditioner\.embedders\.[01]\.model\.logit_scale": "CLIP's contrastive temperature, unused by SDXL",
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
_TRANSFORMER_BLOCK = (
    "norm1", "norm2", "norm3",
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)


def _transformer(depth: int) -> dict[str, str]:
    """A spatial transformer with ``depth`` blocks: LDM and diffusers name its modules alike."""
    names = ("norm", "proj_in", "proj_out",
             *(f"transformer_blocks.{k}.{m}" for k in range(depth) for m in _TRANSFORMER_BLOCK))
    return {name: name for name in names}

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
_POSITIONS = "text_model.embeddings.position_embedding.weight"
# CLIPTextModelWithProjection's head, beside text_model in transformers' keys.
_PROJECTION_HEAD = "text_projection."
_PROJECTION = _PROJECTION_HEAD + "weight"


def _add(table: dict, ldm: str, diffusers: str, submodules: Mapping[str, str]) -> None:
    for a, b in submodules.items():
        table[f"{ldm}.{a}"] = f"{diffusers}.{b}"


def unet_module_table(config: UNetConfig) -> dict[str, str]:
    """LDM U-Net module paths (after ``model.diffusion_model.``) -> diffusers ``UNet2DConditionModel`` paths.

    ``input_blocks`` count every resnet(+attention) pair and downsampler, with or without attention (SDXL base:
    0 conv_in, 1-2 level 0, 3 its downsampler, 4-5, 6, 7-8); SDXL's ``add_embedding`` is LDM's ``label_emb.0``."""
    table = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    if config.time_cond_proj_dim is not None:  # LCM U-Nets: single files keep diffusers' name for it
        table["time_embedding.cond_proj"] = "time_embedding.cond_proj"
    if config.addition_embed_type == "text_time":  # SDXL's pooled-text + time-ids embedding
        table["label_emb.0.0"] = "add_embedding.linear_1"
        table["label_emb.0.2"] = "add_embedding.linear_2"
    depths = config.transformer_layers_per_level()
    last = len(config.block_out_channels) - 1
    per_block = config.layers_per_block
    index = 1
    for level, kind in enumerate(config.down_block_types):
        for j in range(per_block):
            _add(table, f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", _UNET_RESNET)
            if kind == "CrossAttnDownBlock2D":
                _add(table, f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}",
                     _transformer(depths[level]))
            index += 1
        if level < last:
            table[f"input_blocks.{index}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            index += 1
    _add(table, "middle_block.0", "mid_block.resnets.0", _UNET_RESNET)
    _add(table, "middle_block.1", "mid_block.attentions.0", _transformer(depths[-1]))
    _add(table, "middle_block.2", "mid_block.resnets.1", _UNET_RESNET)
    index = 0
    for level, kind in enumerate(config.up_block_types):
        attention = kind == "CrossAttnUpBlock2D"
        for j in range(per_block + 1):
            _add(table, f"output_blocks.{index}.0", f"up_blocks.{level}.resnets.{j}", _UNET_RESNET)
            if attention:
                _add(table, f"output_blocks.{index}.1", f"up_blocks.{level}.attentions.{j}",
                     _transformer(depths[last - level]))
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
    """OpenCLIP text-tower module paths (after a prefix like ``cond_stage_model.model.``) -> transformers
    ``CLIPTextModel``.

    The converters split the packed ``attn.in_proj_weight`` / ``in_proj_bias`` into q/k/v and place the
    un-moduled ``positional_embedding`` and ``text_projection``.
    """
    table = {
        "token_embedding": "text_model.embeddings.token_embedding",
        "ln_final": "text_model.final_layer_norm",
    }
    for i in range(config.num_hidden_layers):
        _add(table, f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", _OPEN_CLIP_LAYER)
    return table


def clip_key(key: str) -> str:
    """transformers CLIP text keys with ``text_model.`` (files written before transformers added it, and
    transformers 5's ``CLIPTextModel``, lack it); ``CLIPTextModelWithProjection``'s head stays beside it."""
    return key if key.startswith((TEXT_MODEL_PREFIX, _PROJECTION_HEAD)) else TEXT_MODEL_PREFIX + key


def uses_open_clip(config: ModelConfig) -> bool:
    """Whether a model's text encoder is SD 2.x's OpenCLIP ViT-H (GELU) rather than SD 1.x's CLIP (quick GELU)."""
    return config.text_encoder.hidden_act == "gelu"


@dataclasses.dataclass(frozen=True)
class TextEncoderSlot:
    """Where a single file keeps one text encoder, and in which layout."""

    prefix: str
    # OpenCLIP's own layout (q/k/v packed in ``attn.in_proj_*``, ``ln_final``, a (width, projection)
    # ``text_projection`` applied as x @ P) rather than transformers ``CLIPTextModel`` keys.
    open_clip: bool
    # The file holds one OpenCLIP layer more than the model runs (SD 2.x with diffusers' 23 layers): it is
    # dropped on reading and written back as an identity layer.
    extra_last_layer: bool = False


def text_encoder_slot(config: ModelConfig) -> TextEncoderSlot:
    """Where an SD 1.x / 2.x single file keeps the text encoder of ``config``."""
    if not uses_open_clip(config):
        return TextEncoderSlot(CLIP_PREFIX, open_clip=False)
    extra = config.text_encoder.num_hidden_layers == OPEN_CLIP_LAYERS - 1
    return TextEncoderSlot(OPEN_CLIP_PREFIX, open_clip=True, extra_last_layer=extra)


# --- LDM single file -> diffusers components -----------------------------------------------------------------


def ema_key(unet_key: str) -> str:
    """``model.diffusion_model.a.0.b`` -> ``model_ema.diffusion_modela0b`` (LDM's LitEma drops the dots)."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def _ignored_keys(state: Mapping[str, np.ndarray], config: ModelConfig, use_ema: bool) -> set[str]:
    patterns = [re.compile(p) for p in IGNORED]
    if not use_ema:
        patterns.append(re.compile(re.escape(EMA_PREFIX) + ".*"))
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
    states["text_encoder"] = text_encoder_to_transformers(state, config.text_encoder, text_encoder_slot(config), used)

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


def text_encoder_to_transformers(
    state: Mapping[str, np.ndarray], config: CLIPTextConfig, slot: TextEncoderSlot, used: set
) -> dict[str, np.ndarray]:
    """The not yet ``used`` tensors under ``slot.prefix`` -> a transformers ``CLIPTextModel`` (or, with
    ``config.projection_dim``, ``CLIPTextModelWithProjection``) state dict; adds each tensor it places to
    ``used`` and leaves the rest for the caller's leftover check."""
    if slot.open_clip:
        return _open_clip_to_transformers(state, config, slot, used)
    out: dict[str, np.ndarray] = {}
    for key in state:
        if key.startswith(slot.prefix) and key not in used:
            _put(out, clip_key(key[len(slot.prefix):]), state[key], key)
            used.add(key)
    return out


def _open_clip_to_transformers(state, config: CLIPTextConfig, slot: TextEncoderSlot, used: set) -> dict:
    prefix, table, hidden = slot.prefix, open_clip_module_table(config), config.hidden_size
    if slot.extra_last_layer:
        dropped = f"{prefix}transformer.resblocks.{config.num_hidden_layers}."
        used.update(key for key in state if key.startswith(dropped))
    out: dict[str, np.ndarray] = {}
    for key in state:
        if not key.startswith(prefix) or key in used:
            continue
        rest = key[len(prefix):]
        packed = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", rest)
        if rest == "positional_embedding":
            _put(out, _POSITIONS, state[key], key)
        elif rest == "text_projection" and config.has_projection:
            # OpenCLIP computes x @ P with P (width, projection); a torch Linear stores P transposed.
            _put(out, _PROJECTION, state[key].T, key)
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
    return out


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
    out.update(transformers_to_text_encoder(states["text_encoder"], config.text_encoder, text_encoder_slot(config),
                                            unknown))
    if unknown:
        shown = ", ".join(sorted(unknown)[:12]) + (" ..." if len(unknown) > 12 else "")
        raise ValueError(f"{len(unknown)} tensor(s) have no place in the single-file layout of this config: {shown}")
    return out


def transformers_to_text_encoder(
    text: Mapping[str, np.ndarray], config: CLIPTextConfig, slot: TextEncoderSlot, unknown: list,
    what: str = "text_encoder",
) -> dict[str, np.ndarray]:
    """Inverse of ``text_encoder_to_transformers``: a transformers state dict (keys with or without
    ``text_model.``) -> the file's tensors under ``slot.prefix``; what has no place, or is missing, is
    appended to ``unknown`` as ``"<what> <key>"``."""
    text = {clip_key(k): v for k, v in text.items() if not k.endswith("embeddings.position_ids")}
    if slot.open_clip:
        return _transformers_to_open_clip(text, config, slot, unknown, what)
    return {slot.prefix + key: value for key, value in text.items()}


def _transformers_to_open_clip(text: dict, config: CLIPTextConfig, slot: TextEncoderSlot, unknown: list,
                               what: str) -> dict:
    prefix, out = slot.prefix, {}
    positions = text.pop(_POSITIONS, None)
    if positions is None:
        unknown.append(f"{what} {_POSITIONS} (missing)")
    else:
        out[prefix + "positional_embedding"] = positions
    if config.has_projection:
        projection = text.pop(_PROJECTION, None)
        if projection is None:
            unknown.append(f"{what} {_PROJECTION} (missing)")
        else:
            out[prefix + "text_projection"] = np.ascontiguousarray(projection.T)
    for i in range(config.num_hidden_layers):
        for leaf in ("weight", "bias"):
            names = [f"text_model.encoder.layers.{i}.self_attn.{n}_proj.{leaf}" for n in "qkv"]
            if not all(n in text for n in names):
                unknown.append(f"{what} layer {i} q/k/v {leaf} (missing)")
                continue
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{leaf}"] = np.concatenate([text.pop(n) for n in names])
    _unmap_modules(text, open_clip_module_table(config), prefix, out, unknown, what)
    if positions is not None and slot.extra_last_layer:
        out.update(_identity_open_clip_layer(config, positions.dtype, prefix))
    return out


def _identity_open_clip_layer(config: CLIPTextConfig, dtype, prefix: str) -> dict[str, np.ndarray]:
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
        f"{prefix}transformer.resblocks.{config.num_hidden_layers}.{name}": fill.get(name, np.zeros)(shape, dtype)
        for name, shape in shapes.items()
    }
