"""The SDXL U-Net (text-time added conditioning, deeper attentions) against diffusers, its config and LDM table."""

import functools

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
import reference
from reference import nchw, nhwc, rel_err, save_unet

from sdjax import weights
from sdjax.config import SDXL_BASE_UNET, SDXL_REFINER_UNET, UNetConfig
from sdjax.layouts import ldm
from sdjax.layouts.diffusers import flax_to_torch, torch_to_flax
from sdjax.models.unet import UNet2DConditionModel, text_time_features

SDXL_BASE_PARAMETERS = 2_567_463_684  # stabilityai/stable-diffusion-xl-base-1.0's unet

# As SDXL base (the tiny SDXL pipeline's U-Net): no attention at the first level, deeper transformers further
# down, 6 time ids.
BASE_LIKE = reference.TINY_SDXL_UNET
TIME_WIDTH = BASE_LIKE["addition_time_embed_dim"]
POOLED = BASE_LIKE["projection_class_embeddings_input_dim"] - 6 * TIME_WIDTH
TEXT_TIME = dict(addition_embed_type="text_time", addition_time_embed_dim=TIME_WIDTH, use_linear_projection=True)
# As the refiner: attention-free first and last levels, one depth for all, 5 time ids.
REFINER_LIKE = dict(
    TEXT_TIME,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=2,
    attention_head_dim=(2, 2, 4, 4),
    cross_attention_dim=48,
    projection_class_embeddings_input_dim=POOLED + 5 * TIME_WIDTH,
)
MODELS = {"base": (BASE_LIKE, 6), "refiner": (REFINER_LIKE, 5)}


class Reference:
    """A saved random diffusers SDXL-style U-Net, loaded through sdjax's loader, and inputs for both."""

    def __init__(self, path, overrides, time_ids):
        self.torch_model = save_unet(path, seed=2, **overrides)
        self.config = UNetConfig.from_diffusers_config(path / "config.json")
        self.unet = UNet2DConditionModel(self.config)
        template = weights.param_shapes(self.unet)
        self.state = weights.read_component(path)
        self.params = torch_to_flax(self.state, template, what="sdxl unet")
        rng = np.random.RandomState(0)
        self.inputs = dict(
            sample=rng.randn(2, 16, 24, 4).astype(np.float32),  # non-square latents
            timesteps=np.array([10.0, 731.0], np.float32),
            context=rng.randn(2, 7, self.config.cross_attention_dim).astype(np.float32),
        )
        self.text_embeds = rng.randn(2, POOLED).astype(np.float32)
        # Sizes, crop corners, aesthetic scores: what SDXL pipelines pass, as floats.
        self.time_ids = rng.randint(0, 1025, (2, time_ids)).astype(np.float32)
        self.apply = jax.jit(self.unet.apply)

    def run(self, text_embeds=None, time_ids=None):
        text_embeds = self.text_embeds if text_embeds is None else text_embeds
        time_ids = self.time_ids if time_ids is None else time_ids
        return self.apply({"params": self.params}, *self.inputs.values(), text_embeds=text_embeds, time_ids=time_ids)

    def run_torch(self):
        added = {"text_embeds": torch.from_numpy(self.text_embeds), "time_ids": torch.from_numpy(self.time_ids)}
        sample, timesteps, context = self.inputs.values()
        with torch.no_grad():
            out = self.torch_model(nchw(sample), torch.from_numpy(timesteps), torch.from_numpy(context),
                                   added_cond_kwargs=added).sample
        return nhwc(out)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    @functools.cache
    def get(name):
        overrides, time_ids = MODELS[name]
        return Reference(tmp_path_factory.mktemp(f"sdxl_{name}"), overrides, time_ids)

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_sdxl_unet_matches_diffusers_fp32(references, name):
    ref = references(name)
    ours = ref.run()
    err = rel_err(ours, ref.run_torch())
    print(f"sdxl unet {name} fp32 rel err {err:.2e}")
    assert ours.shape == (2, 16, 24, 4)
    assert err < 1e-4
    # The added conditioning reaches the output: other time ids give another prediction.
    assert rel_err(ref.run(time_ids=ref.time_ids + 64.0), ours) > 1e-3


def test_added_conditions_with_batch_one_are_shared(references):
    ref = references("refiner")
    text, ids = ref.text_embeds[:1], ref.time_ids[:1]
    shared = text_time_features(text, ids, ref.config, batch=2)
    assert shared.shape == (2, ref.config.projection_class_embeddings_input_dim)
    assert np.array_equal(shared, text_time_features(np.repeat(text, 2, 0), np.repeat(ids, 2, 0), ref.config, 2))


def test_params_round_trip_bit_exact(references):
    ref = references("base")
    back = flax_to_torch(ref.params)
    assert back.keys() == ref.state.keys()
    assert all(np.array_equal(back[key], value) for key, value in ref.state.items())


# --- clear errors --------------------------------------------------------------------------------------------


def _one_line_error(call, match) -> str:
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_added_conditions_are_named(references):
    ref = references("base")
    args = ({"params": ref.params}, *ref.inputs.values())
    message = _one_line_error(lambda: ref.unet.apply(*args), "needs text_embeds and time_ids")
    assert f"* {TIME_WIDTH} = {POOLED + 6 * TIME_WIDTH}" in message
    _one_line_error(lambda: ref.unet.apply(*args, text_embeds=ref.text_embeds), "needs time_ids:")
    _one_line_error(lambda: ref.unet.apply(*args, time_ids=ref.time_ids), "needs text_embeds:")


