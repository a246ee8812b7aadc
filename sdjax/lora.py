"""LoRA adapters: read and write the diffusers/PEFT and kohya/A1111 file formats, apply them fused or unfused.

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

File formats (``load_lora_file`` detects them, ``save_lora`` writes the first and the last):

* diffusers / PEFT: ``unet.<module>.lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r); alpha from
  the ``lora_adapter_metadata`` header diffusers writes, or ``<module>.alpha``, otherwise alpha = r.
* older diffusers: ``<module>.lora.down.weight`` / ``lora.up.weight``, attention processors
  ``attn1.processor.to_q_lora.down.weight``, text encoder ``lora_linear_layer`` and ``to_q_lora``.
* kohya / A1111 / ComfyUI: ``lora_unet_<module with "_">.lora_down.weight``, ``.lora_up.weight`` and
  ``.alpha``; ``lora_te_text_model_<module>`` for the text encoder; U-Net modules named either after
  diffusers (``lora_unet_down_blocks_0_attentions_0_...``) or after the original LDM U-Net
  (``lora_unet_input_blocks_1_1_...``).
"""

from __future__ import annotations

import json
import math
import re
import struct
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from sdjax.config import ModelConfig
from sdjax.convert import module_path, torch_key

COMPONENTS = ("unet", "text_encoder")
FORMATS = ("peft", "kohya")

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

