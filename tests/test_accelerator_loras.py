"""Few-step accelerator LoRAs (LCM-LoRA, TCD-LoRA, Hyper-SD 1.5) in the layouts they are released in, against
diffusers' ``load_lora_weights`` of the same file.

They adapt more than attention: diffusers' LCM-LoRA training script targets the resnets' 3x3 convs, their
``conv_shortcut`` and ``time_emb_proj``, the down/up-sampler convs and the feed-forward layers as well. The
released files come in two layouts: what diffusers' ``save_lora_weights`` writes (``unet.<module>.lora_A.weight``
/ ``lora_B``), and kohya's
``lora_unet_<diffusers module>.lora_down.weight`` with ``.alpha`` (lcm-lora-sdv1-5, Hyper-SD15-*-lora).
"""


import jax.numpy as jnp
import numpy as np
import pytest
import torch

from reference import nchw, nhwc, rel_err
from sdjax import lora
from sdjax.layouts.files import read_checkpoint_file, write_safetensors
from sdjax.layouts.ldm import unet_module_table
from sdjax.pipeline import StableDiffusion

peft = pytest.importorskip("peft", reason="diffusers needs peft to load LoRA files")

# The target_modules of diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd.py.
LCM_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]
RANK = 4
# Every kind of layer the targets name, as sdjax module paths (the tiny U-Net has each at least once).
KINDS = ("to_q", "to_out_0", "proj_in", "ff/net_0/proj", "conv1", "conv2", "conv_shortcut",
         "downsamplers_0/conv", "upsamplers_0/conv", "time_emb_proj")


@pytest.fixture(scope="module")
def lcm_lora(tiny_pipeline_dir):
    """A PEFT state dict of LCM-LoRA's targets on the tiny U-Net, every A and B matrix random (a zero B, PEFT's
    initialisation, would leave the U-Net unchanged and the comparison meaningless)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False, target_modules=LCM_TARGETS))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(0.15 * torch.randn(param.shape, generator=gen))
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.RandomState(0)
    return {
        "x": rng.randn(2, 8, 8, 4).astype(np.float32),
        "t": np.array([999, 259]),
        "context": rng.randn(2, 77, 32).astype(np.float32),
    }


def diffusers_file(tmp_path, state) -> str:
    """diffusers' own layout (TCD-LoRA's, and what its training scripts save now): ``save_lora_weights`` of the
    PEFT state dict."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(tmp_path / "diffusers", unet_lora_layers=state)
    return str(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors")


def kohya_file(tmp_path, state) -> str:
    """The kohya layout of the released LCM-LoRA and Hyper-SD 1.5 files, from diffusers' own converter."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    path = tmp_path / "kohya.safetensors"
    write_safetensors(path, {k: v.numpy().astype(np.float32) for k, v in kohya.items()})
    return str(path)


def torch_unet(pipe, inputs):
    with torch.no_grad():
        out = pipe.unet(nchw(inputs["x"]), torch.tensor(inputs["t"]), torch.from_numpy(inputs["context"])).sample
    return nhwc(out)


def sdjax_unet(sd, params, inputs, adapters=()):
    with lora.unfused(adapters):
        return np.asarray(sd.unet.apply({"params": params["unet"]}, inputs["x"], inputs["t"], inputs["context"]))


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_accelerator_lora_matches_diffusers(tmp_path, tiny_pipeline_dir, torch_pipe, lcm_lora, inputs, layout):
    path = (diffusers_file if layout == "diffusers" else kohya_file)(tmp_path, lcm_lora)
    sd = StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype=jnp.float32)
    name = sd.load_lora(path, strict=True)
    adapted = sd.params["lora"][name]["unet"]
    assert len(adapted) == len({k.rsplit(".lora_", 1)[0] for k in lcm_lora}), "every LCM-LoRA layer loads"
    for kind in KINDS:
        assert any(p.endswith(kind) for p in adapted), kind
    assert any(m["down"].shape[:2] == (3, 3) for m in adapted.values()), "3x3 conv LoRAs load"

    base = torch_unet(torch_pipe, inputs)
    torch_pipe.load_lora_weights(path, adapter_name="fast")
    try:
        expected = torch_unet(torch_pipe, inputs)
    finally:
        torch_pipe.delete_adapters("fast")
    assert rel_err(expected, base) > 0.05, "the LoRA must change the output for this test to mean anything"
    fused = sdjax_unet(sd, sd.merged_params(), inputs)
    unfused = sdjax_unet(sd, sd.params, inputs, [(adapted, 1.0)])
    print(f"{layout}: LoRA changes the U-Net output by {rel_err(expected, base):.2f}; rel err fused "
          f"{rel_err(fused, expected):.1e}, unfused {rel_err(unfused, expected):.1e}")
    assert rel_err(fused, expected) < 1e-4
    assert rel_err(unfused, expected) < 1e-4


def test_kohya_ldm_names_load_the_same_adapter(tmp_path, tiny_pipeline_dir, lcm_lora):
    """kohya files named after the original LDM U-Net (``input_blocks_1_0_emb_layers_1``, ``skip_connection``,
    ``op``) adapt the same layers."""
    sd = StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype=jnp.float32)
    state = read_checkpoint_file(kohya_file(tmp_path, lcm_lora))
    table = unet_module_table(sd.config.unet)
    to_ldm = {diffusers.replace(".", "_"): ldm.replace(".", "_") for ldm, diffusers in table.items()}
    renamed = {}
    for key, value in state.items():
        module, _, role = key.partition(".")
        renamed[f"lora_unet_{to_ldm[module.removeprefix('lora_unet_')]}.{role}"] = value
    assert any("emb_layers_1" in k for k in renamed) and any("skip_connection" in k for k in renamed)
    ldm_path = tmp_path / "ldm.safetensors"
    write_safetensors(ldm_path, renamed)
    expected = lora.load_lora_file(tmp_path / "kohya.safetensors", sd.config, strict=True)
    ours = lora.load_lora_file(ldm_path, sd.config, strict=True)
    assert ours["unet"].keys() == expected["unet"].keys()
    for path, module in expected["unet"].items():
        for role in ("down", "up", "alpha"):
            np.testing.assert_array_equal(ours["unet"][path][role], module[role])


def test_lcm_lora_sampling_matches_diffusers(tmp_path, tiny_pipeline_dir, torch_pipe, lcm_lora):
    """The whole few-step recipe: the LoRA, LCM sampling (fresh noise between steps, drawn as torch draws it),
    4 steps, no classifier-free guidance."""
    from diffusers import LCMScheduler

    path = kohya_file(tmp_path, lcm_lora)
    sd = StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype=jnp.float32)
    sd.load_lora(path)
    ours = sd.text_to_image("a red circle", steps=4, guidance_scale=1.0, scheduler="lcm", seed=7, noise="torch-cpu",
                            height=64, width=64, output="latent")
    scheduler, torch_pipe.scheduler = torch_pipe.scheduler, LCMScheduler.from_config(torch_pipe.scheduler.config)
    torch_pipe.load_lora_weights(path, adapter_name="lcm")
    try:
        with torch.no_grad():
            expected = torch_pipe("a red circle", num_inference_steps=4, guidance_scale=1.0, height=64, width=64,
                                  generator=[torch.Generator().manual_seed(7)], output_type="latent").images
    finally:
        torch_pipe.delete_adapters("lcm")
        torch_pipe.scheduler = scheduler
    assert rel_err(ours, nhwc(expected)) < 1e-3
