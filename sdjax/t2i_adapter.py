"""T2I-Adapters: load (diffusers folders, hub repos, original TencentARC files), run, combine and save.

>>> adapter = load_t2i_adapter("TencentARC/t2iadapter_canny_sd15v2")      # or a folder, or a .pth / .safetensors
>>> features = adapter.features(control_nhwc)    # list of NHWC maps, one per U-Net down level
>>> features = scale_features(features, 0.8)     # adapter_conditioning_scale
>>> save_t2i_adapter(adapter, "out/adapter")     # loads in diffusers' T2IAdapter.from_pretrained

A single file in the original layout has no config: it is read from the key names and tensor shapes
(``infer_t2i_adapter_config``), or given as ``config=``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import weights
from sdjax.config import T2IAdapterConfig
from sdjax.layouts import t2i_adapter_keys as keys
from sdjax.layouts.diffusers import WeightsMismatchError, flax_to_torch, torch_to_flax
from sdjax.layouts.files import PICKLE_SUFFIXES, read_checkpoint_file, write_safetensors
from sdjax.models.t2i_adapter import T2IAdapterModel, combine_features, scale_features  # noqa: F401  (re-exported)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

ConfigLike = Union[T2IAdapterConfig, dict, str, os.PathLike]


@dataclasses.dataclass(frozen=True, eq=False)  # params are arrays: identity, not value, equality
class T2IAdapter:
    """A loaded T2I-Adapter: its config, parameter tree and Flax module, in ``dtype``."""

    config: T2IAdapterConfig
    params: dict
    module: T2IAdapterModel
    dtype: Any

    def features(self, image: Any) -> list[jax.Array]:
        """A control image batch, NHWC in the adapter's input range -> one feature map per level, NHWC."""
        return self.module.apply({"params": self.params}, jnp.asarray(image))

    @property
    def total_downscale_factor(self) -> int:
        return self.config.total_downscale_factor


def multi_adapter_features(
    adapters: Sequence[T2IAdapter], images: Sequence[Any], adapter_weights: Optional[Sequence[float]] = None
) -> list[jax.Array]:
    """diffusers' ``MultiAdapter``: adapter k runs on image k; per level, the weighted sum of their features."""
    if len(adapters) != len(images):
        raise ValueError(f"multi_adapter_features needs one image per adapter; got {len(adapters)} adapters, "
                         f"{len(images)} images")
    return combine_features([a.features(image) for a, image in zip(adapters, images)], adapter_weights)


def default_dtype() -> jnp.dtype:
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


# --- state dicts <-> parameter trees ----------------------------------------------------------------------


def param_shapes(config: T2IAdapterConfig, dtype: Any = jnp.float32) -> dict:
    """The adapter's parameter shapes (``jax.ShapeDtypeStruct``), from ``jax.eval_shape``."""
    module = T2IAdapterModel(config, dtype=dtype, param_dtype=dtype)
    side = config.total_downscale_factor
    image = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), image)["params"]


def _one_line(error: Exception) -> str:
    first, *rest = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join([first, "; ".join(rest)]) if rest else first


def params_from_state_dict(
    state: Mapping[str, Any],
    config: T2IAdapterConfig,
    dtype: Any = jnp.float32,
    *,
    what: str = "T2I-Adapter checkpoint",
) -> dict:
    """A diffusers-layout ``T2IAdapter`` state dict -> Flax params: every tensor used once, every param filled."""
    try:
        params = torch_to_flax(state, param_shapes(config, dtype), what=what, dtype=dtype)
    except WeightsMismatchError as e:
        raise WeightsMismatchError(_one_line(e)) from None
    return jax.tree.map(jnp.asarray, params)


