"""ControlNets: the typed value a pipeline's controls take, loaded from and saved to diffusers and original files.

``load_controlnet`` reads, first match wins:

* a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, sharded, a ``variant``, or ``.bin``
  through sdjax's safe unpickler);
* an original single file (``control_v11p_sd15_canny.pth`` / ``.safetensors``, keys ``control_model.*`` or bare);
  its config is ``config=``, else the one sdjax records in files it writes, else inferred from tensor shapes;
* a hub repo id (``lllyasviel/control_v11p_sd15_canny``), from the local Hugging Face cache or downloaded.

Shape inference follows the original ``cldm_v15.yaml`` / ``cldm_v21.yaml`` for what shapes cannot tell:
8 heads per block for 768-d (SD 1.x) context, 64-wide heads for 1024-d (SD 2.x), 32 GroupNorm groups, RGB
input, no global pooling (shuffle ControlNets need ``config=`` with ``global_pool_conditions=True``).
Every tensor is used exactly once and every parameter filled, or a one-line ``WeightsMismatchError`` says what
does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import weights
from sdjax.config import ControlNetConfig, UNetConfig
from sdjax.layouts import controlnet_ldm
from sdjax.layouts.diffusers import WeightsMismatchError, flax_to_torch, torch_to_flax
from sdjax.layouts.files import PICKLE_SUFFIXES, read_checkpoint_file, safetensors_metadata, write_safetensors
from sdjax.models.controlnet import ControlNetModel

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# The ControlNetConfig sdjax records in the safetensors metadata of single files it writes.
METADATA_KEY = "sdjax.controlnet_config"
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


@dataclasses.dataclass(frozen=True, eq=False)
class ControlNet:
    """A loaded ControlNet: its config, parameter tree (``dtype`` arrays) and the Flax module that runs them."""

    config: ControlNetConfig
    params: Any
    module: ControlNetModel
    dtype: Any

    def residuals(self, sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                  guess_mode=False) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """(down residuals, mid residual) for NHWC latents and an NHWC conditioning image; see ``ControlNetModel``."""
        return self.module.apply({"params": self.params}, sample, timesteps, encoder_hidden_states, controlnet_cond,
                                 conditioning_scale, guess_mode)


def _default_dtype():
    # The same rule as StableDiffusion: bf16 where matrix units want it (TPU/GPU), fp32 on the CPU.
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _example_inputs(config: ControlNetConfig) -> tuple:
    side = 2 ** (len(config.block_out_channels) - 1)
    factor = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
    return (
        jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32),
        jax.ShapeDtypeStruct((1, side * factor, side * factor, config.conditioning_channels), jnp.float32),
    )


def params_from_state_dict(state: Mapping[str, Any], config: ControlNetConfig, dtype, *, source: str) -> dict:
    """A diffusers ``ControlNetModel`` state dict -> the Flax parameter tree (``dtype`` device arrays)."""
    module = ControlNetModel(config, dtype=dtype, param_dtype=dtype)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *_example_inputs(config))["params"]
    try:
        params = torch_to_flax(state, shapes, what=f"ControlNet {source}", dtype=dtype)
    except WeightsMismatchError as e:
        raise WeightsMismatchError(" ".join(line.strip() for line in str(e).splitlines())) from None
    return jax.tree.map(jnp.asarray, params)


# --- configs --------------------------------------------------------------------------------------------------


def resolve_config(config: Union[ControlNetConfig, Mapping, str, os.PathLike]) -> ControlNetConfig:
    """A ``ControlNetConfig`` from itself, a diffusers config dict, a ``config.json`` or a folder holding one."""
    if isinstance(config, ControlNetConfig):
        return config
    if isinstance(config, Mapping):
        return ControlNetConfig.from_diffusers_config(dict(config))
    path = Path(config).expanduser()
    return ControlNetConfig.from_diffusers_config(path / "config.json" if path.is_dir() else path)


def _indices(keys, prefix: str) -> list[int]:
    found = {key[len(prefix):].split(".", 1)[0] for key in keys if key.startswith(prefix)}
    return sorted(int(head) for head in found if head.isdigit())


def _tensor(state: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in state:
        raise ValueError(f"not an original-layout ControlNet: no {key!r} (expected control_model.input_blocks.*, "
                         "zero_convs.*, input_hint_block.*, middle_block_out.*; for diffusers keys pass config=)")
    return state[key]


def infer_config(state: Mapping[str, np.ndarray]) -> ControlNetConfig:
    """The ``ControlNetConfig`` of an original-layout state dict, from key names and tensor shapes."""
    s = controlnet_ldm.strip_control_prefix(state)
    conv_in = _tensor(s, "input_blocks.0.0.weight")
    levels: list[list[tuple[int, bool]]] = [[]]
    for i in _indices(s, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in s:
            levels.append([])
            continue
        channels = int(_tensor(s, f"input_blocks.{i}.0.out_layers.3.weight").shape[0])
        levels[-1].append((channels, f"input_blocks.{i}.1.proj_in.weight" in s))
    layers = {len(level) for level in levels}
    if len(layers) != 1 or 0 in layers or any(len(set(level)) != 1 for level in levels):
        raise ValueError(f"unsupported ControlNet layout: resnets, channels and attention must be uniform within "
                         f"a level; found {levels}")
    cross = next((s[k] for k in sorted(s) if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((s[k] for k in sorted(s) if k.endswith(".proj_in.weight")), None)
    if cross is None or proj_in is None:
        raise ValueError("the ControlNet has no cross-attention layers; it is not an SD 1.x / 2.x ControlNet")
    block_out_channels = tuple(level[0][0] for level in levels)
    context = int(cross.shape[1])
    heads: Union[int, tuple] = tuple(c // 64 for c in block_out_channels) if context == 1024 else 8
    hint = _indices(s, "input_hint_block.")
    if len(hint) < 2 or len(hint) % 2 or hint != list(range(0, 2 * len(hint), 2)):
        raise ValueError(f"unsupported input_hint_block layout: convolutions at {hint}; expected 0, 2, 4, ... "
                         "(an even count)")
    hint_out = [int(_tensor(s, f"input_hint_block.{i}.weight").shape[0]) for i in hint]
    return ControlNetConfig(
        in_channels=int(conv_in.shape[1]),
        conditioning_channels=int(_tensor(s, "input_hint_block.0.weight").shape[1]),
        down_block_types=tuple("CrossAttnDownBlock2D" if level[0][1] else "DownBlock2D" for level in levels),
        block_out_channels=block_out_channels,
        layers_per_block=layers.pop(),
        attention_head_dim=heads,
        cross_attention_dim=context,
        use_linear_projection=proj_in.ndim == 2,
        conditioning_embedding_out_channels=(hint_out[0], *hint_out[2:-1:2]),
    )


def check_compatible(controlnet_config: ControlNetConfig, unet_config: UNetConfig) -> None:
    """A one-line ``ValueError`` when a ControlNet was built for another base model than this U-Net."""
    ours, theirs = controlnet_config.cross_attention_dim, unet_config.cross_attention_dim
    if ours != theirs:
        built_for = f"{ours} ({_FAMILIES[ours]})" if ours in _FAMILIES else f"{ours}"
        unet = f"{theirs}, {_FAMILIES[theirs]}" if theirs in _FAMILIES else f"{theirs}"
        raise ValueError(f"ControlNet built for cross_attention_dim {built_for} cannot drive this U-Net ({unet})")
    shape = ("block_out_channels", "layers_per_block")
    if any(getattr(controlnet_config, k) != getattr(unet_config, k) for k in shape):
        raise ValueError(
            "ControlNet built for " + ", ".join(f"{k} {getattr(controlnet_config, k)}" for k in shape)
            + " cannot drive this U-Net (" + ", ".join(f"{k} {getattr(unet_config, k)}" for k in shape) + ")"
        )


# --- loading --------------------------------------------------------------------------------------------------


def _from_folder(folder: Path, dtype, variant: Optional[str], config) -> ControlNet:
    if config is None and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers ControlNet folder: no config.json")
    cfg = resolve_config(folder if config is None else config)
    state = weights.read_component(folder, variant)
    return _build(cfg, params_from_state_dict(state, cfg, dtype, source=str(folder)), dtype)


def _from_single_file(path: Path, dtype, config) -> ControlNet:
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"unknown ControlNet file type {path.name!r}; accepted: {', '.join(SINGLE_FILE_SUFFIXES)}")
    state = read_checkpoint_file(path)
    recorded = safetensors_metadata(path).get(METADATA_KEY) if path.suffix == ".safetensors" else None
    if config is not None:
        cfg = resolve_config(config)
    elif recorded is not None:
        cfg = ControlNetConfig.from_diffusers_config(json.loads(recorded))
    else:
        cfg = infer_config(state)
    if "controlnet_cond_embedding.conv_in.weight" in state:  # diffusers keys in one file
        diffusers_state = state
    else:
        diffusers_state = controlnet_ldm.ldm_to_diffusers(state, cfg)
    return _build(cfg, params_from_state_dict(diffusers_state, cfg, dtype, source=str(path)), dtype)


def _build(config: ControlNetConfig, params: dict, dtype) -> ControlNet:
    return ControlNet(config, params, ControlNetModel(config, dtype=dtype, param_dtype=dtype), jnp.dtype(dtype))


def builtin_controlnet_dir() -> Path:
    """Where the built-in model's ControlNet (Canny edges of its shapes) is shipped in the package."""
    return Path(__file__).resolve().parent / "assets" / "builtin" / "controlnet"


