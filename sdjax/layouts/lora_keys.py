"""LoRA file layouts: the tensor names diffusers / PEFT, older diffusers and kohya / A1111 write, both ways.

An adapter is ``{"unet": {path: module}, "text_encoder": {path: module}}`` with ``path`` a Flax module
path joined by "/" and ``module`` ``{"down", "up", "alpha"}`` in sdjax's (Flax) layout; see ``sdjax.lora``.
Reading needs the kernel shape of every layer a file may adapt (``layers``: {component: {path: shape}}),
which the caller computes from the model.

* diffusers / PEFT: ``unet.<module>.lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r); alpha from
  the ``lora_adapter_metadata`` header diffusers writes, or ``<module>.alpha``, otherwise alpha = r.
* older diffusers: ``<module>.lora.down.weight`` / ``lora.up.weight``, attention processors
  ``attn1.processor.to_q_lora.down.weight``, text encoder ``lora_linear_layer`` and ``to_q_lora``.
* kohya / A1111 / ComfyUI: ``lora_unet_<module with "_">.lora_down.weight``, ``.lora_up.weight`` and
  ``.alpha``; ``lora_te_text_model_<module>`` for the text encoder; U-Net modules named either after
  diffusers (``lora_unet_down_blocks_0_attentions_0_...``) or after the original LDM U-Net
  (``lora_unet_input_blocks_1_1_...``).

Few-step accelerator LoRAs are ordinary files in these layouts: lcm-lora-sdv1-5 and Hyper-SD15-*-lora are
kohya with diffusers module names, TCD-SD15-LoRA is diffusers'. Besides attention they adapt the resnets'
3x3 convs (a (r, in, 3, 3) ``down``, a (out, r, 1, 1) ``up``), ``conv_shortcut``, ``time_emb_proj``, the
down/up-sampler convs and the feed-forward layers (tests/test_accelerator_loras.py).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from typing import Mapping, Optional

import numpy as np

from sdjax.layouts.diffusers import TEXT_MODEL_PREFIX, module_path, torch_key

COMPONENTS = ("unet", "text_encoder")
FORMATS = ("peft", "kohya")
# The file names diffusers (pipe.save_lora_weights) and PEFT (save_pretrained) give a LoRA.
LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")

_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
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


# --- reading ------------------------------------------------------------------------------------------------


def _kohya_names(layers: Mapping[str, Mapping], ldm_unet_table: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Per component: kohya module names (without the ``lora_unet_`` / ``lora_te_`` prefix) -> module paths.

    U-Net modules have two names, after diffusers and after the original LDM U-Net (``ldm_unet_table``:
    LDM module path -> diffusers module path).
    """
    ldm_names = {ldm.replace(".", "_"): _torch_module_to_path(diffusers) for ldm, diffusers in ldm_unet_table.items()}
    return {
        "unet": {**{p.replace("/", "_"): p for p in layers["unet"]}, **ldm_names},
        "text_encoder": {"text_model_" + p.replace("/", "_"): p for p in layers["text_encoder"]},
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
    if component == "text_encoder" and module.startswith(TEXT_MODEL_PREFIX):
        module = module[len(TEXT_MODEL_PREFIX):]
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


def adapter_from_tensors(
    state: Mapping[str, np.ndarray],
    layers: Mapping[str, Mapping[str, tuple]],
    ldm_unet_table: Mapping[str, str],
    *,
    metadata: Mapping,
    strict: bool,
    source: str,
) -> dict:
    """Tensors of any supported format -> an adapter for the layers in ``layers``. Unknown keys warn (or
    raise with ``strict``); a tensor whose shape does not fit its layer raises ``LoRAError`` naming the
    first such key."""
    kohya = _kohya_names(layers, ldm_unet_table)
    peft_configs = _metadata_alphas(metadata)
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
        warnings.warn(message, stacklevel=4)  # points at the caller of sdjax.lora.load_lora_file
    return adapter


# --- writing ------------------------------------------------------------------------------------------------


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
                prefix = "unet." if component == "unet" else "text_encoder." + TEXT_MODEL_PREFIX
                out[f"{prefix}{name}.lora_A.weight"] = down
                out[f"{prefix}{name}.lora_B.weight"] = up * (alpha / down.shape[0])
            else:
                prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
                name = prefix + path.replace("/", "_")
                out[f"{name}.lora_down.weight"] = down
                out[f"{name}.lora_up.weight"] = up
                out[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    return out


def file_metadata(adapter: Mapping, format: str) -> dict[str, str]:
    """The safetensors header metadata written with ``format``: kohya's ``ss_network_*`` fields as well."""
    metadata = {"sdjax_format": format}
    if format == "kohya":
        ranks = {int(m["down"].shape[-1]) for mods in adapter.values() for m in mods.values()}
        alphas = {float(np.asarray(m["alpha"])) for mods in adapter.values() for m in mods.values()}
        metadata["ss_network_module"] = "networks.lora"
        if len(ranks) == 1 and len(alphas) == 1:
            metadata["ss_network_dim"] = str(ranks.pop())
            metadata["ss_network_alpha"] = f"{alphas.pop():g}"
    return metadata
