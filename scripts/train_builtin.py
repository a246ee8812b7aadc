"""Train sdjax's built-in model from a seed: a small SD-architecture model on the procedural shapes data.

Phase 1 trains the AutoencoderKL on images of the base palette (data.BASE_SHAPES, data.BASE_COLOURS);
phase 2 fine-tunes its decoder alone on the full palette (data.SHAPES, data.SHAPE_COLOURS), so the frozen
VAE can draw the concepts a LoRA later teaches while the latent space stays phase 1's; phase 3 encodes the
base-palette data set to latents once and trains the CLIP text encoder and the U-Net together on the
diffusion loss, with caption dropout so classifier-free guidance works: the denoiser never sees "purple" or
"star". --caption-swap adds mismatched captions at low noise (train.mismatch_captions), so image-to-image at
low strength keeps what the image shows. The EMA weights are written in the diffusers layout to --out.

    python scripts/train_builtin.py --out sdjax/assets/builtin --workdir runs/builtin

All three phases checkpoint to --workdir and resume from there when run again. --vae-seconds, --decoder-seconds and
--unet-seconds stop a phase early (checkpointed) when a machine is lent for a fixed time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import data, train
from sdjax.config import CLIPTextConfig, ModelConfig, SchedulerConfig, UNetConfig, VAEConfig
from sdjax.models.clip import CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL
from sdjax.pipeline import StableDiffusion
from sdjax.schedules import training_alphas_cumprod
from sdjax.tokenizer import load_tokenizer, tokenize

IMAGE_SIZE = 64
REACHED: dict[str, int] = {}  # the step each phase ended at, for the summary

BUILTIN = ModelConfig(
    text_encoder=CLIPTextConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    ),
    unet=UNetConfig(
        sample_size=IMAGE_SIZE // 8,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=64,
    ),
    vae=VAEConfig(
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # replaced by 1/std of the trained encoder's latents
    ),
    scheduler=SchedulerConfig(),
)


def to_model_range(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1.0


def batches(num: int, batch_size: int, seed: int):
    """Endless shuffled index batches over ``num`` examples."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(num)
        for start in range(0, num - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def run_phase(name, step_fn, state, frozen, make_batch, key, steps, workdir: Path, every: int = 500, seconds=None):
    """Steps with periodic checkpoints; resumes from ``workdir/name.ckpt`` when it exists.

    With ``seconds``, stops after that much wall time (and checkpoints), whatever step it reached."""
    ckpt = workdir / f"{name}.ckpt"
    if ckpt.exists():
        state, _ = train.restore_checkpoint(ckpt, state)
        print(f"{name}: resumed at step {int(state.step)}", flush=True)
    log = train.LossLog(workdir / f"{name}_log.jsonl", every=50, total=steps)
    parallel = step_fn.parallel
    state = parallel.place_params(state)
    frozen = parallel.place_params(frozen)
    start = int(parallel.unreplicate(state.step))
    deadline = time.time() + seconds if seconds else None
    for step in range(start, steps):
        batch = parallel.place_batch(make_batch(step))
        state, metrics = step_fn(state, frozen, batch, jax.random.fold_in(key, step))
        log(step + 1, metrics)
        out_of_time = deadline is not None and time.time() > deadline
        if (step + 1) % every == 0 or step + 1 == steps or out_of_time:
            train.save_checkpoint(ckpt, parallel.unreplicate(state))
        if out_of_time:
            print(f"{name}: time limit reached at step {step + 1} of {steps}", flush=True)
            break
    state = parallel.unreplicate(state)
    REACHED[name] = int(state.step)
    return state


def crop_batches(images: np.ndarray, args, seed: int):
    """make_batch(step) over random square crops of shuffled images.

    The autoencoder is convolutional: random crops teach it the same at a fraction of the cost."""
    index = batches(len(images), args.vae_batch, seed)
    crop = args.vae_crop

    def make_batch(step):
        offsets = np.random.default_rng([seed, step]).integers(0, IMAGE_SIZE - crop + 1, size=2)
        return images[next(index), offsets[0] : offsets[0] + crop, offsets[1] : offsets[1] + crop]

    return make_batch


def train_vae(args, workdir: Path, images: np.ndarray):
    """Phase 1: the whole autoencoder on the base-palette images (model range)."""
    vae = AutoencoderKL(config=BUILTIN.vae)
    params = vae.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))["params"]
    optimizer = train.adamw(args.vae_lr, warmup_steps=200, total_steps=args.vae_steps, weight_decay=0.0)

    def loss_fn(p, frozen, batch, key):
        return train.vae_loss(vae, p, batch, key, kl_weight=args.kl_weight)

    step_fn = train.make_train_step(loss_fn, optimizer, ema_decay=None)
    state = train.init_state(params, optimizer, ema=False)
    state = run_phase("vae", step_fn, state, {}, crop_batches(images, args, args.seed),
                      jax.random.PRNGKey(args.seed + 1), args.vae_steps, workdir,
                      every=args.checkpoint_every, seconds=args.vae_seconds)
    return vae, jax.device_get(state.params)


