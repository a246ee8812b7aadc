"""Model configurations that travel with single files: sdjax's own JSON metadata and original LDM ``.yaml``.

* ``config_to_metadata`` / ``config_from_metadata``: the full ``ModelConfig`` as one JSON object (the
  diffusers / transformers config of each component, as ``to_diffusers_config`` writes it) stored under
  ``METADATA_KEY`` in a safetensors ``__metadata__``; a file sdjax wrote loads back with no hints.
* ``read_ldm_yaml`` / ``ldm_yaml_config``: the CompVis / Stability ``v1-inference.yaml``,
  ``v2-inference(-v).yaml``, ``v1-inpainting-inference.yaml`` format (``model.params.unet_config.params``,
  ``first_stage_config``, ``cond_stage_config``), which A1111 reads from ``<checkpoint stem>.yaml``.
  It fixes the U-Net heads, the schedule and the prediction type; the LDM code it describes always uses
  32 GroupNorm groups. The text encoder is not described in it beyond its family.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, Mapping, Optional

from sdjax.config import CLIPTextConfig, ModelConfig, SchedulerConfig, UNetConfig, VAEConfig

METADATA_KEY = "sdjax.config"
METADATA_FORMAT = 1
# Fields whose value the diffusers config did not carry back exactly are stored here, inside a component.
_EXACT = "_sdjax_fields"


# --- sdjax's JSON metadata --------------------------------------------------------------------------------------


def _component_types() -> dict[str, Any]:
    hints = typing.get_type_hints(ModelConfig)
    out = {}
    for field in dataclasses.fields(ModelConfig):
        hint = hints[field.name]
        options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        out[field.name] = next((t for t in options if hasattr(t, "from_diffusers_config")), None)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def _component_from_json(kind: Any, data: dict) -> Any:
    data = dict(data)
    exact = data.pop(_EXACT, {})
    value = kind.from_diffusers_config(data)
    return dataclasses.replace(value, **{k: _from_json(v) for k, v in exact.items()}) if exact else value


def config_to_metadata(config: ModelConfig) -> str:
    """The JSON string ``save_single_file`` stores under ``METADATA_KEY``; it reads back to ``config``."""
    data: dict[str, Any] = {"format": METADATA_FORMAT}
    for name, kind in _component_types().items():
        value = getattr(config, name)
        if kind is None or value is None:
            data[name] = _jsonable(value)
            continue
        component = value.to_diffusers_config()
        back = _component_from_json(kind, json.loads(json.dumps(component)))
        differs = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                   if getattr(back, f.name) != getattr(value, f.name)}
        if differs:
            component[_EXACT] = differs
        data[name] = component
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    if config_from_metadata({METADATA_KEY: text}) != config:
        raise ValueError(f"this ModelConfig cannot be recorded exactly in {METADATA_KEY} metadata: {config}")
    return text


def config_from_metadata(metadata: Mapping[str, str], source: str = "the file") -> Optional[ModelConfig]:
    """The ``ModelConfig`` an sdjax-written file records in its ``__metadata__`` (``None`` if it has none)."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: its {METADATA_KEY} metadata is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != METADATA_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{source}: {METADATA_KEY} metadata has format {found!r}; this sdjax reads {METADATA_FORMAT}")
    values: dict[str, Any] = {}
    for name, kind in _component_types().items():
        if name not in data:
            continue  # a field added after the file was written: its default
        value = data[name]
        values[name] = _component_from_json(kind, value) if kind is not None and value is not None else _from_json(value)
    try:
        return ModelConfig(**values)
    except TypeError as e:
        raise ValueError(f"{source}: {METADATA_KEY} metadata is incomplete ({e})") from None


# --- original LDM .yaml -----------------------------------------------------------------------------------------

LDM_TEXT_ENCODERS = {"FrozenCLIPEmbedder": "sd1", "FrozenOpenCLIPEmbedder": "sd2"}
_PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# LDM's schedule names -> diffusers': LDM "linear" is linear in sqrt(beta), which diffusers calls scaled_linear.
_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}


