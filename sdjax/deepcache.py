"""DeepCache (arXiv:2312.00858): reuse the U-Net's deep features between steps.

Every ``interval``-th step runs the whole U-Net and keeps one deep feature; the steps between run only
the shallow branch (the down blocks above the branch and their mirror up blocks) on that feature. The
schedule, the branch numbering and the first step follow the authors' ``DeepCache`` package
(``DeepCacheSDHelper``, ``skip_mode="uniform"``):

- ``branch`` b names (block, layer) = (b // 3, b % 3): on a shallow step the down block ``block`` keeps its
  first ``layer`` resnet(+attention) layers, and its mirror up block restarts at the resnet that those
  layers' skips feed; what enters that resnet on a full step is the cached feature.
- A step is full when its number, counted from the first step that runs, is a multiple of ``interval``;
  steps are numbered by the first position of their timestep in the schedule, as the package looks them
  up (so PNDM's repeated timestep shares its number).

The cache is one array in the sampler loop's carry; whether an evaluation is full is decided by
``lax.cond`` on its traced index, so the loop stays one compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax import lax

from sdjax.config import UNetConfig

LAYERS_PER_BRANCH_BLOCK = 3  # the package's numbering: branch = 3 * block + layer, whatever layers_per_block is


@dataclasses.dataclass(frozen=True)
class DeepCache:
    """Run the full U-Net every ``interval`` steps and, in between, only the shallow branch ``branch``
    (0: the shallowest, the package's ``cache_branch_id``). ``interval=1`` never reuses the cache."""

    interval: int = 3
    branch: int = 0

    def __post_init__(self):
        for name in ("interval", "branch"):
            value = getattr(self, name)
            least = 1 if name == "interval" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"DeepCache {name} must be an integer >= {least}, got {value!r}")

    @property
    def block_and_layer(self) -> tuple:
        return divmod(self.branch, LAYERS_PER_BRANCH_BLOCK)


def resolve(deep_cache: Union[None, DeepCache, tuple], unet: UNetConfig) -> Optional[DeepCache]:
    """The user's ``deep_cache`` option (None, a ``DeepCache`` or ``(interval, branch)``) checked against the
    U-Net; None when the cache would never be used (off, or ``interval=1``)."""
    if deep_cache is None:
        return None
    if isinstance(deep_cache, tuple) and len(deep_cache) == 2:
        deep_cache = DeepCache(*deep_cache)
    if not isinstance(deep_cache, DeepCache):
        raise ValueError(
            f"deep_cache must be None, sdjax.deepcache.DeepCache or (interval, branch); got {deep_cache!r}"
        )
    branches = LAYERS_PER_BRANCH_BLOCK * len(unet.block_out_channels)
    if deep_cache.branch >= branches:
        raise ValueError(
            f"DeepCache branch {deep_cache.branch} is out of range: this U-Net has branches 0..{branches - 1}"
        )
    return None if deep_cache.interval == 1 else deep_cache


def step_number(timesteps: jax.Array, i) -> jax.Array:
    """The step number of evaluation ``i``: the first position of its timestep in ``timesteps``."""
    return jnp.argmax(timesteps == timesteps[i])


def is_full(deep_cache: DeepCache, timesteps: jax.Array, first, i) -> jax.Array:
    """Whether evaluation ``i`` runs the whole U-Net, when the loop's first run evaluation is ``first``."""
    steps = step_number(timesteps, i) - step_number(timesteps, jnp.minimum(first, timesteps.shape[0] - 1))
    return steps % deep_cache.interval == 0


def feature_shape(unet, unet_params, deep_cache: DeepCache, sample: jax.ShapeDtypeStruct,
                  context: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """Shape and dtype of the cached feature for U-Net inputs of these shapes (the loop carry's initial cache)."""
    def feature(params, x, ctx):
        return unet.apply({"params": params}, x, jnp.zeros((), jnp.float32), ctx,
                          branch=deep_cache.block_and_layer, method="deep_cache_full")[1]

    return jax.eval_shape(feature, unet_params, sample, context)


def initial_cache(unet, unet_params, deep_cache: DeepCache, sample, context) -> jax.Array:
    """Zeros of the cached feature's shape (the first evaluation that runs is always full and overwrites it)."""
    shape = feature_shape(unet, unet_params, deep_cache, jax.ShapeDtypeStruct(sample.shape, sample.dtype),
                          jax.ShapeDtypeStruct(context.shape, context.dtype))
    return jnp.zeros(shape.shape, shape.dtype)


def cached_unet(unet, variables, deep_cache: DeepCache, full, cache, sample, timesteps, context, **kwargs):
    """One U-Net evaluation under the cache: the full pass (refreshing the cache) when ``full``, else the
    shallow pass on ``cache``. Returns (output, cache)."""
    branch = deep_cache.block_and_layer

    def full_pass(operands):
        cache, sample, timesteps, context, kwargs = operands
        out, feature = unet.apply(variables, sample, timesteps, context, branch=branch, method="deep_cache_full",
                                  **kwargs)
        return out, feature.astype(cache.dtype)

    def shallow_pass(operands):
        cache, sample, timesteps, context, kwargs = operands
        out = unet.apply(variables, sample, timesteps, context, cache, branch=branch, method="deep_cache_shallow",
                         **kwargs)
        return out, cache

    return lax.cond(full, full_pass, shallow_pass, (cache, sample, timesteps, context, kwargs))