DECODER_PARTS = ("post_quant_conv", "decoder")


def finetune_decoder(args, workdir: Path, vae, params):
    """Phase 2: the decoder learns the full palette (data.SHAPES, data.SHAPE_COLOURS) with the encoder frozen.

    The latent space the denoiser is trained in stays exactly phase 1's, while the frozen decoder can draw
    purple and stars, so a LoRA can later teach the denoiser those concepts (scripts/lora_new_concept.py)."""
    full_palette = {"shapes": data.SHAPES, "colours": data.SHAPE_COLOURS}
    images = data.make_dataset(args.decoder_images, seed=args.seed + 10, image_size=IMAGE_SIZE, **full_palette)[0]
    images = to_model_range(images)
    trainable = {k: v for k, v in params.items() if k in DECODER_PARTS}
    frozen = {k: v for k, v in params.items() if k not in DECODER_PARTS}
    optimizer = train.adamw(args.vae_lr, warmup_steps=200, total_steps=args.decoder_steps, weight_decay=0.0)

    def loss_fn(p, frozen, batch, key):
        return train.vae_loss(vae, {**frozen, **p}, batch, key, kl_weight=0.0)

    step_fn = train.make_train_step(loss_fn, optimizer, ema_decay=None)
    state = train.init_state(trainable, optimizer, ema=False)
    state = run_phase("decoder", step_fn, state, frozen, crop_batches(images, args, args.seed + 11),
                      jax.random.PRNGKey(args.seed + 12), args.decoder_steps, workdir,
                      every=args.checkpoint_every, seconds=args.decoder_seconds)
    return {**params, **jax.device_get(state.params)}


def encode_dataset(vae, params, images, batch_size: int = 256) -> np.ndarray:
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode")[0])
    return np.concatenate([np.asarray(encode(params, images[i : i + batch_size])) for i in range(0, len(images), batch_size)])