def _params(data: Mapping, *path: str, source: str) -> dict:
    node: Any = data
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
        if node is None:
            raise ValueError(f"{source} is not an LDM model config: it has no {'.'.join(path[: path.index(key) + 1])}; "
                             "expected model.params.unet_config.params, first_stage_config and cond_stage_config")
    if not isinstance(node, Mapping):
        raise ValueError(f"{source}: {'.'.join(path)} is a {type(node).__name__}, expected a mapping")
    return dict(node)


def read_ldm_yaml(path: os.PathLike) -> dict:
    """An LDM ``.yaml`` model config, read with ``yaml.safe_load`` (no tags, no code) and checked for shape."""
    import yaml  # imported here: only single files with a .yaml need it

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not an LDM model config: it holds a {type(data).__name__}, not a mapping")
    for part in ("unet_config", "first_stage_config", "cond_stage_config"):
        _params(data, "model", "params", part, source=str(path))
    return data


def ldm_yaml_family(data: Mapping, source: str = "the .yaml") -> str:
    """``"sd1"`` or ``"sd2"``, from ``cond_stage_config.target``."""
    target = str(_params(data, "model", "params", "cond_stage_config", source=source).get("target", ""))
    family = LDM_TEXT_ENCODERS.get(target.rsplit(".", 1)[-1])
    if family is None:
        raise ValueError(f"{source}: cond_stage_config target {target!r} is not supported; accepted: "
                         f"{', '.join('ldm.modules.encoders.modules.' + t for t in LDM_TEXT_ENCODERS)}")
    return family


def ldm_yaml_prediction_type(data: Mapping, source: str = "the .yaml") -> str:
    """The prediction type of ``model.params.parameterization`` (LDM's default: ``eps``)."""
    value = _params(data, "model", "params", source=source).get("parameterization", "eps")
    if value not in _PARAMETERIZATIONS:
        raise ValueError(f"{source}: parameterization {value!r} is not supported; accepted: {list(_PARAMETERIZATIONS)}")
    return _PARAMETERIZATIONS[value]


def ldm_yaml_in_channels(data: Mapping, source: str = "the .yaml") -> int:
    return int(_params(data, "model", "params", "unet_config", "params", source=source).get("in_channels", 4))


def _require(condition: bool, source: str, what: str) -> None:
    if not condition:
        raise ValueError(f"{source}: {what}")


def _unet(p: dict, base: UNetConfig, source: str) -> UNetConfig:
    mult = p.get("channel_mult", (1, 2, 4, 4))
    width = p.get("model_channels")
    _require(isinstance(width, int) and isinstance(mult, (list, tuple)), source,
             f"unet_config needs model_channels (an int) and channel_mult (a list); got {width!r}, {mult!r}")
    channels = tuple(int(width * m) for m in mult)
    for key, accepted in (("num_classes", (None,)), ("adm_in_channels", (None,)), ("disable_self_attentions", (None,)),
                          ("transformer_depth", (1, None)), ("use_spatial_transformer", (True, None))):
        _require(p.get(key) in accepted, source, f"unet_config {key}={p.get(key)!r} is not supported; accepted: {list(accepted)}")
    layers = p.get("num_res_blocks", 2)
    _require(isinstance(layers, int), source, f"unet_config num_res_blocks={layers!r}: a per-level list is not supported")
    context = p.get("context_dim")
    _require(isinstance(context, int), source, f"unet_config context_dim={context!r}: expected one integer")
    attention = {int(r) for r in p.get("attention_resolutions", ())}
    with_attention = [2**i in attention for i in range(len(channels))]
    head_channels, num_heads = p.get("num_head_channels", -1), p.get("num_heads", -1)
    if head_channels not in (-1, None):
        _require(all(c % head_channels == 0 for c in channels), source,
                 f"num_head_channels {head_channels} does not divide the block widths {channels}")
        heads: Any = tuple(c // head_channels for c in channels)
    else:
        _require(isinstance(num_heads, int) and num_heads > 0, source, "unet_config needs num_heads or num_head_channels")
        heads = num_heads
    return dataclasses.replace(
        base,
        in_channels=int(p.get("in_channels", 4)),
        out_channels=int(p.get("out_channels", 4)),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in with_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)),
        block_out_channels=channels,
        layers_per_block=layers,
        attention_head_dim=heads,
        num_attention_heads=None,
        cross_attention_dim=context,
        use_linear_projection=bool(p.get("use_linear_in_transformer", False)),
        norm_num_groups=32,  # LDM's normalization(): GroupNorm32(32, channels)
    )