def test_misshaped_added_conditions_are_refused_before_tracing(references):
    ref = references("base")
    args = ({"params": ref.params}, *ref.inputs.values())
    _one_line_error(lambda: ref.unet.apply(*args, text_embeds=ref.text_embeds, time_ids=ref.time_ids[:, :5]),
                    r"time_ids \(2, 5\); this U-Net takes")
    _one_line_error(lambda: ref.unet.apply(*args, text_embeds=ref.text_embeds[None], time_ids=ref.time_ids),
                    rf"text_embeds has shape \(1, 2, {POOLED}\)")
    three = np.zeros((3, POOLED), np.float32)
    _one_line_error(lambda: ref.unet.apply(*args, text_embeds=three, time_ids=ref.time_ids), "batch 2 or 1")


@pytest.mark.parametrize("argument", ["text_embeds", "time_ids"])
def test_added_conditions_on_an_sd_unet_are_refused(argument):
    unet = UNet2DConditionModel(UNetConfig(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    inputs = (np.zeros((1, 8, 8, 4), np.float32), 1.0, np.zeros((1, 7, 32), np.float32))
    call = lambda: jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), *inputs,
                                                     **{argument: np.zeros((1, 6), np.float32)}))
    _one_line_error(call, f"^{argument} was given but this U-Net takes no added conditioning")


# --- config ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [SDXL_BASE_UNET, SDXL_REFINER_UNET], ids=["base", "refiner"])
def test_diffusers_config_round_trips(config):
    assert UNetConfig.from_diffusers_config(config.to_diffusers_config()) == config


def test_released_config_nulls_read_as_defaults():
    data = {**SDXL_BASE_UNET.to_diffusers_config(), "upcast_attention": None, "addition_embed_type_num_heads": 64}
    assert UNetConfig.from_diffusers_config(data) == SDXL_BASE_UNET


@pytest.mark.parametrize("changes, match", [
    ({"transformer_layers_per_block": [[1, 1], [2, 2], [10, 10]]}, "nested per-layer lists"),
    ({"reverse_transformer_layers_per_block": [[10, 10, 10], [2, 2, 2], [1, 1, 1]]},
     "reverse_transformer_layers_per_block"),
    ({"transformer_layers_per_block": [1, 2]}, r"one int per block \(3 blocks\)"),
    ({"addition_embed_type": "text"}, r"addition_embed_type='text'.*\[None, 'text_time'\]"),
    ({"addition_time_embed_dim": None}, "addition_time_embed_dim=None"),
])
def test_unsupported_sdxl_variants_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig.from_diffusers_config({**SDXL_BASE_UNET.to_diffusers_config(), **changes})


@functools.lru_cache(maxsize=None)
def _full_size_shapes(config: UNetConfig) -> dict:
    return weights.param_shapes(UNet2DConditionModel(config))  # jax.eval_shape: nothing allocated


@pytest.mark.parametrize("config", [SDXL_BASE_UNET, SDXL_REFINER_UNET], ids=["base", "refiner"])
def test_full_size_parameter_count_matches_diffusers(config):
    """Counted from shapes alone: jax.eval_shape here, the meta device in PyTorch."""
    ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(_full_size_shapes(config)))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in TorchUNet.from_config(config.to_diffusers_config()).parameters())
    assert ours == theirs
    if config is SDXL_BASE_UNET:
        assert ours == SDXL_BASE_PARAMETERS


# --- single-file (LDM) table -------------------------------------------------------------------------------------


def _to_ldm(state: dict, config: UNetConfig) -> dict:
    inverse = {diffusers: name for name, diffusers in ldm.unet_module_table(config).items()}
    out = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        out[f"{ldm.UNET_PREFIX}{inverse[module]}.{leaf}"] = value
    return out


def test_ldm_table_agrees_with_diffusers_single_file_converter(references):
    """Our table writes an LDM file that diffusers' own converter reads back into exactly the original tensors."""
    ref = references("base")
    ldm_state = _to_ldm(ref.state, ref.config)
    assert f"{ldm.UNET_PREFIX}label_emb.0.0.weight" in ldm_state
    assert f"{ldm.UNET_PREFIX}input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight" in ldm_state
    back = convert_ldm_unet_checkpoint(ldm_state, ref.config.to_diffusers_config())
    assert back.keys() == ref.state.keys()
    assert all(np.array_equal(back[key], ref.state[key]) for key in back)


@pytest.mark.parametrize("config", [SDXL_BASE_UNET, SDXL_REFINER_UNET], ids=["base", "refiner"])
def test_full_size_ldm_table_covers_every_module_once(config):
    table = ldm.unet_module_table(config)
    empty = jax.tree.map(lambda _: np.empty(0), _full_size_shapes(config))
    modules = {key.rpartition(".")[0] for key in flax_to_torch(empty)}
    assert len(set(table.values())) == len(table)
    assert modules <= set(table.values())
    # The table lists a 1x1 shortcut for every resnet; only those whose channels change have one.
    assert all(name.endswith(".conv_shortcut") for name in set(table.values()) - modules)
    # SDXL base files number 9 input and 9 output blocks (0: conv_in, 3 and 6: downsamplers).
    if config is SDXL_BASE_UNET:
        assert {k.split(".")[1] for k in table if k.startswith("input_blocks.")} == {str(i) for i in range(9)}
        assert table["input_blocks.6.0.op"] == "down_blocks.1.downsamplers.0.conv"
        assert table["output_blocks.2.2.conv"] == "up_blocks.0.upsamplers.0.conv"