def builtin_controlnet(dtype=None) -> ControlNet:
    """The built-in model's ControlNet: trained by sdjax on Canny edges of the shapes data set
    (``scripts/train_builtin_controlnet.py``), for ``StableDiffusion.default()``."""
    folder = builtin_controlnet_dir()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the built-in model's ControlNet is not installed ({folder} is missing); "
                                "load another with load_controlnet(path_or_repo_id)")
    return load_controlnet(folder, dtype=dtype)


def load_controlnet(
    path_or_repo_id: Union[str, os.PathLike],
    *,
    dtype=None,
    variant: Optional[str] = None,
    config: Union[ControlNetConfig, Mapping, str, os.PathLike, None] = None,
    revision: Optional[str] = None,
    token: Optional[str] = None,
) -> ControlNet:
    """A ControlNet from a diffusers folder, an original single file or a hub repo id (see the module docstring).

    ``dtype`` defaults to fp32 on the CPU and bf16 on accelerators; ``variant`` picks ``*.{variant}.safetensors``
    in folders and repos; ``config`` (a ``ControlNetConfig``, diffusers config dict, ``config.json`` or folder)
    overrides what the checkpoint says or what its shapes suggest.
    """
    dtype = jnp.dtype(dtype or _default_dtype())
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return _from_folder(path, dtype, variant, config)
    if path.is_file():
        return _from_single_file(path, dtype, config)
    text = str(path_or_repo_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise FileNotFoundError(f"ControlNet not found: {text} (not a folder, a file or a hub repo id like 'org/name')")
    folder = weights.component_snapshot(text, what="ControlNet", revision=revision, token=token, variant=variant)
    return _from_folder(folder, dtype, variant, config)


# --- saving ---------------------------------------------------------------------------------------------------


def save_controlnet(controlnet: ControlNet, folder: Union[str, os.PathLike]) -> None:
    """Write a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) that diffusers'
    ``ControlNetModel.from_pretrained`` loads."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS_NAME, flax_to_torch(jax.device_get(controlnet.params)))
    (folder / "config.json").write_text(json.dumps(controlnet.config.to_diffusers_config(), indent=2))


def save_controlnet_single_file(controlnet: ControlNet, path: Union[str, os.PathLike]) -> None:
    """Write the original layout (``control_model.*`` keys) as ``.safetensors``, with the config in its metadata,
    so sdjax loads it back exactly and original-layout tools (A1111, ComfyUI, diffusers' converter) read it."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(f"save_controlnet_single_file writes .safetensors files; got {path.name!r}")
    state = controlnet_ldm.diffusers_to_ldm(flax_to_torch(jax.device_get(controlnet.params)), controlnet.config)
    write_safetensors(path, state, metadata={METADATA_KEY: json.dumps(controlnet.config.to_diffusers_config())})
