"""Spatial control on the jitted core: ControlNets and T2I-Adapters as a pipeline's ``controls``.

``Control(model, image, scale=1.0, start=0.0, end=1.0, guess_mode=False)`` is what users pass; the pipeline
turns each into a ``ControlInput`` of traced arrays (the image at the output size in [0, 1], and per image the
scale and the start/end fractions), so new images, scales or start/end never recompile. The models' modules are
static (``ControlSpec``: part of the compiled program), their parameters travel in the parameter tree
(``params["controls"]``).

The math is diffusers': several ControlNets' residuals are summed (``MultiControlNetModel``); a control acts on
run step i of n when neither ``i / n < start`` nor ``(i + 1) / n > end`` (``controlnet_keep``; for an adapter
this is diffusers' ``i < int(n * adapter_conditioning_factor)`` with ``end`` the factor); in guess mode a
ControlNet sees only the conditional half of the guidance batch and the unconditional half gets no residuals.
T2I-Adapter features are computed once per generation and weighted by scale (and keep) at every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.config import UNetConfig
from sdjax.controlnet import ControlNet, check_compatible
from sdjax.models.controlnet import ControlNetModel
from sdjax.models.t2i_adapter import T2IAdapterModel, check_image
from sdjax.t2i_adapter import T2IAdapter

ControlModel = Union[ControlNet, T2IAdapter]


@dataclasses.dataclass(frozen=True, eq=False)
class Control:
    """One spatial control of a generation.

    ``model``: a ``ControlNet`` (``sdjax.load_controlnet``) or a ``T2IAdapter`` (``sdjax.load_t2i_adapter``).
    ``image``: the condition image(s) as the model was trained on them (an edge map, a depth map, a pose...):
    PIL, uint8 or [0, 1] float (H, W, 3) arrays, an (N, H, W, 3) batch or a list; one for all, one per prompt or
    one per output image. Images of another size than the output are resized with a warning, as diffusers does
    (Lanczos for PIL images, nearest for arrays). ``scale``: the conditioning scale, one value or one per output
    image. ``start`` / ``end``: the fractions of the run steps between which the control acts (diffusers'
    ``control_guidance_start`` / ``control_guidance_end``; for adapters, ``end`` is diffusers'
    ``adapter_conditioning_factor``). ``guess_mode``: ControlNets only; the control acts on the conditional
    half of classifier-free guidance alone, its residuals ramped from 0.1 to 1 (diffusers' ``guess_mode``).
    """

    model: ControlModel
    image: Any
    scale: Union[float, Sequence[float]] = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False


@dataclasses.dataclass(frozen=True)
class ControlSpec:
    """The static side of one control: its module and whether it runs in guess mode."""

    module: Union[ControlNetModel, T2IAdapterModel]
    guess_mode: bool

    @property
    def is_adapter(self) -> bool:
        return isinstance(self.module, T2IAdapterModel)


@dataclasses.dataclass(frozen=True)
class ControlInput:
    """The traced side of one control; every array leads with the image axis: ``image`` (B, H, W, C) in [0, 1]
    at the output size, ``scale``, ``start``, ``end`` (B,) float32."""

    image: jax.Array
    scale: jax.Array
    start: jax.Array
    end: jax.Array


jax.tree_util.register_dataclass(ControlInput, data_fields=["image", "scale", "start", "end"], meta_fields=[])


def check_controls(controls: Sequence[Control], unet_config: UNetConfig) -> None:
    """A one-line ``ValueError`` (or ``TypeError``) for controls this model cannot take (the output size an
    adapter needs is checked with the images: ``check_adapter_size``)."""
    if not isinstance(controls, (list, tuple)):
        raise TypeError(f"controls must be a list of sdjax.Control; got {type(controls).__name__}")
    for index, control in enumerate(controls):
        where = f"controls[{index}]"
        if not isinstance(control, Control):
            raise TypeError(f"{where} must be an sdjax.Control(model, image, scale, start, end); "
                            f"got {type(control).__name__}")
        model = control.model
        if isinstance(model, ControlNet):
            try:
                check_compatible(model.config, unet_config)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        elif isinstance(model, T2IAdapter):
            _check_adapter(where, control, model, unet_config)
        else:
            raise TypeError(f"{where}.model must be a ControlNet (sdjax.load_controlnet) or a T2IAdapter "
                            f"(sdjax.load_t2i_adapter); got {type(model).__name__}")
        _check_knobs(where, control)


def _check_knobs(where: str, control: Control) -> None:
    scales = np.asarray(control.scale, np.float64).reshape(-1)
    if not np.all(np.isfinite(scales)):
        raise ValueError(f"{where}.scale must be finite; got {control.scale}")
    for name in ("start", "end"):
        value = getattr(control, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{where}.{name} is a fraction of the steps: accepted 0 to 1, got {value!r}")
    if control.start >= control.end:
        raise ValueError(f"{where}: start ({control.start}) must be below end ({control.end}); the control would "
                         "never act")
    if not isinstance(control.guess_mode, bool):
        raise ValueError(f"{where}.guess_mode must be True or False; got {control.guess_mode!r}")


def check_adapter_size(where: str, adapter: T2IAdapter, size: tuple[int, int]) -> None:
    """A one-line ``ValueError`` unless the adapter's downscaling fits the output ``size`` (height, width)."""
    try:
        check_image(adapter.config, (1, *size, adapter.config.in_channels))
    except ValueError as error:
        raise ValueError(f"{where}: the output size {size[0]}x{size[1]} does not suit this adapter: {error}") from None


def _check_adapter(where: str, control: Control, adapter: T2IAdapter, unet_config: UNetConfig) -> None:
    if control.guess_mode:
        raise ValueError(f"{where}: guess_mode is a ControlNet option; T2I-Adapters have none")
    widths = [c for c in unet_config.block_out_channels]
    if adapter.config.channels[: len(widths)] != tuple(widths[: len(adapter.config.channels)]):
        raise ValueError(
            f"{where}: this T2I-Adapter gives features of {tuple(adapter.config.channels)} channels; the U-Net's "
            f"blocks have {tuple(widths)} (an adapter for another base model)"
        )


def specs_and_params(controls: Sequence[Control], dtype) -> tuple[tuple[ControlSpec, ...], tuple]:
    """The static specs and the parameter trees of ``controls``, modules built for ``dtype``."""
    specs, params = [], []
    for control in controls:
        model = control.model
        # diffusers runs global-pooling ControlNets (shuffle) in guess mode whatever it was asked
        pooled = isinstance(model, ControlNet) and model.config.global_pool_conditions
        specs.append(ControlSpec(model.module.clone(dtype=dtype), bool(control.guess_mode or pooled)))
        params.append(model.params)
    return tuple(specs), tuple(params)


def control_inputs(control: Control, images: np.ndarray, count: int) -> ControlInput:
    """The traced input of ``control`` for ``count`` output images; ``images`` (count, H, W, C) in [0, 1]."""
    scale = np.asarray(control.scale, np.float32).reshape(-1)
    scale = np.broadcast_to(scale, (count,)) if scale.size == 1 else scale
    if scale.shape != (count,):
        raise ValueError(f"a control's scale must be one value or one per output image ({count}); "
                         f"got {np.size(control.scale)} values")
    return ControlInput(image=images.astype(np.float32), scale=scale.astype(np.float32),
                        start=np.full((count,), control.start, np.float32),
                        end=np.full((count,), control.end, np.float32))


def keep(i, first, num_evals: int, start, end) -> jax.Array:
    """1.0 where the control acts at evaluation ``i`` (per image: its own first evaluation ``first``), else 0.0:
    with n = the image's run evaluations and j = i - first, not (j / n < start or (j + 1) / n > end)."""
    first = jnp.asarray(first, jnp.float32)
    runs = jnp.float32(num_evals) - first
    j = jnp.asarray(i, jnp.float32) - first
    off = (j / runs < start) | ((j + 1.0) / runs > end)
    return jnp.where(off, 0.0, 1.0).astype(jnp.float32)


def adapter_features(specs: Sequence[ControlSpec], params: Sequence, inputs: Sequence[ControlInput]) -> tuple:
    """Each adapter's feature maps for its images (B, ...), computed once per generation; None for ControlNets."""
    return tuple(
        spec.module.apply({"params": p}, x.image) if spec.is_adapter else None
        for spec, p, x in zip(specs, params, inputs)
    )


@dataclasses.dataclass(frozen=True)
class UNetResiduals:
    """What the controls add to one U-Net call; None where no control of that kind is given."""

    down: Optional[tuple] = None
    mid: Optional[jax.Array] = None
    intrablock: Optional[tuple] = None

    def as_kwargs(self) -> dict:
        if self.down is None and self.intrablock is None:
            return {}
        kwargs = {}
        if self.down is not None:
            kwargs.update(down_block_additional_residuals=self.down, mid_block_additional_residual=self.mid)
        if self.intrablock is not None:
            kwargs["down_intrablock_additional_residuals"] = list(self.intrablock)
        return kwargs


def residuals(specs: Sequence[ControlSpec], params: Sequence, inputs: Sequence[ControlInput], features: tuple,
              latents: jax.Array, t, uncond_context: jax.Array, cond_context: jax.Array, weight_of) -> UNetResiduals:
    """The summed residuals of every control for one U-Net call on ``latents``: [uncond; cond] (2B, ...) when
    guided, the images alone (B, ...) on the guidance-free path (``uncond_context`` None).

    ``weight_of(control_input)`` -> (B,) its scale times keep at this evaluation. ControlNets run on the whole
    guidance batch (guess mode: the conditional half only, zeros for the other); adapters' precomputed
    ``features`` are weighted and given to both halves, as diffusers' adapter pipeline does."""
    count = cond_context.shape[0]
    guided = uncond_context is not None
    down, mid, intrablock = None, None, None
    for spec, p, x, f in zip(specs, params, inputs, features):
        weight = weight_of(x)
        if spec.is_adapter:
            scaled = [(feature.astype(jnp.float32) * weight[:, None, None, None]) for feature in f]
            scaled = [jnp.concatenate([s, s]) for s in scaled] if guided else scaled
            intrablock = scaled if intrablock is None else [a + b for a, b in zip(intrablock, scaled)]
            continue
        if not guided:
            d, m = spec.module.apply({"params": p}, latents, t, cond_context, x.image, weight, spec.guess_mode)
        elif spec.guess_mode:
            d, m = spec.module.apply({"params": p}, latents[count:], t, cond_context, x.image, weight, True)
            d = [jnp.concatenate([jnp.zeros_like(r), r]) for r in d]
            m = jnp.concatenate([jnp.zeros_like(m), m])
        else:
            d, m = spec.module.apply({"params": p}, latents, t, jnp.concatenate([uncond_context, cond_context]),
                                     jnp.concatenate([x.image, x.image]), jnp.concatenate([weight, weight]), False)
        down = list(d) if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    return UNetResiduals(None if down is None else tuple(down), mid,
                         None if intrablock is None else tuple(intrablock))

