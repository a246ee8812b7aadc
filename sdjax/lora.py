"""LoRA adapters: create, merge and apply them fused or unfused; read and write them as files.

An adapter is a plain pytree ``{"unet": {path: module}, "text_encoder": {path: module}}``. ``path`` is the
layer's Flax module path joined by "/" (``down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q``)
and ``module`` is ``{"down": (in, r) or (kh, kw, in, r), "up": (r, out), "alpha": ()}`` in fp32: the
layer's kernel becomes ``W + scale * (alpha / r) * down @ up`` (for a convolution, a kh x kw ``down``
convolution followed by a 1x1 ``up`` convolution, which composes to one kh x kw kernel).

Two ways to apply one:

* ``merge_lora(params, [(adapter, scale), ...])`` returns new parameters with the deltas added. The
  pipeline calls it inside its jitted generate function with the scales as traced values, so changing a
  scale never recompiles; ``StableDiffusion.fuse_lora`` calls it once to bake the adapters in.
* ``unfused([(adapter["unet"], scale), ...])`` is a context manager that intercepts the model's Dense
  and Conv layers and adds ``scale * lora(x)`` to their outputs, leaving the base weights and the model
  code untouched. Training uses it: small updates survive a bf16 base, where merging would round them
  away.

Files: ``load_lora_file`` reads diffusers / PEFT, older diffusers and kohya / A1111 files, ``save_lora``
writes PEFT or kohya; the tensor names of each format are ``sdjax.layouts.lora_keys``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from sdjax.config import ModelConfig
from sdjax.layouts.files import read_checkpoint_file, safetensors_metadata, write_safetensors
from sdjax.layouts.ldm import unet_module_table
from sdjax.layouts.lora_keys import (
    COMPONENTS,
    FORMATS,  # noqa: F401  (public here: the formats save_lora writes)
    LORA_FILE_NAMES,
    LoRAError,
    adapter_from_tensors,
    file_metadata,
    lora_state_dict,
)
from sdjax.models.clip import CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.weights import param_shapes


# Layer groups a LoRA can target, as regular expressions over the "/"-joined module path.
TARGETS = {
    "unet": {
        "attention": r".*/attn[12]/(to_q|to_k|to_v|to_out_0)",
        "feed_forward": r".*/ff/(net_0/proj|net_2)",
        "proj": r".*/attentions_\d+/(proj_in|proj_out)",
        "conv": r".*/(resnets_\d+/(conv1|conv2|conv_shortcut)|downsamplers_0/conv|upsamplers_0/conv)",
    },
    "text_encoder": {
        "attention": r"encoder/layers_\d+/self_attn/(q_proj|k_proj|v_proj|out_proj)",
        "feed_forward": r"encoder/layers_\d+/mlp/(fc1|fc2)",
    },
}
DEFAULT_TARGETS = ("attention",)


# --- the math -----------------------------------------------------------------------------------------------


def lora_delta(module: Mapping) -> jnp.ndarray:
    """``(alpha / r) * down @ up`` in the shape of the layer's kernel, fp32."""
    down = jnp.asarray(module["down"], jnp.float32)
    up = jnp.asarray(module["up"], jnp.float32)
    rank = down.shape[-1]
    return jnp.tensordot(down, up, axes=1) * (jnp.asarray(module["alpha"], jnp.float32) / rank)


def merge_lora(params: Mapping, adapters: Sequence[tuple[Mapping, object]]) -> dict:
    """``params`` with every adapter's ``scale * delta`` added to the kernels it targets.

    Deltas are summed in fp32 and added to the kernel in fp32, then cast back to the kernel's dtype.
    Works on arrays or tracers: inside ``jit`` a traced ``scale`` costs no recompilation.
    """
    deltas: dict[tuple, list] = {}
    for adapter, scale in adapters:
        for component, modules in adapter.items():
            for path, module in modules.items():
                deltas.setdefault((component, *path.split("/")), []).append(
                    jnp.asarray(scale, jnp.float32) * lora_delta(module)
                )
    merged = dict(params)
    for component in {key[0] for key in deltas}:
        flat = traverse_util.flatten_dict(dict(params[component]))
        for key, parts in deltas.items():
            if key[0] != component:
                continue
            kernel_key = key[1:] + ("kernel",)
            kernel = flat.get(kernel_key)
            if kernel is None:
                raise LoRAError(f"the adapter targets {component} layer {'/'.join(key[1:])}, which this model lacks")
            flat[kernel_key] = (jnp.asarray(kernel, jnp.float32) + sum(parts)).astype(kernel.dtype)
        merged[component] = traverse_util.unflatten_dict(flat)
    return merged


