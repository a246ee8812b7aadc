"""sdjax against PyTorch diffusers on one device, same architecture and the same random weights.

    python scripts/bench.py --config sd15            # full SD1.5 architecture (GPU)
    python scripts/bench.py --tiny                   # tiny config (CPU)

Measures the U-Net step at batch 2 and 16 (classifier-free guidance doubles the images), a 50-step
text-to-image run at 1 and 8 images with decoding, the cold compile time of the whole pipeline, and
peak device memory. Prints a table and writes JSON. Needs torch and diffusers only for the reference
columns (``--no-diffusers`` skips them); no network.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import weights
from sdjax.config import SD15, CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from sdjax.pipeline import StableDiffusion
from sdjax.tokenizer import load_tokenizer

TINY = ModelConfig(
    text_encoder=CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    unet=UNetConfig(
        sample_size=16,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        cross_attention_dim=64,
        norm_num_groups=8,
    ),
    vae=VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
    scheduler=SD15.scheduler,
)
CONFIGS = {"sd15": SD15, "tiny": TINY}
PROMPT = "a photograph of an astronaut riding a horse"


class Measures(dict):
    """A dict of measurements that prints each one as it is taken, so a run cut short still reports."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"  {self.name} {key}: {value if value is None else round(value, 4)}", flush=True)


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call; ``fn`` must block until its work is done."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def torch_models(config: ModelConfig, seed: int):
    """Random diffusers / transformers models at ``config`` (fp32, CPU)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig as TorchCLIPConfig
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config.unet.to_diffusers_config())
    vae = AutoencoderKL.from_config(config.vae.to_diffusers_config())
    text = CLIPTextModel(TorchCLIPConfig(**config.text_encoder.to_diffusers_config()))
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval()}


def sdjax_model(config: ModelConfig, models, dtype) -> StableDiffusion:
    states = {}
    for name, model in models.items():
        states[name] = {k: v.float().numpy() for k, v in model.state_dict().items()}
    params = weights.params_from_state_dicts(config, states, dtype, source="random")
    return StableDiffusion(config, params, load_tokenizer(), dtype=dtype)


def bench_sdjax(sd: StableDiffusion, args) -> dict:
    results = Measures("sdjax")
    size = sd.config.unet.sample_size
    context_len = sd.config.text_encoder.max_position_embeddings
    unet_step = jax.jit(lambda p, x, t, c: sd.unet.apply({"params": p}, x, t, c))
    for batch in (2, 16):
        x = jnp.zeros((batch, size, size, sd.config.unet.in_channels), sd.dtype)
        c = jnp.zeros((batch, context_len, sd.config.unet.cross_attention_dim), sd.dtype)
        t = jnp.full((batch,), 500.0)
        results[f"unet_step_b{batch}_ms"] = 1e3 * timed(
            lambda: unet_step(sd.params["unet"], x, t, c).block_until_ready(), args.repeats
        )

    def run(count: int):
        return sd.text_to_image(
            PROMPT, num_images_per_prompt=count, steps=args.steps, guidance_scale=7.5, scheduler="pndm", output="np"
        )

    start = time.perf_counter()
    run(1)
    results["cold_compile_and_first_image_s"] = time.perf_counter() - start
    for count in (1, 8):
        results[f"pipeline_{args.steps}steps_{count}img_s"] = timed(lambda: run(count), max(1, args.repeats // 5))
    results["peak_memory_gb"] = peak_jax_memory()
    return results


def peak_jax_memory():
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def bench_diffusers(config: ModelConfig, models, args) -> dict:
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from sdjax.tokenizer import bundled_tokenizer_dir

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    for model in models.values():
        model.to(device, dtype)
    pipe = StableDiffusionPipeline(
        **models,
        tokenizer=CLIPTokenizer.from_pretrained(str(bundled_tokenizer_dir())),
        scheduler=PNDMScheduler(**{k: v for k, v in config.scheduler.to_diffusers_config().items() if k in (
            "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "timestep_spacing",
            "steps_offset", "set_alpha_to_one", "skip_prk_steps")}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    results = Measures("diffusers")
    size = config.unet.sample_size
    unet = models["unet"]
    compiled = torch.compile(unet) if args.torch_compile else None
    for batch in (2, 16):
        x = torch.zeros(batch, config.unet.in_channels, size, size, device=device, dtype=dtype)
        c = torch.zeros(batch, 77, config.unet.cross_attention_dim, device=device, dtype=dtype)
        t = torch.full((batch,), 500.0, device=device)
        with torch.no_grad():
            results[f"unet_step_b{batch}_ms"] = 1e3 * timed(lambda: (unet(x, t, c), sync()), args.repeats)
            if compiled is not None:
                results[f"compiled_unet_step_b{batch}_ms"] = 1e3 * timed(lambda: (compiled(x, t, c), sync()), args.repeats)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for count in (1, 8):
        with torch.no_grad():
            results[f"pipeline_{args.steps}steps_{count}img_s"] = timed(
                lambda: (pipe(PROMPT, num_images_per_prompt=count, num_inference_steps=args.steps, output_type="np"), sync()),
                max(1, args.repeats // 5),
            )
    if device == "cuda":
        results["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    parser.add_argument("--tiny", action="store_true", help="shorthand for --config tiny")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-diffusers", action="store_true", help="sdjax columns only")
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile'd U-Net steps")
    parser.add_argument("--json", default="bench.json")
    args = parser.parse_args()
    name = "tiny" if args.tiny else args.config
    config = CONFIGS[name]
    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.dtype(args.dtype or ("float32" if on_cpu else "bfloat16"))

    models = torch_models(config, seed=0)
    sd = sdjax_model(config, models, dtype)
    report = {
        "config": name,
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "dtype": str(dtype),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "sdjax": bench_sdjax(sd, args),
    }
    del sd
    if not args.no_diffusers:
        import diffusers
        import torch

        report["torch"] = torch.__version__
        report["diffusers_version"] = diffusers.__version__
        report["diffusers"] = bench_diffusers(config, models, args)

    print(f"\n{name} on {report['device']} ({report['backend']}, sdjax {report['dtype']}), jax {report['jax']}")
    keys = list(report["sdjax"])
    for extra in report.get("diffusers", {}):
        if extra not in keys:
            keys.append(extra)
    print(f"{'measure':<36}{'sdjax':>12}{'diffusers':>12}")
    for key in keys:
        ours = report["sdjax"].get(key)
        theirs = report.get("diffusers", {}).get(key)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{key:<36}{fmt(ours):>12}{fmt(theirs):>12}")
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
