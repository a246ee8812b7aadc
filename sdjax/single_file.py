"""Single-file Stable Diffusion checkpoints (CompVis / LDM layout, as A1111 and ComfyUI use), read and written.

The layout itself (prefixes, module tables, both directions of conversion) is ``sdjax.layouts.ldm``;
this module reads a file, infers the model it holds and loads it through ``sdjax.weights``.

Where the configuration comes from, first found wins: ``config=`` (a ``ModelConfig``, preset name,
diffusers folder or LDM ``.yaml``); the ``sdjax.config`` metadata sdjax writes into every file it saves;
an LDM ``.yaml`` beside the file with the same stem (as A1111 reads it); the key names and tensor shapes.

Model type inference (``infer_model_config``) reads key names and tensor shapes. Three things cannot be
read from shapes and follow the original LDM configs: the U-Net's heads (8 per block for SD 1.x, 64-wide
heads for SD 2.x), the text encoder's heads (64-wide), and 32 groups in every GroupNorm. Loading warns
when it had to assume these for an architecture that is not a released one. SD 2.x files with 4 input
channels default to the 768 v-prediction model (``upcast_attention``), as diffusers does; pass
``prediction_type="epsilon"`` for the 512 base model, or a full ``config``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Mapping, Optional, Union

import jax.numpy as jnp
import numpy as np

from sdjax import weights
from sdjax.config import (
    PREDICTION_TYPES,
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
from sdjax.layouts.files import CheckpointError, read_checkpoint_file, safetensors_metadata, write_safetensors
from sdjax.layouts.ldm_config import (
    METADATA_KEY,
    config_from_metadata,
    config_to_metadata,
    ldm_yaml_config,
    ldm_yaml_family,
    ldm_yaml_in_channels,
    ldm_yaml_prediction_type,
    read_ldm_yaml,
)
from sdjax.layouts.ldm import (
    CLIP_PREFIX,
    OPEN_CLIP_LAYERS,
    OPEN_CLIP_PREFIX,
    SUPPORTED_FAMILIES,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_key,
    diffusers_to_ldm,
    ldm_to_diffusers,
    uses_open_clip,
)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
YAML_SUFFIXES = (".yaml", ".yml")
_FAMILY_NAMES = {"sd1": "SD 1.x (CLIP text encoder)", "sd2": "SD 2.x (OpenCLIP text encoder)"}

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


def is_single_file(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is an existing file with a single-file checkpoint suffix (``.safetensors``, ``.ckpt``,
    ``.pt``, ``.pth``, ``.bin``): what ``load_single_file`` / ``StableDiffusion.from_single_file`` take."""
    try:
        path = Path(path).expanduser()
    except TypeError:
        return False
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and path.is_file()


