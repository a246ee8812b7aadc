"""Frozen model configurations, read from diffusers / transformers ``config.json`` files.

Each dataclass holds only what changes the computation. ``from_diffusers_config`` accepts the
JSON dict that diffusers or transformers writes, ignores bookkeeping keys, and rejects values
sdjax does not implement with an error naming the key, so an unsupported model never loads
silently wrong.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Tuple, Union


def _read_json(path_or_dict: Union[str, Path, dict]) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = Path(path_or_dict)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    return json.loads(path.read_text())


def _known_fields(cls, data: dict, renames: dict[str, str] | None = None) -> dict:
    renames = renames or {}
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        key = renames.get(key, key)
        if key in names:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _reject(kind: str, data: dict, key: str, allowed: tuple) -> None:
    if key in data and data[key] not in allowed:
        raise ValueError(
            f"{kind} config has {key}={data[key]!r}, which sdjax does not support; "
            f"supported values: {list(allowed)}"
        )


_CLIP_TEXT_MODEL = "CLIPTextModel"
_CLIP_TEXT_MODEL_WITH_PROJECTION = "CLIPTextModelWithProjection"
# transformers' CLIPTextConfig default, for a with-projection config.json that leaves projection_dim out.
_TRANSFORMERS_PROJECTION_DIM = 512


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The CLIP text tower: transformers ``CLIPTextModel``, or ``CLIPTextModelWithProjection`` (SDXL's
    OpenCLIP ViT-bigG/14) when ``projection_dim`` is set."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # transformers' legacy configs use eos_token_id=2, meaning "pool at the largest token id".
    eos_token_id: int = 2
    pad_token_id: int = 1
    bos_token_id: int = 0
    # Width of the bias-free ``text_projection`` applied to the pooled output; None: no projection head.
    # Plain CLIPTextModel config.json files often carry a projection_dim too, which their model never uses.
    projection_dim: Optional[int] = None

    @property
    def has_projection(self) -> bool:
        return self.projection_dim is not None

    @classmethod
    def from_diffusers_config(cls, config: Union[str, Path, dict]) -> "CLIPTextConfig":
        data = _read_json(config)
        _reject("text encoder", data, "hidden_act", ("quick_gelu", "gelu"))
        fields = _known_fields(cls, data)
        if _CLIP_TEXT_MODEL_WITH_PROJECTION in (data.get("architectures") or ()):
            fields["projection_dim"] = data.get("projection_dim", _TRANSFORMERS_PROJECTION_DIM)
        else:
            fields.pop("projection_dim", None)
        return cls(**fields)

    def to_diffusers_config(self) -> dict:
        fields = dataclasses.asdict(self)
        if not self.has_projection:
            del fields["projection_dim"]
        return {
            "architectures": [_CLIP_TEXT_MODEL_WITH_PROJECTION if self.has_projection else _CLIP_TEXT_MODEL],
            "model_type": "clip_text_model",
            "torch_dtype": "float32",
            **fields,
        }


_UNET_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UNET_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
_UNET_ADDITION_EMBED_TYPES = (None, "text_time")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers ``UNet2DConditionModel`` as used by SD 1.x / 2.x and SDXL (base and refiner)."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: Tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: Tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # diffusers' historical naming: this is the number of heads per block, not the head size.
    attention_head_dim: Union[int, Tuple[int, ...]] = 8
    num_attention_heads: Optional[Union[int, Tuple[int, ...]]] = None
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    center_input_sample: bool = False
    # Guidance-distilled U-Nets (LCM): width of the guidance embedding added to the timestep embedding.
    time_cond_proj_dim: Optional[int] = None
    # Transformer blocks inside each attention of a level (one int for all levels, or one per level); the mid
    # block takes the last level's depth and each up block its mirror down block's (SDXL: (1, 2, 10)).
    transformer_layers_per_block: Union[int, Tuple[int, ...]] = 1
    # SDXL's added conditioning: "text_time" embeds the pooled text embedding and the size/crop time ids
    # through ``add_embedding`` and adds that to the timestep embedding. ``projection_class_embeddings_input_dim``
    # is the pooled text width + number of time ids * ``addition_time_embed_dim``.
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None

    def __post_init__(self) -> None:
        _reject("unet", {"addition_embed_type": self.addition_embed_type}, "addition_embed_type",
                _UNET_ADDITION_EMBED_TYPES)
        if self.addition_embed_type == "text_time" and None in (
            self.addition_time_embed_dim, self.projection_class_embeddings_input_dim
        ):
            raise ValueError(
                "unet config has addition_embed_type='text_time' but addition_time_embed_dim="
                f"{self.addition_time_embed_dim!r} and projection_class_embeddings_input_dim="
                f"{self.projection_class_embeddings_input_dim!r}; both must be integers"
            )
        depths = self.transformer_layers_per_block
        if not isinstance(depths, int) and (
            len(depths) != len(self.block_out_channels) or not all(isinstance(d, int) for d in depths)
        ):
            raise ValueError(
                f"unet config has transformer_layers_per_block={depths!r}; give one int, or one int per block "
                f"({len(self.block_out_channels)} blocks); nested per-layer lists are not supported"
            )

    @classmethod
    def from_diffusers_config(cls, config: Union[str, Path, dict]) -> "UNetConfig":
        data = _read_json(config)
        for block in data.get("down_block_types", ()):
            _reject("unet", {"down_block_types": block}, "down_block_types", _UNET_DOWN_BLOCKS)
        for block in data.get("up_block_types", ()):
            _reject("unet", {"up_block_types": block}, "up_block_types", _UNET_UP_BLOCKS)
        # An explicit null means "no mid block" in diffusers; sdjax always builds one.
        _reject("unet", data, "mid_block_type", ("UNetMidBlock2DCrossAttn",))
        _reject("unet", data, "mid_block_scale_factor", (1,))
        _reject("unet", data, "resnet_out_scale_factor", (1,))
        _reject("unet", data, "resnet_skip_time_act", (False,))
        _reject("unet", data, "time_embedding_dim", (None,))
        _reject("unet", data, "time_embedding_act_fn", (None,))
        _reject("unet", data, "timestep_post_act", (None,))
        _reject("unet", data, "cross_attention_norm", (None,))
        _reject("unet", data, "class_embeddings_concat", (False,))
        _reject("unet", data, "encoder_hid_dim_type", (None,))
        _reject("unet", data, "act_fn", ("silu",))
        _reject("unet", data, "class_embed_type", (None,))
        _reject("unet", data, "addition_embed_type", _UNET_ADDITION_EMBED_TYPES)
        _reject("unet", data, "time_embedding_type", ("positional",))
        _reject("unet", data, "resnet_time_scale_shift", ("default",))
        _reject("unet", data, "dual_cross_attention", (False,))
        _reject("unet", data, "encoder_hid_dim", (None,))
        _reject("unet", data, "mid_block_only_cross_attention", (None, False))
        _reject("unet", data, "conv_in_kernel", (3,))
        _reject("unet", data, "conv_out_kernel", (3,))
        _reject("unet", data, "num_class_embeds", (None,))
        _reject("unet", data, "reverse_transformer_layers_per_block", (None,))
        _reject("unet", data, "attention_type", ("default",))
        if isinstance(data.get("only_cross_attention"), list):
            raise ValueError("unet config: a per-block only_cross_attention list is not supported")
        if isinstance(data.get("layers_per_block"), list):
            raise ValueError("unet config: a per-block layers_per_block list is not supported")
        if isinstance(data.get("cross_attention_dim"), list):
            raise ValueError("unet config: a per-block cross_attention_dim list is not supported")
        depths = data.get("transformer_layers_per_block")
        if isinstance(depths, list) and any(isinstance(d, list) for d in depths):
            raise ValueError(
                f"unet config has transformer_layers_per_block={depths!r}: nested per-layer lists (asymmetric "
                "U-Nets) are not supported; give one int, or one int per block"
            )
        fields = _known_fields(cls, data)
        if "upcast_attention" in fields and fields["upcast_attention"] is None:  # SDXL's configs write null
            fields["upcast_attention"] = False
        return cls(**fields)

    def heads_per_block(self) -> Tuple[int, ...]:
        """Number of attention heads of each down block (diffusers' resolution rule)."""
        heads = self.num_attention_heads or self.attention_head_dim
        if isinstance(heads, int):
            return (heads,) * len(self.block_out_channels)
        return tuple(heads)

    def transformer_layers_per_level(self) -> Tuple[int, ...]:
        """Transformer blocks per attention of each down block (up blocks mirror them, the mid block takes the last)."""
        depths = self.transformer_layers_per_block
        if isinstance(depths, int):
            return (depths,) * len(self.block_out_channels)
        return tuple(depths)

    def to_diffusers_config(self) -> dict:
        data = dataclasses.asdict(self)
        return {
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in data.items()},
        }