def _lora_branch(layer: nn.Module, x: jnp.ndarray, module: Mapping) -> jnp.ndarray:
    """The low-rank path ``(alpha / r) * up(down(x))`` of one Dense or Conv layer, in fp32."""
    x = x.astype(jnp.float32)
    down = jnp.asarray(module["down"], jnp.float32)
    if isinstance(layer, nn.Conv):
        strides = layer.strides if layer.strides is not None else 1
        strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
        padding = layer.padding if isinstance(layer.padding, str) else tuple(tuple(p) for p in layer.padding)
        h = jax.lax.conv_general_dilated(x, down, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
        h = x @ down
    return (h @ jnp.asarray(module["up"], jnp.float32)) * (jnp.asarray(module["alpha"], jnp.float32) / down.shape[-1])


def unfused(adapters: Sequence[tuple[Mapping, object]]):
    """Context manager: while active, each targeted Dense/Conv of a module being applied outputs
    ``base(x) + sum(scale * lora(x))``. ``adapters`` holds (one component's {path: module}, scale) pairs::

        with lora.unfused([(adapter["unet"], 1.0)]):
            out = unet.apply({"params": base}, x, t, context)
    """

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(context.module, (nn.Dense, nn.Conv)):
            return out
        path = "/".join(context.module.path)
        for modules, scale in adapters:
            module = modules.get(path)
            if module is not None:
                out = out + (jnp.asarray(scale, jnp.float32) * _lora_branch(context.module, args[0], module)).astype(
                    out.dtype
                )
        return out

    return nn.intercept_methods(interceptor)


# --- creating and splitting adapters ----------------------------------------------------------------------


def _kernel_shapes(template: Mapping) -> dict[str, tuple]:
    """{"a/b/c": kernel shape} of every Dense/Conv layer in a parameter (or shape) tree."""
    return {
        "/".join(path[:-1]): tuple(value.shape)
        for path, value in traverse_util.flatten_dict(dict(template)).items()
        if path[-1] == "kernel"
    }


def target_patterns(targets: Union[str, Iterable[str]], component: str) -> list[str]:
    """Layer-group names (``attention``, ``feed_forward``, ``proj``, ``conv``) or path regexes -> regexes."""
    groups = TARGETS[component]
    patterns = []
    for name in [targets] if isinstance(targets, str) else list(targets):
        if name in groups:
            patterns.append(groups[name])
        elif "/" in name or "*" in name:
            patterns.append(name)
        else:
            raise ValueError(
                f"unknown LoRA target {name!r} for the {component}; accepted: {', '.join(groups)} "
                "or a regular expression over module paths such as '.*/attn1/to_q'"
            )
    return patterns


def init_lora(
    params: Mapping,
    targets: Mapping[str, Union[str, Iterable[str]]],
    rank: int,
    alpha: Optional[float],
    key: jax.Array,
) -> dict:
    """A fresh adapter: ``down`` uniform in ±1/sqrt(fan_in) (as PEFT), ``up`` zero, so it starts as a no-op.

    ``targets`` maps a component (``unet``, ``text_encoder``) to layer-group names or path regexes.
    ``alpha`` None means alpha = rank (scale 1).
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    adapter: dict = {}
    for index, (component, names) in enumerate(sorted(targets.items())):
        if component not in COMPONENTS:
            raise ValueError(f"LoRA can target {', '.join(COMPONENTS)}, got {component!r}")
        patterns = [re.compile(p) for p in target_patterns(names, component)]
        if not patterns:
            continue
        modules = {}
        for n, (path, shape) in enumerate(sorted(_kernel_shapes(params[component]).items())):
            if not any(p.fullmatch(path) for p in patterns):
                continue
            fan_in = int(np.prod(shape[:-1]))
            bound = 1.0 / math.sqrt(fan_in)
            layer_key = jax.random.fold_in(jax.random.fold_in(key, index), n)
            modules[path] = {
                "down": jax.random.uniform(layer_key, shape[:-1] + (rank,), jnp.float32, -bound, bound),
                "up": jnp.zeros((rank, shape[-1]), jnp.float32),
                "alpha": jnp.asarray(float(alpha if alpha is not None else rank), jnp.float32),
            }
        if not modules:
            raise ValueError(f"LoRA targets {names!r} match no layer of the {component}")
        adapter[component] = modules
    return adapter


def split_alpha(adapter: Mapping) -> tuple[dict, dict]:
    """(trainable {"down", "up"} tree, constant alpha tree): alpha is a hyper-parameter, not trained."""
    weights = {c: {p: {"down": m["down"], "up": m["up"]} for p, m in mods.items()} for c, mods in adapter.items()}
    alphas = {c: {p: m["alpha"] for p, m in mods.items()} for c, mods in adapter.items()}
    return weights, alphas


def join_alpha(weights: Mapping, alphas: Mapping) -> dict:
    return {c: {p: {**m, "alpha": alphas[c][p]} for p, m in mods.items()} for c, mods in weights.items()}


def adapter_summary(adapter: Mapping) -> str:
    parts = []
    for component, modules in adapter.items():
        ranks = sorted({int(m["down"].shape[-1]) for m in modules.values()})
        parts.append(f"{component}: {len(modules)} layers, rank {'/'.join(map(str, ranks))}")
    return "; ".join(parts) or "empty"


# --- files --------------------------------------------------------------------------------------------------


def resolve_lora_file(path: Union[str, Path]) -> Path:
    """A LoRA file, or a folder holding one (diffusers' ``pytorch_lora_weights.safetensors``, PEFT's
    ``adapter_model.safetensors``, or a single ``.safetensors``)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in LORA_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        raise FileNotFoundError(
            f"{path} holds {len(files)} .safetensors files; give the LoRA file itself "
            f"(found: {', '.join(f.name for f in files) or 'none'})"
        )
    raise FileNotFoundError(f"no LoRA file at {path}")


def read_lora_file(path: Union[str, Path]) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, safetensors header metadata) of a LoRA file (.safetensors, or a .bin/.pt pickle)."""
    path = resolve_lora_file(path)
    state = read_checkpoint_file(path)
    metadata = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    return state, metadata


def layer_shapes(config: ModelConfig) -> dict[str, dict[str, tuple]]:
    """{component: {"a/b/c": kernel shape}} of the layers a LoRA can adapt (nothing is allocated)."""
    return {
        "unet": _kernel_shapes(param_shapes(UNet2DConditionModel(config=config.unet))),
        "text_encoder": _kernel_shapes(param_shapes(CLIPTextModel(config=config.text_encoder))),
    }


def lora_from_state_dict(
    state: Mapping[str, np.ndarray],
    config: ModelConfig,
    *,
    metadata: Optional[Mapping] = None,
    strict: bool = False,
    source: str = "LoRA",
) -> dict:
    """Tensors of any supported format -> an adapter. Unknown keys warn (or raise with ``strict``);
    a tensor whose shape does not fit its layer raises ``LoRAError`` naming the first such key."""
    return adapter_from_tensors(
        state,
        layer_shapes(config),
        unet_module_table(config.unet),
        metadata=metadata or {},
        strict=strict,
        source=source,
    )


def load_lora_file(path: Union[str, Path], config: ModelConfig, *, strict: bool = False) -> dict:
    """Read a LoRA file (any supported format) into an adapter for a model with ``config``."""
    state, metadata = read_lora_file(path)
    return lora_from_state_dict(state, config, metadata=metadata, strict=strict, source=str(path))


def save_lora(path: Union[str, Path], adapter: Mapping, format: str = "peft", *, dtype=np.float32) -> Path:
    """Write ``adapter`` as a ``.safetensors`` file that diffusers (``peft``), or A1111 and ComfyUI
    (``kohya``), load; diffusers reads both."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors, got {path}")
    tensors = {k: v.astype(dtype) if v.ndim else v for k, v in lora_state_dict(adapter, format).items()}
    write_safetensors(path, tensors, file_metadata(adapter, format))
    return path


def to_host(adapter: Mapping) -> dict:
    return jax.tree.map(lambda x: np.asarray(x), adapter)