def train_denoiser(args, workdir: Path, latents: np.ndarray, captions: list[str], scaling_factor: float):
    text_encoder = CLIPTextModel(config=BUILTIN.text_encoder)
    unet = UNet2DConditionModel(config=BUILTIN.unet)
    tokenizer = load_tokenizer()
    ids, _ = tokenize(tokenizer, captions)
    empty_ids, _ = tokenize(tokenizer, [""])
    key = jax.random.PRNGKey(args.seed + 2)
    latent_size = IMAGE_SIZE // 8
    params = {
        "text_encoder": text_encoder.init(key, jnp.asarray(ids[:1]))["params"],
        "unet": unet.init(
            key,
            jnp.zeros((1, latent_size, latent_size, 4)),
            jnp.zeros((1,)),
            jnp.zeros((1, 77, BUILTIN.unet.cross_attention_dim)),
        )["params"],
    }
    schedule = jnp.asarray(training_alphas_cumprod(BUILTIN.scheduler, zero_snr=True, terminal_fix=False))
    optimizer = train.adamw(args.unet_lr, warmup_steps=500, total_steps=args.unet_steps)
    scaled = latents * scaling_factor

    def loss_fn(p, frozen, batch, key):
        drop_key, loss_key = jax.random.split(key)
        swap_key = jax.random.fold_in(key, 1)
        batch_ids = train.caption_dropout(drop_key, batch["ids"], frozen["empty_ids"], args.caption_dropout)
        context = text_encoder.apply({"params": p["text_encoder"]}, batch_ids)

        def predict(noisy, t):
            batch_context = context
            if args.caption_swap:
                batch_context = train.mismatch_captions(swap_key, context, t, args.caption_swap, args.caption_swap_below)
            return unet.apply({"params": p["unet"]}, noisy, t, batch_context)

        return train.diffusion_loss(predict, batch["latents"], loss_key, frozen["alphas_cumprod"])

    step_fn = train.make_train_step(loss_fn, optimizer, ema_decay=args.ema_decay)
    index = batches(len(scaled), args.unet_batch, args.seed + 3)

    def make_batch(step):
        chosen = next(index)
        return {"latents": scaled[chosen], "ids": ids[chosen]}

    state = train.init_state(params, optimizer)
    frozen = {"empty_ids": jnp.asarray(empty_ids[0]), "alphas_cumprod": schedule}
    state = run_phase("denoiser", step_fn, state, frozen, make_batch, key, args.unet_steps, workdir,
                      every=args.checkpoint_every, seconds=args.unet_seconds)
    return jax.device_get(state.ema_params), tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sdjax/assets/builtin")
    parser.add_argument("--workdir", default="runs/builtin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=20000, help="VAE and denoiser data set (base palette)")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-seconds", type=float, default=None, help="stop the VAE phase after this long")
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-crop", type=int, default=32, help="side of the random training crops")
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--decoder-images", type=int, default=20000, help="decoder fine-tuning set (full palette)")
    parser.add_argument("--decoder-steps", type=int, default=1500)
    parser.add_argument("--decoder-seconds", type=float, default=None, help="stop the decoder phase after this long")
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--unet-lr", type=float, default=5e-4)
    parser.add_argument("--unet-seconds", type=float, default=None, help="stop the denoiser phase after this long")
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--caption-swap", type=float, default=0.0,
                        help="rate of mismatched captions at timesteps below --caption-swap-below (see "
                             "train.mismatch_captions)")
    parser.add_argument("--caption-swap-below", type=int, default=300,
                        help="300 covers img2img up to strength 0.3 at 25 steps; 500 cost more adherence")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    args = parser.parse_args()
    if not 0.0 <= args.caption_swap <= 1.0:
        parser.error(f"--caption-swap is a rate: got {args.caption_swap}, accepted 0 to 1")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    images, captions, _ = data.make_dataset(args.num_images, seed=args.seed, image_size=IMAGE_SIZE)
    images = to_model_range(images)
    vae, vae_params = train_vae(args, workdir, images)
    latents = encode_dataset(vae, vae_params, images)  # the encoder is final after phase 1
    del images
    vae_params = finetune_decoder(args, workdir, vae, vae_params)
    scaling_factor = float(1.0 / latents.std())
    print(f"latent std {latents.std():.4f} -> scaling_factor {scaling_factor:.5f}", flush=True)
    denoiser_params, tokenizer = train_denoiser(args, workdir, latents, captions, scaling_factor)

    config = BUILTIN.replace(vae=BUILTIN.vae.__class__(**{**BUILTIN.vae.__dict__, "scaling_factor": scaling_factor}))
    params = {**denoiser_params, "vae": vae_params}
    StableDiffusion(config, params, tokenizer, dtype=jnp.float32).save_pretrained(args.out)
    elapsed = time.time() - started
    summary = {"seconds": round(elapsed), "devices": [d.device_kind for d in jax.devices()], "steps_reached": REACHED,
               "jax": jax.__version__, "args": vars(args)}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out} in {elapsed / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