# The released stabilityai/stable-diffusion-xl-{base,refiner}-1.0 U-Nets. The base model's added conditioning is
# the 1280-wide pooled OpenCLIP bigG embedding + 6 time ids (original size, crop top-left, target size), the
# refiner's the same pooled embedding + 5 (original size, crop top-left, aesthetic score), each id 256 wide.
SDXL_BASE_UNET = UNetConfig(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_REFINER_UNET = UNetConfig(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(384, 768, 1536, 1536),
    attention_head_dim=(6, 12, 24, 24),
    transformer_layers_per_block=4,
    cross_attention_dim=1280,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,
)


_CONTROLNET_CHANNEL_ORDERS = ("rgb", "bgr")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """diffusers ``ControlNetModel`` for SD 1.x / 2.x: the U-Net's encoder half plus a conditioning-image encoder.

    SDXL ControlNets (``addition_embed_type="text_time"``, issue #17) are refused for now; supporting them
    means accepting that value here and adding the text-time embedding beside ``time_embedding`` in
    ``sdjax.models.controlnet``, as the SDXL U-Net will do.
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    down_block_types: Tuple[str, ...] = UNetConfig.down_block_types
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # diffusers' historical naming, as in UNetConfig: heads per block.
    attention_head_dim: Union[int, Tuple[int, ...]] = 8
    num_attention_heads: Optional[Union[int, Tuple[int, ...]]] = None
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    conditioning_embedding_out_channels: Tuple[int, ...] = (16, 32, 96, 256)
    # Shuffle-style ControlNets: residuals averaged over height and width.
    global_pool_conditions: bool = False
    controlnet_conditioning_channel_order: str = "rgb"

    @classmethod
    def from_diffusers_config(cls, config: Union[str, Path, dict]) -> "ControlNetConfig":
        data = _read_json(config)
        _reject("controlnet", data, "_class_name", ("ControlNetModel",))
        addition = data.get("addition_embed_type")
        if addition is not None:
            what = " (an SDXL ControlNet)" if addition == "text_time" else ""
            raise ValueError(f"controlnet config has addition_embed_type={addition!r}{what}, which sdjax does not "
                             "support yet; supported values: [None] (SD 1.x / 2.x ControlNets)")
        for block in data.get("down_block_types", ()):
            _reject("controlnet", {"down_block_types": block}, "down_block_types", _UNET_DOWN_BLOCKS)
        _reject("controlnet", data, "controlnet_conditioning_channel_order", _CONTROLNET_CHANNEL_ORDERS)
        _reject("controlnet", data, "mid_block_type", ("UNetMidBlock2DCrossAttn",))
        _reject("controlnet", data, "class_embed_type", (None,))
        _reject("controlnet", data, "num_class_embeds", (None,))
        _reject("controlnet", data, "encoder_hid_dim", (None,))
        _reject("controlnet", data, "encoder_hid_dim_type", (None,))
        _reject("controlnet", data, "act_fn", ("silu",))
        _reject("controlnet", data, "resnet_time_scale_shift", ("default",))
        _reject("controlnet", data, "mid_block_scale_factor", (1,))
        _reject("controlnet", data, "transformer_layers_per_block", (1,))
        for key in ("only_cross_attention", "layers_per_block", "cross_attention_dim"):
            if isinstance(data.get(key), list):
                raise ValueError(f"controlnet config: a per-block {key} list is not supported")
        return cls(**_known_fields(cls, data))

    def heads_per_block(self) -> Tuple[int, ...]:
        """Number of attention heads of each down block (diffusers' resolution rule)."""
        heads = self.num_attention_heads or self.attention_head_dim
        if isinstance(heads, int):
            return (heads,) * len(self.block_out_channels)
        return tuple(heads)

    def unet_config(self) -> UNetConfig:
        """The U-Net whose encoder half this ControlNet copies (its up blocks mirror the down blocks)."""
        ups = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
        shared = {f.name for f in dataclasses.fields(UNetConfig)} & {f.name for f in dataclasses.fields(self)}
        return UNetConfig(
            **{name: getattr(self, name) for name in shared},
            up_block_types=tuple(ups[b] for b in reversed(self.down_block_types)),
        )

    def to_diffusers_config(self) -> dict:
        data = dataclasses.asdict(self)
        return {
            "_class_name": "ControlNetModel",
            "act_fn": "silu",
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in data.items()},
        }


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL``."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    # diffusers' SDXL pipelines decode in fp32 when the model runs in fp16 and this is set (the SDXL 1.0 VAE
    # overflows in fp16); diffusers' AutoencoderKL default is True.
    force_upcast: bool = True

    @classmethod
    def from_diffusers_config(cls, config: Union[str, Path, dict]) -> "VAEConfig":
        data = _read_json(config)
        for block in data.get("down_block_types", ()):
            _reject("vae", {"down_block_types": block}, "down_block_types", ("DownEncoderBlock2D",))
        for block in data.get("up_block_types", ()):
            _reject("vae", {"up_block_types": block}, "up_block_types", ("UpDecoderBlock2D",))
        _reject("vae", data, "act_fn", ("silu",))
        return cls(**_known_fields(cls, data))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_diffusers_config(self) -> dict:
        data = dataclasses.asdict(self)
        return {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in data.items()},
        }