def read_single_file(path: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
    """All tensors of a single-file checkpoint; ``.ckpt`` pickles through sdjax's restricted unpickler
    (``sdjax.layouts.safe_pickle``: no torch needed, no code from the file run)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a folder; use StableDiffusion.from_pretrained for diffusers-layout folders")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ValueError(
            f"unknown single-file checkpoint type {path.name!r}; accepted: {', '.join(SINGLE_FILE_SUFFIXES)}"
        )
    state = read_checkpoint_file(path)
    if not state:
        raise CheckpointError(f"{path} holds no tensors")
    return state


def embedded_config(path: Union[str, os.PathLike]) -> Optional[ModelConfig]:
    """The ``ModelConfig`` sdjax recorded in a safetensors file it saved (``None`` for other files)."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        return None
    return config_from_metadata(safetensors_metadata(path), source=str(path))


def declared_prediction_type(path: Union[str, os.PathLike]) -> Optional[str]:
    """The prediction type a safetensors file declares in its ModelSpec metadata (kohya, sdjax), if any."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    declared = safetensors_metadata(path).get("modelspec.prediction_type")
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
            f"{head_dim}-wide heads Stable Diffusion uses; pass config= explicitly (a ModelConfig, a diffusers "
            "folder or the model's LDM .yaml), or put that .yaml beside the file with the same name"
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
        # LCM-distilled U-Nets (diffusers' converter keeps diffusers' own name for this one layer)
        time_cond_proj_dim=int(u[_COND_PROJ].shape[1]) if _COND_PROJ in u else None,
    )


_COND_PROJ = "time_embedding.cond_proj.weight"


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
        t = {clip_key(k): v for k, v in _sub(state, CLIP_PREFIX).items()}
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


# --- configuration from a .yaml, and the warning when shapes had to be trusted ---------------------------------


def _is_yaml(config) -> bool:
    return isinstance(config, (str, os.PathLike)) and Path(config).suffix.lower() in YAML_SUFFIXES


def yaml_beside(path: Union[str, os.PathLike]) -> Optional[Path]:
    """The LDM config A1111 would read for a checkpoint: ``<stem>.yaml`` (or ``.yml``) in its folder."""
    path = Path(path).expanduser()
    return next((p for p in (path.with_suffix(s) for s in YAML_SUFFIXES) if p.is_file()), None)


def config_from_ldm_yaml(
    state: Mapping[str, np.ndarray], yaml_path: Union[str, os.PathLike], *, prediction_type: Optional[str] = None
) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint described by an original LDM ``.yaml`` (``v1-inference.yaml`` ...).

    The yaml gives the U-Net (heads included), VAE, schedule and prediction type; the text encoder's sizes
    come from the checkpoint's shapes. ``prediction_type`` overrides the yaml's ``parameterization``.
    """
    _check_prediction_type(prediction_type)
    source = str(Path(yaml_path).expanduser())
    data = read_ldm_yaml(yaml_path)
    family, declared = detect_family(state), ldm_yaml_family(data, source)
    if family != declared:
        raise ValueError(f"{source} describes an {_FAMILY_NAMES[declared]} model, but the checkpoint holds an "
                         f"{_FAMILY_NAMES[family]} one")
    prediction = prediction_type or ldm_yaml_prediction_type(data, source)
    base = _family_preset(family, ldm_yaml_in_channels(data, source), prediction)
    scale = state.get("scale_factor")
    config = ldm_yaml_config(
        data,
        base,
        _infer_text_encoder(state, family, base.text_encoder),
        scale_factor=None if scale is None else float(np.asarray(scale)),
        source=source,
    )
    return config.replace(scheduler=dataclasses.replace(config.scheduler, prediction_type=prediction))


def _is_released_architecture(config: ModelConfig) -> bool:
    """Whether the shapes are those of a released SD model, whose heads and groups are then known."""
    for preset in (*PRESETS.values(), _family_preset("sd2", 9, None)):
        unet = dataclasses.replace(
            config.unet, sample_size=preset.unet.sample_size, upcast_attention=preset.unet.upcast_attention
        )
        vae = dataclasses.replace(
            config.vae, sample_size=preset.vae.sample_size, scaling_factor=preset.vae.scaling_factor
        )
        if unet == preset.unet and vae == preset.vae and config.text_encoder == preset.text_encoder:
            return True
    return False


def _warn_guessed(path: Path, config: ModelConfig) -> None:
    heads = config.unet.heads_per_block()
    text = config.text_encoder
    warnings.warn(
        f"{path.name} carries no model config (no {METADATA_KEY} metadata, no {path.stem}.yaml beside it) and "
        f"its shapes are not those of a released Stable Diffusion model, so these values were guessed from "
        f"the LDM conventions: U-Net attention heads per block {heads} "
        f"({'8 per block' if text.hidden_act == 'quick_gelu' else '64-wide heads'}), GroupNorm groups 32 "
        f"(U-Net and VAE), text encoder heads {text.num_attention_heads} (64-wide). If images look wrong, put "
        f"the model's original LDM config beside the file as {path.stem}.yaml, or pass config= (a ModelConfig, "
        f"a preset name, a diffusers folder or a .yaml path).",
        UserWarning,
        stacklevel=3,
    )


# --- loading and saving ---------------------------------------------------------------------------------------


def resolve_config(config: Union[ModelConfig, str, os.PathLike]) -> ModelConfig:
    """A ``ModelConfig``, a preset name (``"sd15"``, ``"sd21-v"`` ...) or a diffusers-layout folder.

    (An LDM ``.yaml`` needs the checkpoint too: ``load_single_file`` reads it, through ``config_from_ldm_yaml``.)
    """
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, str) and config in PRESETS:
        return PRESETS[config]
    if isinstance(config, (str, os.PathLike)) and Path(config).expanduser().is_dir():
        return weights.read_model_config(Path(config).expanduser())
    raise ValueError(
        f"config={config!r} is not understood; give a ModelConfig, a preset name ({', '.join(PRESETS)}), "
        "a diffusers-layout model folder or an LDM .yaml (v1-inference.yaml style)"
    )


