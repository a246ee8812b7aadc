"""The Stable Diffusion 1.x / 2.x / SDXL conditional U-Net (diffusers ``UNet2DConditionModel``), NHWC.

Submodules carry the diffusers state-dict names (``down_blocks_1/attentions_0/...``), so weights
convert mechanically. The skip connections follow diffusers exactly: the conv_in output, every
resnet (+attention) output of each down block and every downsampler output are pushed, and each up
block pops ``layers_per_block + 1`` of them. SDXL adds deeper attentions (``transformer_layers_per_block``)
and the text-time embedding ``add_embedding`` of the pooled text embedding and the size/crop time ids.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from sdjax.config import UNetConfig
from sdjax.models.layers import (
    Downsample2D,
    Dtype,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    conv,
    group_norm,
    timestep_embedding,
)


def _transformer(config: UNetConfig, heads: int, channels: int, implementation, dtype, param_dtype, name: str,
                 only_cross_attention: bool, num_layers: int) -> Transformer2DModel:
    return Transformer2DModel(
        heads=heads,
        head_dim=channels // heads,
        norm_num_groups=config.norm_num_groups,
        num_layers=num_layers,
        use_linear_projection=config.use_linear_projection,
        only_cross_attention=only_cross_attention,
        upcast=config.upcast_attention,
        implementation=implementation,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class UNetDownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (``with_attention``) or ``DownBlock2D``: resnets, optional transformers, downsampler."""

    config: UNetConfig
    out_channels: int
    heads: int
    with_attention: bool
    add_downsample: bool
    attention_implementation: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    transformer_layers: int = 1

    @nn.compact
    def __call__(self, x, temb, context, additional_residual: Optional[jax.Array] = None, stop: Optional[int] = None):
        """``additional_residual`` (T2I-Adapter, attention blocks only) is added after the last resnet+attention
        pair, so it reaches that skip connection and the downsampler, as in diffusers' ``CrossAttnDownBlock2D``.
        ``stop``: run only the first ``stop`` resnet(+attention) layers and no downsampler (DeepCache)."""
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        skips = []
        for i in range(cfg.layers_per_block if stop is None else stop):
            resnet = ResnetBlock2D(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, dt, pdt, name=f"resnets_{i}")
            x = resnet(x, temb)
            if self.with_attention:
                x = _transformer(cfg, self.heads, self.out_channels, self.attention_implementation, dt, pdt,
                                 f"attentions_{i}", cfg.only_cross_attention, self.transformer_layers)(x, context)
            if additional_residual is not None and i == cfg.layers_per_block - 1:
                x = x + additional_residual.astype(dt)
            skips.append(x)
        if self.add_downsample and stop is None:
            x = Downsample2D(self.out_channels, cfg.downsample_padding, dt, pdt, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class UNetUpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` (``with_attention``) or ``UpBlock2D``: each resnet first concatenates one skip."""

    config: UNetConfig
    out_channels: int
    heads: int
    with_attention: bool
    add_upsample: bool
    attention_implementation: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    transformer_layers: int = 1

    @nn.compact
    def __call__(self, x, skips: Sequence[Optional[jax.Array]], temb, context, upsample_size=None, start: int = 0,
                 capture: Optional[int] = None):
        """``start``: begin at resnet ``start`` (``x`` is what enters it; the skips of earlier resnets may be None);
        ``capture``: also return the hidden state entering resnet ``capture`` (DeepCache's cached feature)."""
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        captured = x
        for i, skip in enumerate(reversed(skips)):
            if i < start:
                continue
            if i == capture:
                captured = x
            x = jnp.concatenate([x, skip], axis=-1)
            resnet = ResnetBlock2D(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, dt, pdt, name=f"resnets_{i}")
            x = resnet(x, temb)
            if self.with_attention:
                x = _transformer(cfg, self.heads, self.out_channels, self.attention_implementation, dt, pdt,
                                 f"attentions_{i}", cfg.only_cross_attention, self.transformer_layers)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dt, pdt, name="upsamplers_0")(x, upsample_size)
        return x if capture is None else (x, captured)


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet -> transformer -> resnet at the lowest resolution (always with self-attention); the transformer is
    as deep as the last level's."""

    config: UNetConfig
    heads: int
    attention_implementation: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        channels = x.shape[-1]
        x = ResnetBlock2D(channels, cfg.norm_num_groups, cfg.norm_eps, dt, pdt, name="resnets_0")(x, temb)
        # diffusers does not pass only_cross_attention to the mid block.
        depth = cfg.transformer_layers_per_level()[-1]
        x = _transformer(cfg, self.heads, channels, self.attention_implementation, dt, pdt, "attentions_0", False,
                         depth)(x, context)
        return ResnetBlock2D(channels, cfg.norm_num_groups, cfg.norm_eps, dt, pdt, name="resnets_1")(x, temb)


def _add_residuals(skips: list, residuals: Sequence[jax.Array], dtype) -> list:
    if len(residuals) != len(skips):
        raise ValueError(f"down_block_additional_residuals has {len(residuals)} arrays; this U-Net has "
                         f"{len(skips)} skip connections (one per ControlNet down residual)")
    for n, (skip, residual) in enumerate(zip(skips, residuals)):
        # Global-pooled (shuffle) ControlNets give (B, 1, 1, C): broadcasting over height and width is intended.
        if jnp.broadcast_shapes(residual.shape, skip.shape) != skip.shape:
            raise ValueError(f"down_block_additional_residuals[{n}] has shape {residual.shape}; the skip connection "
                             f"it adds to is {skip.shape} (NHWC)")
    return [skip + residual.astype(dtype) for skip, residual in zip(skips, residuals)]


def text_time_features(text_embeds: jax.Array, time_ids: jax.Array, config: UNetConfig, batch: int) -> jax.Array:
    """SDXL's input to ``add_embedding``, (batch, projection_class_embeddings_input_dim) in fp32: the pooled text
    embedding, then each time id's sinusoidal embedding (``addition_time_embed_dim`` wide, with the timestep
    embedding's flip and shift) in order. Inputs with a batch of 1 are shared by the whole batch."""
    ids, text = jnp.asarray(time_ids, jnp.float32), jnp.asarray(text_embeds).astype(jnp.float32)
    ids, text = jnp.broadcast_to(ids, (batch, ids.shape[1])), jnp.broadcast_to(text, (batch, text.shape[1]))
    per_id = timestep_embedding(ids.reshape(-1), config.addition_time_embed_dim,
                                flip_sin_to_cos=config.flip_sin_to_cos, downscale_freq_shift=config.freq_shift)
    return jnp.concatenate([text, per_id.reshape(batch, -1)], axis=-1)


class UNet2DConditionModel(nn.Module):
    """Predicts noise (or v) from NHWC latents, timesteps and text embeddings.

    ``__call__(sample, timesteps, encoder_hidden_states)``: sample (B, H, W, in_channels) with H and W
    of at least ``2 ** (len(block_out_channels) - 1)`` (other sizes than multiples of it work, as in
    diffusers: each upsampler resizes to its skip connection); timesteps a scalar or (B,) array;
    encoder_hidden_states (B, L, cross_attention_dim). Returns (B, H, W, out_channels) in ``dtype``.
    SDXL U-Nets (``addition_embed_type="text_time"``) also need the keywords ``text_embeds`` and ``time_ids``.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: Optional[str] = None

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def _check_inputs(self, sample, timesteps, context) -> None:
        cfg = self.config
        if sample.ndim != 4:
            raise ValueError(f"U-Net sample must be NHWC (batch, height, width, channels); got shape {sample.shape}")
        batch, height, width, channels = sample.shape
        if channels != cfg.in_channels:
            raise ValueError(
                f"U-Net sample has {channels} channels; this model expects in_channels={cfg.in_channels} "
                f"(NHWC layout, channels last)"
            )
        factor = self.downsample_factor
        for label, size in (("height", height), ("width", width)):
            if size < factor:
                raise ValueError(
                    f"U-Net latent {label} {size} is too small: the U-Net halves the resolution "
                    f"{len(cfg.block_out_channels) - 1} times, so latents need a {label} of at least {factor}"
                )
        if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(
                f"encoder_hidden_states must be (batch, tokens, {cfg.cross_attention_dim}); got shape {context.shape}"
            )
        if jnp.ndim(timesteps) > 1 or jnp.size(timesteps) not in (1, batch):
            raise ValueError(f"timesteps must be a scalar or shaped ({batch},); got shape {jnp.shape(timesteps)}")

    def _check_added_conditions(self, text_embeds, time_ids, batch: int) -> None:
        cfg = self.config
        given = {"text_embeds": text_embeds, "time_ids": time_ids}
        if cfg.addition_embed_type is None:
            for name, value in given.items():
                if value is not None:
                    raise ValueError(
                        f"{name} was given but this U-Net takes no added conditioning (its addition_embed_type is "
                        "None); text_embeds and time_ids are for SDXL U-Nets (addition_embed_type='text_time')"
                    )
            return
        missing = [name for name, value in given.items() if value is None]
        if len(missing) == 2 and self.is_initializing():
            return  # parameter shapes do not depend on them: init works from the three ordinary inputs
        width, total = cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim
        accepted = (f"text_embeds (batch, pooled width) and time_ids (batch, number of ids), batch {batch} or 1, "
                    f"with pooled width + number of ids * {width} = {total} (projection_class_embeddings_input_dim)")
        if missing:
            raise ValueError(f"this SDXL U-Net (addition_embed_type='text_time') needs {' and '.join(missing)}: "
                             f"{accepted}")
        text_shape, ids_shape = jnp.shape(text_embeds), jnp.shape(time_ids)
        if (len(text_shape) != 2 or len(ids_shape) != 2 or text_shape[0] not in (1, batch)
                or ids_shape[0] not in (1, batch) or text_shape[1] + ids_shape[1] * width != total):
            raise ValueError(f"text_embeds has shape {text_shape} and time_ids {ids_shape}; this U-Net takes "
                             f"{accepted}")

    def _check_timestep_cond(self, timestep_cond, batch: int) -> None:
        dim = self.config.time_cond_proj_dim
        if timestep_cond is None:
            return
        if dim is None:
            raise ValueError("timestep_cond was given but this U-Net takes none (its time_cond_proj_dim is None)")
        if timestep_cond.ndim != 2 or timestep_cond.shape[1] != dim or timestep_cond.shape[0] not in (1, batch):
            raise ValueError(
                f"timestep_cond must be ({batch}, {dim}) (time_cond_proj_dim={dim}); got shape {timestep_cond.shape}"
            )

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        *,
        down_block_additional_residuals: Optional[Sequence[jax.Array]] = None,
        mid_block_additional_residual: Optional[jax.Array] = None,
        down_intrablock_additional_residuals: Optional[Sequence[jax.Array]] = None,
        timestep_cond: Optional[jax.Array] = None,
        cache_branch: Optional[tuple] = None,
        cached_feature: Optional[jax.Array] = None,
        text_embeds: Optional[jax.Array] = None,
        time_ids: Optional[jax.Array] = None,
    ) -> jax.Array:
        """``timestep_cond`` (B, time_cond_proj_dim): the guidance embedding of guidance-distilled U-Nets
        (LCM; ``sdjax.samplers.guidance_embedding``), added to the timestep embedding through
        ``time_embedding.cond_proj``; omitted, it adds nothing.

        ``text_embeds`` (B, pooled text width) and ``time_ids`` (B, 6 for SDXL base, 5 for the refiner): SDXL's
        added conditioning, required by ``addition_embed_type="text_time"`` U-Nets and refused by others.
        ``init`` may omit both (the parameters do not depend on them).

        The residual inputs follow diffusers: ``down_block_additional_residuals`` (ControlNet, one per skip
        connection) are added to the skips and ``mid_block_additional_residual`` to the mid block's output;
        ``down_intrablock_additional_residuals`` (T2I-Adapter) are consumed in order, one per down block, then
        one more after the mid block if its shape matches.

        ``cache_branch`` (block, layer) and ``cached_feature``: DeepCache's two passes (use the methods
        ``deep_cache_full`` and ``deep_cache_shallow``)."""
        cfg, dt, pdt, impl = self.config, self.dtype, self.param_dtype, self.attention_implementation
        self._check_inputs(sample, timesteps, encoder_hidden_states)
        self._check_timestep_cond(timestep_cond, sample.shape[0])
        self._check_added_conditions(text_embeds, time_ids, sample.shape[0])
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError(
                "ControlNet residuals come in pairs: pass both down_block_additional_residuals and "
                "mid_block_additional_residual (T2I-Adapter features go in down_intrablock_additional_residuals)"
            )
        intrablock = list(down_intrablock_additional_residuals or ())
        batch = sample.shape[0]
        heads = cfg.heads_per_block()
        depths = cfg.transformer_layers_per_level()
        channels = cfg.block_out_channels
        context = encoder_hidden_states.astype(dt)

        x = sample.astype(dt)
        if cfg.center_input_sample:
            x = 2 * x - 1.0

        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
        t_emb = timestep_embedding(
            t, channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift
        )
        time_embedding = TimestepEmbedding(4 * channels[0], dt, pdt, cfg.time_cond_proj_dim, name="time_embedding")
        temb = time_embedding(t_emb, timestep_cond)
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None:  # init without the added conditions (see _check_added_conditions)
                added = jnp.zeros((batch, cfg.projection_class_embeddings_input_dim), jnp.float32)
            else:
                added = text_time_features(text_embeds, time_ids, cfg, batch)
            temb = temb + TimestepEmbedding(4 * channels[0], dt, pdt, name="add_embedding")(added)

        x = conv(channels[0], 3, dt, pdt, "conv_in")(x)
        n = cfg.layers_per_block
        shallow = cached_feature is not None
        if cache_branch is not None:
            if intrablock:
                raise ValueError(
                    "DeepCache does not combine with T2I-Adapter features (down_intrablock_additional_residuals)"
                )
            branch_block, branch_layer = cache_branch
            kept = min(branch_layer, n)  # resnet layers of the branch's down block that stay in the shallow pass
            branch_up, first_up = len(channels) - 1 - branch_block, n - kept  # its up block, and first resnet there
        skips = [x]
        for i, block_type in enumerate(cfg.down_block_types):
            stop = kept if shallow and i == branch_block else None
            if shallow and (i > branch_block or stop == 0):
                break
            with_attention = block_type == "CrossAttnDownBlock2D"
            residual = intrablock.pop(0) if with_attention and intrablock else None
            x, block_skips = UNetDownBlock(
                cfg, channels[i], heads[i], with_attention=with_attention,
                add_downsample=i < len(channels) - 1, attention_implementation=impl, dtype=dt, param_dtype=pdt,
                transformer_layers=depths[i], name=f"down_blocks_{i}",
            )(x, temb, context, residual, stop)
            if not with_attention and intrablock:
                # diffusers adds this in place to the block's output tensor, which is also its last skip.
                x = x + intrablock.pop(0).astype(dt)
                block_skips[-1] = x
            skips.extend(block_skips)
        if down_block_additional_residuals is not None:
            # A shallow pass has only the first skips; the residuals of the deep ones go unused, as the cache's do.
            residuals = list(down_block_additional_residuals)
            skips = _add_residuals(skips, residuals[:len(skips)] if shallow else residuals, dt)

        if not shallow:
            x = UNetMidBlock2DCrossAttn(cfg, heads[-1], impl, dt, pdt, name="mid_block")(x, temb, context)
            if intrablock and intrablock[0].shape == x.shape:
                x = x + intrablock.pop(0).astype(dt)
            if mid_block_additional_residual is not None:
                x = x + mid_block_additional_residual.astype(dt)

        up_channels, up_heads, up_depths = channels[::-1], heads[::-1], depths[::-1]
        feature = None
        for i, block_type in enumerate(cfg.up_block_types):
            start, capture = 0, None
            if shallow and i < branch_up:
                continue
            if shallow and i == branch_up:
                # the cached feature enters resnet first_up; the skips of the resnets before it are not computed
                x, start = cached_feature.astype(dt), first_up
                block_skips, skips = skips[len(skips) - kept - 1:] + [None] * first_up, skips[:len(skips) - kept - 1]
            else:
                block_skips, skips = skips[-(n + 1):], skips[:-(n + 1)]
                capture = first_up if cache_branch is not None and i == branch_up else None
            upsample_size = skips[-1].shape[1:3] if skips else None
            x = UNetUpBlock(
                cfg, up_channels[i], up_heads[i], with_attention=block_type == "CrossAttnUpBlock2D",
                add_upsample=i < len(channels) - 1, attention_implementation=impl, dtype=dt, param_dtype=pdt,
                transformer_layers=up_depths[i], name=f"up_blocks_{i}",
            )(x, block_skips, temb, context, upsample_size, start, capture)
            if capture is not None:
                x, feature = x

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, dt, pdt, "conv_norm_out")(x))
        out = conv(cfg.out_channels, 3, dt, pdt, "conv_out")(x)
        return (out, feature) if cache_branch is not None and not shallow else out

    def deep_cache_full(self, sample, timesteps, encoder_hidden_states, *, branch: tuple, **kwargs):
        """DeepCache's full pass (``sdjax.deepcache``): the ordinary output and the deep feature of ``branch``
        (block, layer): the hidden state entering that block's mirror up block at that layer's resnet."""
        return self(sample, timesteps, encoder_hidden_states, cache_branch=branch, **kwargs)

    def deep_cache_shallow(self, sample, timesteps, encoder_hidden_states, feature, *, branch: tuple, **kwargs):
        """DeepCache's partial pass: only the down path up to ``branch`` and its mirror up path, the deep part
        replaced by ``feature`` from an earlier ``deep_cache_full``."""
        return self(sample, timesteps, encoder_hidden_states, cache_branch=branch, cached_feature=feature, **kwargs)