# What the model's output means: the noise, the velocity v (SD 2.x 768px models) or the clean sample.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The noise schedule a model was trained with (``scheduler/scheduler_config.json``).

    The sampler is chosen separately, by name; this only describes the model's training schedule
    and the timestep conventions diffusers stores beside it.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: Optional[Tuple[float, ...]] = None
    prediction_type: str = "epsilon"
    # None: absent from the model's config file; each sampler then takes its own diffusers class's
    # default, as diffusers' ``from_config`` does (``samplers.DIFFUSERS_DEFAULTS``). The released SD 1.x/2.x
    # configs carry no timestep_spacing: PNDM and DDIM use "leading" there, Euler, LMS, DPM-Solver "linspace".
    timestep_spacing: Optional[str] = None
    steps_offset: int = 1
    set_alpha_to_one: Optional[bool] = False
    clip_sample: Optional[bool] = False
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    skip_prk_steps: Optional[bool] = True
    # Consistency-distilled models' LCMScheduler / TCDScheduler settings (None: absent, the samplers' defaults
    # 50 and 10.0); the lcm and tcd samplers take them unless a call passes its own.
    original_inference_steps: Optional[int] = None
    timestep_scaling: Optional[float] = None

    @classmethod
    def from_diffusers_config(cls, config: Union[str, Path, dict]) -> "SchedulerConfig":
        data = _read_json(config)
        _reject("scheduler", data, "beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))
        _reject("scheduler", data, "prediction_type", PREDICTION_TYPES)
        _reject("scheduler", data, "timestep_spacing", TIMESTEP_SPACINGS)
        # Keys whose diffusers default differs between scheduler classes stay None when absent (resolved per
        # sampler); steps_offset defaults to 0 in every diffusers scheduler class.
        absent = {key: None for key in _PER_SAMPLER_KEYS if key not in data}
        if "steps_offset" not in data:
            absent["steps_offset"] = 0
        return cls(**{**_known_fields(cls, data), **absent})

    def to_diffusers_config(self) -> dict:
        data = {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "trained_betas"}
        data["trained_betas"] = list(self.trained_betas) if self.trained_betas else None
        return {"_class_name": "PNDMScheduler", **data}


TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
_PER_SAMPLER_KEYS = ("timestep_spacing", "set_alpha_to_one", "clip_sample", "skip_prk_steps")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines one Stable Diffusion model, component by component.

    SDXL models have a second, projected text encoder (``text_encoder_2``, OpenCLIP ViT-bigG); the SDXL
    refiner has only that one (``text_encoder`` None). The last two fields are SDXL pipeline settings from
    ``model_index.json``: whether a missing negative prompt means zero conditioning (diffusers'
    ``force_zeros_for_empty_prompt``, base model) and whether the U-Net's time ids end with an aesthetic score
    instead of the target size (``requires_aesthetics_score``, refiner).
    """

    text_encoder: Optional[CLIPTextConfig]
    unet: UNetConfig
    vae: VAEConfig
    scheduler: SchedulerConfig
    # Hidden layers to skip at the end of the text encoder (A1111's "clip skip" minus one).
    clip_skip: int = 0
    text_encoder_2: Optional[CLIPTextConfig] = None
    force_zeros_for_empty_prompt: bool = True
    requires_aesthetics_score: bool = False

    def __post_init__(self) -> None:
        if self.text_encoder is None and self.text_encoder_2 is None:
            raise ValueError("a model config needs a text encoder: text_encoder and text_encoder_2 are both None")
        if self.text_encoder_2 is not None and not self.text_encoder_2.has_projection:
            raise ValueError("an SDXL text_encoder_2 is a CLIPTextModelWithProjection: its config needs projection_dim")

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


T2I_ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


@dataclasses.dataclass(frozen=True)
class T2IAdapterConfig:
    """diffusers ``T2IAdapter``: a control image -> one feature map per U-Net down level.

    ``channels`` are the feature widths; the light adapter adds one more level of width ``channels[-1]``.
    """

    in_channels: int = 3
    channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    # The pixel-unshuffle factor that turns the image into the first feature level.
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    def __post_init__(self) -> None:
        _reject("t2i adapter", {"adapter_type": self.adapter_type}, "adapter_type", T2I_ADAPTER_TYPES)

    @classmethod
    def from_diffusers_config(cls, config: Union[str, Path, dict]) -> "T2IAdapterConfig":
        return cls(**_known_fields(cls, _read_json(config)))

    @property
    def downsampling_levels(self) -> Tuple[bool, ...]:
        """Whether each feature level halves the size of the one before it."""
        count = len(self.channels)
        if self.adapter_type == "light_adapter":
            return (False,) + (True,) * count
        if self.adapter_type == "full_adapter_xl":
            return tuple(i == 2 for i in range(count))
        return (False,) + (True,) * (count - 1)

    @property
    def total_downscale_factor(self) -> int:
        """Image size / smallest feature size: image sides must be multiples of it."""
        return self.downscale_factor * 2 ** sum(self.downsampling_levels)

    def to_diffusers_config(self) -> dict:
        data = dataclasses.asdict(self)
        return {"_class_name": "T2IAdapter", **{k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}}


_SD1_TEXT = CLIPTextConfig()
_SD2_TEXT = CLIPTextConfig(
    hidden_size=1024,
    intermediate_size=4096,
    # OpenCLIP ViT-H has 24 layers; SD 2.x uses the penultimate one, so diffusers ships 23.
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
)
_SD2_UNET = UNetConfig(
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
)
_SD_VAE = VAEConfig()
_SD1_SCHEDULER = SchedulerConfig()

SD15 = ModelConfig(_SD1_TEXT, UNetConfig(), _SD_VAE, _SD1_SCHEDULER)
SD15_INPAINT = ModelConfig(_SD1_TEXT, UNetConfig(in_channels=9), _SD_VAE, _SD1_SCHEDULER)
SD21_BASE = ModelConfig(_SD2_TEXT, _SD2_UNET, VAEConfig(sample_size=768), _SD1_SCHEDULER)
SD21_V = ModelConfig(
    _SD2_TEXT,
    dataclasses.replace(_SD2_UNET, sample_size=96, upcast_attention=True),
    VAEConfig(sample_size=768),
    SchedulerConfig(prediction_type="v_prediction"),
)
SD2_DEPTH = ModelConfig(
    _SD2_TEXT, dataclasses.replace(_SD2_UNET, in_channels=5), VAEConfig(sample_size=768), _SD1_SCHEDULER
)

# stabilityai/stable-diffusion-xl-{base,refiner}-1.0: CLIP ViT-L (penultimate layer, un-normed) beside OpenCLIP
# ViT-bigG with its projection, the SDXL VAE (scale 0.13025) and the Euler scheduler config they ship.
_SDXL_TEXT = CLIPTextConfig()
_SDXL_TEXT_2 = CLIPTextConfig(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
    projection_dim=1280,
)
_SDXL_VAE = VAEConfig(sample_size=1024, scaling_factor=0.13025)
_SDXL_SCHEDULER = SchedulerConfig(timestep_spacing="leading", steps_offset=1)
SDXL_BASE = ModelConfig(_SDXL_TEXT, SDXL_BASE_UNET, _SDXL_VAE, _SDXL_SCHEDULER, text_encoder_2=_SDXL_TEXT_2)
SDXL_REFINER = ModelConfig(None, SDXL_REFINER_UNET, _SDXL_VAE, _SDXL_SCHEDULER, text_encoder_2=_SDXL_TEXT_2,
                           force_zeros_for_empty_prompt=False, requires_aesthetics_score=True)

# Single-file presets (``from_single_file(config=...)``); SDXL single files are not supported yet, so the SDXL
# presets are not among them.
PRESETS = {
    "sd15": SD15,
    "sd15-inpaint": SD15_INPAINT,
    "sd21-base": SD21_BASE,
    "sd21-v": SD21_V,
    "sd2-depth": SD2_DEPTH,
}