def _with_prediction(config: ModelConfig, prediction_type: Optional[str]) -> ModelConfig:
    if prediction_type is None:
        return config
    return config.replace(scheduler=dataclasses.replace(config.scheduler, prediction_type=prediction_type))


def load_single_file(
    path: Union[str, os.PathLike],
    config: Union[ModelConfig, str, os.PathLike, None] = None,
    *,
    prediction_type: Optional[str] = None,
    use_ema: bool = False,
    dtype=None,
) -> tuple[ModelConfig, dict]:
    """A single-file checkpoint -> ``(ModelConfig, params)``; params are ``dtype`` (default float32) arrays.

    The configuration is, first found: ``config`` (a ``ModelConfig``, preset name, diffusers folder or LDM
    ``.yaml`` path); the ``sdjax.config`` metadata of a file sdjax saved; ``<stem>.yaml`` beside the file;
    inference from shapes (warning when heads or groups had to be assumed). ``prediction_type`` overrides
    the prediction type (otherwise: the config's, the file's ModelSpec metadata, the family default);
    ``use_ema`` takes the U-Net from the ``model_ema.*`` copy.
    """
    _check_prediction_type(prediction_type)
    path = Path(path).expanduser()
    state = read_single_file(path)
    family = detect_family(state)
    if config is not None:
        if _is_yaml(config):
            config = config_from_ldm_yaml(state, config, prediction_type=prediction_type)
        else:
            config = _with_prediction(resolve_config(config), prediction_type)
    elif (recorded := embedded_config(path)) is not None:
        config = _with_prediction(recorded, prediction_type)
    elif (beside := yaml_beside(path)) is not None:
        config = config_from_ldm_yaml(state, beside, prediction_type=prediction_type)
    else:
        config = infer_model_config(state, prediction_type=prediction_type or declared_prediction_type(path))
        if not _is_released_architecture(config):
            _warn_guessed(path, config)
    if uses_open_clip(config) != (family == "sd2"):
        raise ValueError(
            f"config describes an {'SD 2.x (OpenCLIP)' if uses_open_clip(config) else 'SD 1.x (CLIP)'} text "
            f"encoder, but {path} holds an {'SD 2.x' if family == 'sd2' else 'SD 1.x'} one"
        )
    states = ldm_to_diffusers(state, config, use_ema=use_ema)
    params = weights.params_from_state_dicts(config, states, jnp.dtype(dtype or jnp.float32), source=str(path))
    return config, params


def save_single_file(path: Union[str, os.PathLike], config: ModelConfig, params: dict, *, dtype=None) -> None:
    """Write ``params`` as an original-layout ``.safetensors`` single file (optionally cast to ``dtype``).

    The whole ``config`` is recorded in the file's metadata (``sdjax.config``: the diffusers config of each
    component, as JSON), so ``load_single_file`` reads it back exactly with no hints; the prediction type
    is also recorded as ModelSpec metadata (``modelspec.prediction_type``) for other tools.
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
    metadata = {"modelspec.prediction_type": prediction, METADATA_KEY: config_to_metadata(config)}
    write_safetensors(path, tensors, metadata=metadata)