def _vae(p: dict, base: VAEConfig, scale_factor: Optional[float], source: str) -> VAEConfig:
    dd = p.get("ddconfig")
    _require(isinstance(dd, Mapping), source, "first_stage_config.params has no ddconfig")
    mult = tuple(dd.get("ch_mult", (1, 2, 4, 4)))
    _require(not dd.get("attn_resolutions") and dd.get("double_z", True) is True, source,
             "first_stage_config ddconfig with attn_resolutions or double_z: false is not supported")
    z = int(dd.get("z_channels", 4))
    _require(int(p.get("embed_dim", z)) == z, source,
             f"first_stage_config embed_dim {p.get('embed_dim')} differs from z_channels {z}; not supported")
    return dataclasses.replace(
        base,
        in_channels=int(dd.get("in_channels", 3)),
        out_channels=int(dd.get("out_ch", 3)),
        down_block_types=("DownEncoderBlock2D",) * len(mult),
        up_block_types=("UpDecoderBlock2D",) * len(mult),
        block_out_channels=tuple(int(dd.get("ch", 128)) * int(m) for m in mult),
        layers_per_block=int(dd.get("num_res_blocks", 2)),
        latent_channels=z,
        norm_num_groups=32,  # LDM's Normalize(): GroupNorm(32, channels)
        scaling_factor=base.scaling_factor if scale_factor is None else float(scale_factor),
        mid_block_add_attention=dd.get("attn_type", "vanilla") != "none",
    )


def _scheduler(m: dict, base: SchedulerConfig, prediction_type: str, source: str) -> SchedulerConfig:
    schedule = m.get("beta_schedule", "linear")
    _require(schedule in _SCHEDULES, source, f"beta_schedule {schedule!r} is not supported; accepted: {list(_SCHEDULES)}")
    return dataclasses.replace(
        base,
        num_train_timesteps=int(m.get("timesteps", 1000)),
        beta_start=float(m.get("linear_start", base.beta_start)),
        beta_end=float(m.get("linear_end", base.beta_end)),
        beta_schedule=_SCHEDULES[schedule],
        prediction_type=prediction_type,
    )


def ldm_yaml_config(
    data: Mapping,
    base: ModelConfig,
    text_encoder: CLIPTextConfig,
    *,
    scale_factor: Optional[float] = None,
    source: str = "the .yaml",
) -> ModelConfig:
    """The ``ModelConfig`` an LDM ``.yaml`` describes.

    ``base`` (the family preset) supplies what the yaml leaves out: scheduler conventions (timestep
    spacing, offsets), ``upcast_attention`` and the native image size (the released yamls say
    ``image_size: 64`` for the 768 model too, so diffusers ignores it as well); ``text_encoder`` comes from the checkpoint's shapes, as
    the yaml only names its family. ``scale_factor`` (the file's tensor) is used when the yaml has none.
    """
    model = _params(data, "model", "params", source=source)
    unet = _params(data, "model", "params", "unet_config", "params", source=source)
    vae = _params(data, "model", "params", "first_stage_config", "params", source=source)
    text = _params(data, "model", "params", "cond_stage_config", source=source)
    family = ldm_yaml_family(data, source)
    # SD 2.x conditions on OpenCLIP's penultimate layer (the 23 layers sdjax runs), SD 1.x on CLIP's last.
    layer = dict(text.get("params") or {}).get("layer", "penultimate" if family == "sd2" else "last")
    accepted = "penultimate" if family == "sd2" else "last"
    _require(layer == accepted, source, f"cond_stage_config layer {layer!r} is not supported; accepted: {accepted!r}")
    yaml_scale = model.get("scale_factor")
    return dataclasses.replace(
        base,
        text_encoder=text_encoder,
        unet=_unet(unet, base.unet, source),
        vae=_vae(vae, base.vae, yaml_scale if yaml_scale is not None else scale_factor, source),
        scheduler=_scheduler(model, base.scheduler, ldm_yaml_prediction_type(data, source), source),
    )