def to_diffusers_keys(state: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """A state dict in either layout with diffusers' keys (original TencentARC files are renamed)."""
    if keys.is_diffusers_layout(state):
        return dict(state)
    unsupported = keys.unsupported_original_modules(state)
    if unsupported:
        raise ValueError(f"{source} is an original T2I-Adapter with {'; '.join(unsupported)}, which diffusers' "
                         "T2IAdapter (and sdjax) cannot represent")
    blocks = 0 if keys.is_light_original(state) else keys.original_blocks_per_level(state)
    return keys.original_to_diffusers(state, blocks_per_level=blocks)


def _body_levels(state: Mapping[str, np.ndarray]) -> int:
    found = [int(m.group(1)) for m in (re.match(r"^adapter\.body\.(\d+)\.", k) for k in state) if m]
    return max(found) + 1 if found else 0


def infer_t2i_adapter_config(state: Mapping[str, np.ndarray]) -> T2IAdapterConfig:
    """The config of a diffusers-keyed adapter state dict, from its key names and tensor shapes.

    Two things are not in the shapes. The pixel-unshuffle factor: 16 (the SDXL adapter, ``full_adapter_xl``)
    when the first conv takes 256 or 768 channels (1 or 3 input channels unshuffled by 16), else 8. And the
    SDXL adapter's weights look like the SD 1.x full adapter's: the factor is what tells them apart.
    """
    def shape(key: str) -> tuple:
        if key not in state:
            raise ValueError(f"cannot infer the T2I-Adapter config: the checkpoint has no {key}; pass config=")
        return tuple(state[key].shape)

    levels = _body_levels(state)
    if levels == 0:
        raise ValueError("cannot infer the T2I-Adapter config: the checkpoint has no adapter body tensors "
                         f"(first keys: {', '.join(sorted(state)[:3]) or 'none'})")
    resnets = len({m.group(1) for m in (re.match(r"^adapter\.body\.0\.resnets\.(\d+)\.", k) for k in state) if m})
    light = any(k.endswith(".out_conv.weight") for k in state)
    if light:
        if levels < 2:
            raise ValueError("cannot infer the T2I-Adapter config: a light adapter needs at least 2 levels")
        channels = tuple(shape(f"adapter.body.{i}.out_conv.weight")[0] for i in range(levels - 1))
        last = shape(f"adapter.body.{levels - 1}.out_conv.weight")[0]
        if last != channels[-1]:
            raise ValueError(f"light T2I-Adapter's last level is {last} wide, not {channels[-1]} like the one "
                             "before it; diffusers' light adapter cannot represent it")
        unshuffled = shape("adapter.body.0.in_conv.weight")[1]
    else:
        channels = tuple(shape(f"adapter.body.{i}.resnets.0.block1.weight")[0] for i in range(levels))
        unshuffled = shape("adapter.conv_in.weight")[1]
    if not light and unshuffled in (256, 768):
        adapter_type, factor = "full_adapter_xl", 16
    else:
        adapter_type, factor = ("light_adapter" if light else "full_adapter"), 8
    if unshuffled % (factor * factor):
        raise ValueError(f"cannot infer the T2I-Adapter config: its first conv takes {unshuffled} channels, not "
                         f"a multiple of {factor * factor} (an image unshuffled by {factor}); pass config=")
    return T2IAdapterConfig(
        in_channels=unshuffled // (factor * factor),
        channels=channels,
        num_res_blocks=resnets,
        downscale_factor=factor,
        adapter_type=adapter_type,
    )


# --- files, folders and hub repos -------------------------------------------------------------------------


def _config_from(config: ConfigLike) -> T2IAdapterConfig:
    if isinstance(config, T2IAdapterConfig):
        return config
    if isinstance(config, dict):
        return T2IAdapterConfig.from_diffusers_config(config)
    path = Path(config).expanduser()
    return T2IAdapterConfig.from_diffusers_config(path / CONFIG_NAME if path.is_dir() else path)


def load_t2i_adapter(
    path_or_repo_id: Union[str, os.PathLike],
    *,
    dtype: Any = None,
    config: Optional[ConfigLike] = None,
    revision: Optional[str] = None,
    token: Optional[str] = None,
) -> T2IAdapter:
    """A T2I-Adapter from a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or
    ``.bin``), a hub repo id, or a single ``.safetensors`` / ``.pth`` / ``.bin`` file in the original TencentARC
    or the diffusers layout.

    ``config`` (a ``T2IAdapterConfig``, a diffusers config dict, a ``config.json`` or its folder) overrides the
    folder's config or, for a single file, the one inferred from its shapes. ``dtype``: fp32 on the CPU,
    bf16 on accelerators by default.
    """
    dtype = jnp.dtype(dtype or default_dtype())
    path = Path(path_or_repo_id).expanduser()
    if path.is_file():
        state = to_diffusers_keys(read_checkpoint_file(path), source=str(path))
        resolved = _config_from(config) if config is not None else infer_t2i_adapter_config(state)
    else:
        if path.is_dir():
            folder = path
        else:
            text = str(path_or_repo_id)
            looks_like_file = path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)
            if looks_like_file or text.count("/") != 1 or text.startswith((".", "/", "~")):
                raise FileNotFoundError(
                    f"T2I-Adapter not found: {text} is no file or folder (and not a hub repo id like 'org/name')"
                )
            folder = weights.component_snapshot(text, what="T2I-Adapter", revision=revision, token=token)
        if config is None and not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; a diffusers T2I-Adapter folder holds "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME} (or pass config=)")
        resolved = _config_from(config if config is not None else folder / CONFIG_NAME)
        state = to_diffusers_keys(weights.read_component(folder), source=str(folder))
    params = params_from_state_dict(state, resolved, dtype, what=f"T2I-Adapter checkpoint {path_or_repo_id}")
    return T2IAdapter(resolved, params, T2IAdapterModel(resolved, dtype=dtype, param_dtype=dtype), dtype)


def save_t2i_adapter(adapter: T2IAdapter, folder: Union[str, os.PathLike]) -> None:
    """Write the diffusers layout (``config.json`` + ``diffusion_pytorch_model.safetensors``) that diffusers'
    ``T2IAdapter.from_pretrained`` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS_NAME, flax_to_torch(jax.device_get(adapter.params)))
    (folder / CONFIG_NAME).write_text(json.dumps(adapter.config.to_diffusers_config(), indent=2))