_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_TEXT_PREFIX = "text_model."
# Old diffusers attention-processor names -> the layer they adapt, per component.
_PROCESSOR_LAYERS = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_DIFFUSERS_ROLES = (
    (re.compile(r"(.+)\.lora_A(?:\.default)?\.weight"), "down"),
    (re.compile(r"(.+)\.lora_B(?:\.default)?\.weight"), "up"),
    (re.compile(r"(.+)\.lora(?:_linear_layer)?\.down\.weight"), "down"),
    (re.compile(r"(.+)\.lora(?:_linear_layer)?\.up\.weight"), "up"),
    (re.compile(r"(.+)\.alpha"), "alpha"),
)
_PROCESSOR_KEY = re.compile(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")


class LoRAError(ValueError):
    """A LoRA file that does not fit the model: wrong architecture, unknown or incomplete layers."""


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


# --- reading files ------------------------------------------------------------------------------------------


def _safetensors_metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return header.get("__metadata__") or {}


def resolve_lora_file(path: Union[str, Path]) -> Path:
    """A LoRA file, or a folder holding one (diffusers' ``pytorch_lora_weights.safetensors``, PEFT's
    ``adapter_model.safetensors``, or a single ``.safetensors``)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors"):
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
    from sdjax import weights

    path = resolve_lora_file(path)
    state = weights.read_checkpoint_file(path)
    metadata = _safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    return state, metadata


def _ldm_kohya_names(config: ModelConfig) -> dict[str, str]:
    """kohya names of the original LDM U-Net modules -> sdjax module paths."""
    from sdjax.single_file import unet_module_table

    return {
        ldm.replace(".", "_"): "/".join(module_path(diffusers + ".weight"))
        for ldm, diffusers in unet_module_table(config.unet).items()
    }


def _torch_module_to_path(module: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``down_blocks_0/attentions_0/proj_in``."""
    return "/".join(module_path(module + ".weight"))


def _path_to_torch_module(path: str) -> str:
    return torch_key(tuple(path.split("/")), "weight")[: -len(".weight")]


def _parse_key(key: str, kohya: Mapping[str, dict], layers: Mapping[str, Mapping]):
    """A LoRA tensor name -> (component, module path, role), or None when sdjax does not know it."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name, _, rest = key.partition(".")
            path = kohya[component].get(name[len(prefix):])
            role = _KOHYA_ROLES.get(rest)
            return (component, path, role) if path and role else None

    component = None
    for prefix in ("unet.", "text_encoder.", "base_model.model."):
        if key.startswith(prefix):
            component = prefix[:-1] if prefix != "base_model.model." else None
            key = key[len(prefix):]
            break

    match = _PROCESSOR_KEY.fullmatch(key)
    if match:
        module, processor, role = match.groups()
        candidates = [component] if component else list(COMPONENTS)
        for c in candidates:
            resolved = _resolve_module(f"{module}.{_PROCESSOR_LAYERS[c][processor]}", c, layers)
            if resolved:
                return resolved + (role,)
        return None
    for pattern, role in _DIFFUSERS_ROLES:
        match = pattern.fullmatch(key)
        if match:
            candidates = [component] if component else list(COMPONENTS)
            for c in candidates:
                resolved = _resolve_module(match.group(1), c, layers)
                if resolved:
                    return resolved + (role,)
            return None
    return None


def _resolve_module(module: str, component: str, layers: Mapping[str, Mapping]):
    if component == "text_encoder" and module.startswith(_TEXT_PREFIX):
        module = module[len(_TEXT_PREFIX):]
    path = _torch_module_to_path(module)
    return (component, path) if path in layers[component] else None


def _metadata_alphas(metadata: Mapping) -> dict[str, dict]:
    """Per component: the PEFT LoraConfig fields diffusers stores in the ``lora_adapter_metadata`` header."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    config = json.loads(raw)
    out: dict[str, dict] = {}
    for key, value in config.items():
        component, _, field = key.partition(".")
        out.setdefault(component, {})[field] = value
    return out


def _peft_alpha(config: Mapping, torch_module: str, rank: int) -> float:
    """PEFT's rule: alpha_pattern (matching a module-name suffix) or lora_alpha; rsLoRA divides by sqrt(r)."""
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", torch_module):
            alpha = value
            break
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # scaling alpha / sqrt(r) written as alpha' / r
    return float(alpha)


def _to_flax(role: str, array: np.ndarray, kernel_shape: tuple) -> Optional[np.ndarray]:
    """A PyTorch-layout down/up tensor in sdjax's layout for a layer with ``kernel_shape``; None if it can't fit."""
    array = np.asarray(array, np.float32)
    conv = len(kernel_shape) == 4
    in_features, out_features = kernel_shape[-2], kernel_shape[-1]
    if role == "down":
        rank = array.shape[0]
        if conv and array.ndim == 4 and array.shape[1:] == (in_features,) + tuple(kernel_shape[:2]):
            return array.transpose(2, 3, 1, 0)
        flat_ok = array.ndim == 2 or (array.ndim == 4 and array.shape[2:] == (1, 1))
        if flat_ok and array.shape[1] == in_features and (not conv or kernel_shape[:2] == (1, 1)):
            down = array.reshape(rank, in_features).T
            return down.reshape(kernel_shape[:-1] + (rank,)) if conv else down
        return None
    flat_ok = array.ndim == 2 or (array.ndim == 4 and array.shape[2:] == (1, 1))
    if flat_ok and array.shape[0] == out_features:
        return array.reshape(out_features, array.shape[1]).T
    return None


def _expected_shape(role: str, kernel_shape: tuple, rank) -> tuple:
    if role == "down":
        return (rank, kernel_shape[-2]) + (tuple(kernel_shape[:2]) if len(kernel_shape) == 4 else ())
    return (kernel_shape[-1], rank) + ((1, 1) if len(kernel_shape) == 4 else ())


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
    layers = {c: _kernel_shapes(t) for c, t in model_templates(config).items()}
    kohya = {
        "unet": {**{p.replace("/", "_"): p for p in layers["unet"]}, **_ldm_kohya_names(config)},
        "text_encoder": {"text_model_" + p.replace("/", "_"): p for p in layers["text_encoder"]},
    }
    peft_configs = _metadata_alphas(metadata or {})
    found: dict[tuple[str, str], dict] = {}
    unknown = []
    for key in sorted(state):
        parsed = _parse_key(key, kohya, layers)
        if parsed is None:
            unknown.append(key)
            continue
        component, path, role = parsed
        entry = found.setdefault((component, path), {})
        if role in entry:
            raise LoRAError(f"{source}: {key} adapts {component} layer {path}, which another tensor already adapts")
        entry[role] = (key, state[key])

    if unknown and not found:
        raise LoRAError(
            f"{source} adapts no layer of this model: none of its {len(state)} tensors is a known LoRA tensor "
            f"of this U-Net or text encoder (first: {', '.join(unknown[:3])}); it may be for another architecture "
            "(SDXL, SD3, Flux) or another kind of adapter (LoHa, LoKr, DoRA)"
        )

    adapter: dict = {}
    for (component, path), entry in sorted(found.items(), key=lambda item: min(k for k, _ in item[1].values())):
        kernel_shape = layers[component][path]
        if "down" not in entry or "up" not in entry:
            have = ", ".join(k for k, _ in entry.values())
            raise LoRAError(f"{source}: {component} layer {path} has an incomplete LoRA (only {have})")
        (down_key, down), (up_key, up) = entry["down"], entry["up"]
        rank = down.shape[0]
        for role, key, array in (("down", down_key, down), ("up", up_key, up)):
            converted = _to_flax(role, array, kernel_shape) if array.ndim in (2, 4) else None
            if converted is None or (role == "up" and array.shape[1] != rank):
                raise LoRAError(
                    f"{source}: {key} has shape {tuple(array.shape)}, but {component} layer {path} (kernel "
                    f"{kernel_shape}) needs {_expected_shape(role, kernel_shape, rank)}: this LoRA was made "
                    "for a different architecture"
                )
            entry[role] = converted
        if "alpha" in entry:
            alpha = float(np.asarray(entry["alpha"][1], np.float32).reshape(()))
        elif component in peft_configs:
            alpha = _peft_alpha(peft_configs[component], _path_to_torch_module(path), rank)
        else:
            alpha = float(rank)
        adapter.setdefault(component, {})[path] = {
            "down": entry["down"],
            "up": entry["up"],
            "alpha": np.asarray(alpha, np.float32),
        }
    if unknown:
        message = (
            f"{source}: {len(unknown)} tensor(s) are not LoRA weights of this model's layers and were not "
            f"loaded: {', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}"
        )
        if strict:
            raise LoRAError(message)
        warnings.warn(message, stacklevel=3)
    return adapter


def model_templates(config: ModelConfig) -> dict:
    """Parameter shapes of the U-Net and text encoder (``jax.eval_shape``: nothing is allocated)."""
    from sdjax.models.clip import CLIPTextModel
    from sdjax.models.unet import UNet2DConditionModel
    from sdjax.weights import parameter_template

    return {
        "unet": parameter_template(UNet2DConditionModel(config=config.unet), "unet", config.unet),
        "text_encoder": parameter_template(
            CLIPTextModel(config=config.text_encoder), "text_encoder", config.text_encoder
        ),
    }


def load_lora_file(path: Union[str, Path], config: ModelConfig, *, strict: bool = False) -> dict:
    """Read a LoRA file (any supported format) into an adapter for a model with ``config``."""
    state, metadata = read_lora_file(path)
    return lora_from_state_dict(state, config, metadata=metadata, strict=strict, source=str(path))


# --- writing files ------------------------------------------------------------------------------------------


def _torch_layout(module: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) as PyTorch weights: linear (r, in) / (out, r), conv (r, in, kh, kw) / (out, r, 1, 1)."""
    down = np.asarray(module["down"], np.float32)
    up = np.asarray(module["up"], np.float32).T
    if down.ndim == 4:
        return down.transpose(3, 2, 0, 1), up[:, :, None, None]
    return down.T, up


def lora_state_dict(adapter: Mapping, format: str = "peft") -> dict[str, np.ndarray]:
    """An adapter as PyTorch-layout tensors in ``format``: ``peft`` (diffusers, alpha/r folded into
    ``lora_B``, which every loader reads the same) or ``kohya`` (A1111 / ComfyUI, with ``.alpha``)."""
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; accepted: {', '.join(FORMATS)}")
    out = {}
    for component, modules in adapter.items():
        if component not in COMPONENTS:
            raise ValueError(f"adapter component {component!r} is not one of {', '.join(COMPONENTS)}")
        for path, module in modules.items():
            down, up = _torch_layout(module)
            alpha = float(np.asarray(module["alpha"]))
            if format == "peft":
                name = _path_to_torch_module(path)
                prefix = "unet." if component == "unet" else "text_encoder." + _TEXT_PREFIX
                out[f"{prefix}{name}.lora_A.weight"] = down
                out[f"{prefix}{name}.lora_B.weight"] = up * (alpha / down.shape[0])
            else:
                prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
                name = prefix + path.replace("/", "_")
                out[f"{name}.lora_down.weight"] = down
                out[f"{name}.lora_up.weight"] = up
                out[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    return out


def save_lora(path: Union[str, Path], adapter: Mapping, format: str = "peft", *, dtype=np.float32) -> Path:
    """Write ``adapter`` as a ``.safetensors`` file that diffusers (``peft``), or A1111 and ComfyUI
    (``kohya``), load; diffusers reads both."""
    from sdjax.weights import write_safetensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors, got {path}")
    tensors = {k: v.astype(dtype) if v.ndim else v for k, v in lora_state_dict(adapter, format).items()}
    metadata = {"sdjax_format": format}
    if format == "kohya":
        ranks = {int(m["down"].shape[-1]) for mods in adapter.values() for m in mods.values()}
        alphas = {float(np.asarray(m["alpha"])) for mods in adapter.values() for m in mods.values()}
        metadata["ss_network_module"] = "networks.lora"
        if len(ranks) == 1 and len(alphas) == 1:
            metadata["ss_network_dim"] = str(ranks.pop())
            metadata["ss_network_alpha"] = f"{alphas.pop():g}"
    write_safetensors(path, tensors, metadata)
    return path


def to_host(adapter: Mapping) -> dict:
    return jax.tree.map(lambda x: np.asarray(x), adapter)
