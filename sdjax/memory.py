"""Will a generation request fit in device memory? A simple analytic estimate, checked before compiling.

The estimate per device is ``parameters + max(U-Net peak, VAE decoder peak)`` for the per-device batch
(the batch split over the devices, rounded up), counting only what dominates:

* U-Net (at the latent size h x w, batch doubled by classifier-free guidance): the skip connections of
  every level (``layers_per_block + 1`` tensors of the level's channels) plus about 12 working tensors
  of the first level's width (attention q/k/v/out, the GEGLU feed-forward at 8x width), in the model
  dtype; plus, where attention runs through XLA (everywhere but float16/bfloat16 on GPUs, where cuDNN
  flash attention keeps no map), the largest self-attention map: heads x (h w)^2 in float32 (softmax).
* VAE decoder (at the full image size H x W, one pass per image): the last up-blocks' full-resolution
  tensors (the upsampled 256-channel input, its conv output, a float32 GroupNorm copy, the 128-channel
  resnet tensors) plus its single-head mid-block attention map (h w)^2 in float32 (always through XLA:
  its head width, 512, is beyond cuDNN's flash kernel).

The attention maps grow with the fourth power of the side, so they dominate large sizes on CPUs and
TPUs; on GPUs the full-resolution decoder activations do. It is an order-of-magnitude guard against
requests that cannot run (it neither models XLA's buffer reuse nor fragmentation), so a request is
refused only when the estimate exceeds the device's whole memory.

Available memory: ``device.memory_stats()["bytes_limit"]`` where the backend reports it (GPU, TPU), else
the host's physical RAM (``os.sysconf``), shared by all local CPU devices.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Sequence

import jax
import numpy as np

from sdjax.config import ModelConfig

GiB = 2**30
UNET_WORKING_TENSORS = 12  # live first-level tensors besides the skips (attention, feed-forward, resnets)


class InsufficientMemoryError(ValueError):
    """A request whose memory estimate exceeds the device memory; the message has the estimate and what fits."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one generation request (``sdjax.memory`` module docstring: what is counted)."""

    params: int
    unet: int
    vae_decoder: int
    per_device_batch: int

    @property
    def activations(self) -> int:
        return max(self.unet, self.vae_decoder)

    @property
    def total(self) -> int:
        return self.params + self.activations


def tree_bytes(tree) -> int:
    """Bytes of all arrays in a pytree (``sd.params``)."""
    return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(tree)))


def attention_maps_materialized(dtype, device=None) -> bool:
    """Whether the U-Net's self-attention runs through XLA (full softmax maps in memory): everywhere but
    on GPUs in float16/bfloat16, where sdjax uses cuDNN flash attention (``models.layers.attention``)."""
    device = device or jax.local_devices()[0]
    return not (device.platform == "gpu" and np.dtype(dtype).itemsize == 2)


def estimate(
    config: ModelConfig,
    height: int,
    width: int,
    batch: int,
    *,
    dtype,
    param_bytes: int,
    num_devices: int = 1,
    attention_maps: bool = True,
) -> MemoryEstimate:
    """The bytes one device needs to generate ``batch`` images of ``height`` x ``width`` (module docstring).

    ``attention_maps``: whether the U-Net's attention maps are in memory (``attention_maps_materialized``)."""
    itemsize = np.dtype(dtype).itemsize
    per_device = max(1, -(-int(batch) // max(1, int(num_devices))))
    factor = config.vae.downsample_factor
    tokens = (height // factor) * (width // factor)  # latent pixels

    unet = config.unet
    guided = 2 * per_device  # [uncond; cond]
    skips = sum(
        (unet.layers_per_block + 1) * channels * tokens / 4**level
        for level, channels in enumerate(unet.block_out_channels)
    )
    unet_bytes = guided * (skips + UNET_WORKING_TENSORS * unet.block_out_channels[0] * tokens) * itemsize
    if attention_maps:
        attention = [
            heads * (tokens / 4**level) ** 2
            for level, (block, heads) in enumerate(zip(unet.down_block_types, unet.heads_per_block()))
            if "CrossAttn" in block
        ]
        unet_bytes += guided * max(attention, default=0.0) * 4

    vae = config.vae
    c0 = vae.block_out_channels[0]
    c1 = vae.block_out_channels[1] if len(vae.block_out_channels) > 1 else c0
    pixels = height * width
    vae_bytes = per_device * pixels * ((2 * c1 + 2 * c0) * itemsize + c1 * 4)
    if vae.mid_block_add_attention:
        vae_bytes += per_device * tokens**2 * 4
    return MemoryEstimate(int(param_bytes), int(unet_bytes), int(vae_bytes), per_device)


def device_memory(devices: Optional[Sequence] = None) -> tuple[int, str]:
    """(bytes one device can use, what that is): the backend's ``bytes_limit`` or a share of host RAM."""
    devices = list(devices) if devices is not None else list(jax.local_devices())
    device = devices[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without memory statistics
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform.upper()} memory of {device.device_kind}"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    shared = sum(d.platform == device.platform for d in jax.local_devices())
    if shared > 1:
        return ram // shared, f"host RAM shared by {shared} {device.platform} devices"
    return ram, "host RAM"


def _largest_fitting_size(fits, height: int, width: int, factor: int) -> Optional[tuple[int, int]]:
    """The largest (height, width) with the same aspect ratio (sides multiples of ``factor``) that fits."""
    low, high = 0.0, 1.0  # scale of the requested size
    for _ in range(60):
        middle = (low + high) / 2
        h, w = (max(factor, int(side * middle) // factor * factor) for side in (height, width))
        low, high = (middle, high) if fits(h, w) else (low, middle)
    h, w = (max(factor, int(side * low) // factor * factor) for side in (height, width))
    return (h, w) if fits(h, w) else None


def check_fits(
    config: ModelConfig,
    height: int,
    width: int,
    batch: int,
    *,
    dtype,
    param_bytes: int,
    devices: Optional[Sequence] = None,
) -> MemoryEstimate:
    """Raise ``InsufficientMemoryError`` (a ValueError) with the estimate and the largest size and batch
    that fit, when ``batch`` images of ``height`` x ``width`` cannot fit in the devices' memory."""
    devices = list(devices) if devices is not None else list(jax.local_devices())
    capacity, where = device_memory(devices)
    maps = attention_maps_materialized(dtype, devices[0])

    def need(h, w, b):
        return estimate(config, h, w, b, dtype=dtype, param_bytes=param_bytes, num_devices=len(devices),
                        attention_maps=maps)

    found = need(height, width, batch)
    if found.total <= capacity:
        return found
    factor = config.vae.downsample_factor
    per_device_batch = found.per_device_batch
    size = _largest_fitting_size(lambda h, w: need(h, w, batch).total <= capacity, height, width, factor)
    hints = []
    if size is not None:
        hints.append(f"{size[1]}x{size[0]} with {batch} image{'s' if batch > 1 else ''}")
    if need(height, width, 1).total <= capacity:
        fitting = _largest_fitting_batch(lambda b: need(height, width, b).total <= capacity, batch)
        hints.append(f"{width}x{height} with {fitting} image{'s' if fitting > 1 else ''}")
    if found.params > capacity:
        hints = ["none: the parameters alone do not fit (a smaller dtype such as bfloat16 halves them)"]
    raise InsufficientMemoryError(
        f"{width}x{height} with {batch} image{'s' if batch > 1 else ''} ({per_device_batch} per device) needs "
        f"about {_gib(found.total)} per device (parameters {_gib(found.params)}, U-Net {_gib(found.unet)}, "
        f"VAE decoder {_gib(found.vae_decoder)}; estimated), more than the {_gib(capacity)} of {where}; "
        f"largest that fits: {' or '.join(hints) if hints else 'nothing'}"
    )


def _largest_fitting_batch(fits, batch: int) -> int:
    """The largest b in [1, batch) with ``fits(b)``, given ``fits(1)`` (memory grows with b)."""
    low, high = 1, batch
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _gib(count: int) -> str:
    return f"{count / GiB:,.1f} GiB" if count >= GiB / 10 else f"{count / 2**20:,.1f} MiB"
