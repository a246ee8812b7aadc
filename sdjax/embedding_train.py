"""Textual-inversion training: learn the vectors of a new prompt token, everything else frozen.

The token's n vectors are new rows of the text encoder's embedding table (``StableDiffusion.add_embedding``);
they start as the embeddings of an initialisation word (A1111's "Initialization text": its tokens repeated
to n vectors) and are the only trainable parameters. The loss is the diffusion loss of the frozen U-Net on
images whose captions contain the token, with the training core of ``sdjax.train`` (AdamW, accumulation,
data-parallel over all local devices, resumable checkpoints) that LoRA training uses.

    sdjax train-embedding --data my_images/ --out my_embedding/ --token "<my-thing>" --init-word thing

The output folder receives ``<token>.safetensors`` (``emb_params``: AUTOMATIC1111, ComfyUI and kohya
load it by file name) and ``learned_embeds.safetensors`` ({token: vectors}: diffusers'
``pipe.load_textual_inversion``, and ``sd.load_embedding``), a resumable ``checkpoint.msgpack``,
``loss.jsonl`` and, with ``--sample-every``, ``samples/step_<n>_<i>.png``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import data, lora_train, train
from sdjax.layouts.files import write_safetensors
from sdjax.lora_train import batch_latents, encode_latents
from sdjax.pipeline import StableDiffusion
from sdjax.schedules import training_alphas_cumprod
from sdjax.train_loop import LoopPlan, run_training, write_images

DIFFUSERS_FILE = "learned_embeds.safetensors"


@dataclasses.dataclass(frozen=True)
class EmbeddingTrainConfig:
    token: str = "<concept>"
    init_word: str = "*"  # A1111's default initialisation text; "" starts from zeros
    num_vectors: int = 1
    template: Optional[str] = None  # e.g. "a photo of {token}, {caption}"; None: captions name the token
    learning_rate: float = 5e-3  # A1111's default
    steps: int = 1000
    batch_size: int = 1
    accumulate_steps: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: Optional[float] = None
    cache_latents: bool = False
    seed: int = 0
    parallel: str = "mesh"
    checkpoint_every: int = 500
    log_every: int = 10
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20


@dataclasses.dataclass(frozen=True)
class TrainedEmbedding:
    token: str
    vectors: np.ndarray  # (num_vectors, width) float32


def a1111_file_name(token: str) -> str:
    """A1111 names an embedding after its file: the token with characters no file system takes replaced."""
    return re.sub(r'[\\/:*?"<>|\s]+', "_", token).strip("_") or "embedding"


def save_embedding(folder, embedding: TrainedEmbedding) -> tuple[Path, Path]:
    """Write the A1111 file (``<token>.safetensors``, ``emb_params``) and diffusers' ``learned_embeds``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(embedding.vectors, np.float32)
    a1111 = folder / f"{a1111_file_name(embedding.token)}.safetensors"
    write_safetensors(a1111, {"emb_params": vectors}, {"name": embedding.token})
    diffusers = folder / DIFFUSERS_FILE
    write_safetensors(diffusers, {embedding.token: vectors}, {})
    return a1111, diffusers


def initial_vectors(sd, init_word: str, num_vectors: int) -> np.ndarray:
    """The init word's token embeddings, repeated cyclically to ``num_vectors`` (zeros for "")."""
    width = sd.config.text_encoder.hidden_size
    ids = sd.tokenizer(init_word, add_special_tokens=False, verbose=False)["input_ids"] if init_word else []
    if not ids:
        return np.zeros((num_vectors, width), np.float32)
    table = np.asarray(sd.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"],
                       np.float32)
    return np.stack([table[ids[i % len(ids)]] for i in range(num_vectors)])


def training_captions(captions: Sequence[str], config: EmbeddingTrainConfig) -> list[str]:
    if config.template is not None:
        if "{token}" not in config.template:
            raise ValueError(f"template {config.template!r} must contain {{token}} (and may contain {{caption}})")
        return [config.template.format(token=config.token, caption=c) for c in captions]
    missing = [c for c in captions if config.token not in c]
    if missing:
        raise ValueError(f"{len(missing)} of {len(captions)} captions do not contain the token {config.token!r} "
                         f"(first: {missing[0]!r}); write it into the captions or give a template such as "
                         f"'a photo of {{token}}, {{caption}}'")
    return list(captions)


def token_context(sd, text_params, ids, earlier_rows, vectors):
    """The text encoder's output for ``ids`` with the token's ``vectors`` appended to the added rows."""
    rows = jnp.concatenate([earlier_rows, vectors])
    return sd.text_encoder.apply({"params": text_params}, ids, skip_layers=sd.config.clip_skip, added_tokens=rows)


def make_loss_fn(sd):
    """``loss(trainable, frozen, batch, key)``: the frozen model's diffusion loss with the token's vectors
    ``trainable["vectors"]`` appended to the earlier added rows ``frozen["earlier_rows"]``."""
    prediction_type = sd.config.scheduler.prediction_type

    def loss_fn(trainable, frozen, batch, key):
        base = frozen["params"]
        vae_key, loss_key = jax.random.split(key)
        latents = batch_latents(sd, base, batch, vae_key)
        context = token_context(sd, base["text_encoder"], batch["ids"], frozen["earlier_rows"], trainable["vectors"])

        def predict(noisy, t):
            return sd.unet.apply({"params": base["unet"]}, noisy.astype(sd.unet.dtype), t, context)

        return train.diffusion_loss(predict, latents, loss_key, frozen["alphas_cumprod"], prediction_type)

    return loss_fn


def _config_record(config: EmbeddingTrainConfig) -> dict:
    keep = ("token", "init_word", "num_vectors", "template", "accumulate_steps", "seed")
    return json.loads(json.dumps({k: getattr(config, k) for k in keep}))


def train_embedding(
    sd,
    images: np.ndarray,
    captions: Sequence[str],
    config: EmbeddingTrainConfig = EmbeddingTrainConfig(),
    output_dir=None,
    *,
    progress: bool = True,
    devices=None,
) -> TrainedEmbedding:
    """Learn ``config.token`` for ``sd`` (a ``StableDiffusion``, frozen) from uint8 NHWC ``images`` and their
    ``captions`` (each naming the token, or filled into ``config.template``). Returns the vectors and leaves
    the token loaded in ``sd``, so ``sd.text_to_image("a <token> ...")`` uses it at once.

    With ``output_dir``: checkpoints every ``checkpoint_every`` steps and resumes from the last one, logs
    the loss, writes sample images, and saves the embedding in A1111 and diffusers formats at the end."""
    lora_train.check_inputs(sd, images, captions, config, devices)
    if config.num_vectors < 1:
        raise ValueError(f"num_vectors must be positive, got {config.num_vectors}")
    captions = training_captions(captions, config)
    output = Path(output_dir) if output_dir is not None else None
    if config.token in sd.embeddings:
        sd.unload_embedding(config.token)  # re-added last, so its rows are the table's last ones
    sd.add_embedding(initial_vectors(sd, config.init_word, config.num_vectors), config.token)
    cond, _ = sd.tokenize_prompts(captions, [""], "plain")
    if cond.ids.shape[1] != sd.config.text_encoder.max_position_embeddings:
        raise ValueError(f"captions must fit one {sd.config.text_encoder.max_position_embeddings}-token chunk; "
                         f"the longest needs {max(cond.chunks)}")
    table = np.asarray(sd.params["embeddings"], np.float32)
    earlier_rows, start = table[: len(table) - config.num_vectors], table[len(table) - config.num_vectors :]

    key = jax.random.PRNGKey(config.seed)
    optimizer = train.adamw(config.learning_rate, warmup_steps=config.warmup_steps,
                            weight_decay=config.weight_decay, clip_norm=config.clip_norm,
                            accumulate_steps=config.accumulate_steps)
    step_fn = train.make_train_step(make_loss_fn(sd), optimizer, ema_decay=None, parallel=config.parallel,
                                    devices=devices)
    base = {k: v for k, v in sd.params.items() if k not in ("lora", "embeddings")}
    if config.cache_latents:
        examples = {"latents": encode_latents(sd, images), "ids": cond.ids}
        base = {k: v for k, v in base.items() if k != "vae"}
    else:
        examples = {"pixels": images, "ids": cond.ids}
    frozen = {
        "params": base,
        "earlier_rows": jnp.asarray(earlier_rows, sd.dtype),
        "alphas_cumprod": jnp.asarray(training_alphas_cumprod(sd.config.scheduler, zero_snr=True, terminal_fix=False)),
    }
    state = train.init_state({"vectors": start}, optimizer, ema=False)

    def sample(params, step: int) -> None:
        sd.add_embedding(_vectors(params), config.token)
        write_samples(sd, config, output / "samples", step)

    params = run_training(step_fn, state, frozen, examples, key, LoopPlan.of("train-embedding", config), output,
                          _config_record(config), progress=progress, sample=sample if config.sample_prompts else None)

    embedding = TrainedEmbedding(config.token, _vectors(params))
    sd.add_embedding(embedding.vectors, config.token)
    if output:
        save_embedding(output, embedding)
    return embedding


def _vectors(params) -> np.ndarray:
    return np.asarray(params["vectors"], np.float32)


def write_samples(sd, config: EmbeddingTrainConfig, folder: Path, step: int) -> list[Path]:
    images = sd.text_to_image(list(config.sample_prompts), steps=config.sample_steps, seed=config.seed,
                              scheduler="dpmpp_2m")
    return write_images(images, folder, step)


# --- command line (the options are defined in sdjax.cli_train) ----------------------------------------------


def config_from_args(args) -> EmbeddingTrainConfig:
    return EmbeddingTrainConfig(
        token=args.token,
        init_word=args.init_word,
        num_vectors=args.vectors,
        template=args.template,
        learning_rate=args.lr,
        steps=args.steps,
        batch_size=args.batch_size,
        accumulate_steps=args.accumulate,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        cache_latents=args.cache_latents,
        seed=args.seed,
        parallel=args.parallel,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        sample_every=args.sample_every,
        sample_prompts=tuple(args.sample_prompts),
        sample_steps=args.sample_steps,
    )


def run_from_args(args) -> int:
    config = config_from_args(args)
    paths, captions = data.load_image_folder(args.data, caption_from_folder_name=args.caption_from_folder_name)
    sd = StableDiffusion.load(args.model, config=args.config, dtype=args.base_dtype)
    images = data.load_images(paths, args.resolution or sd.native_size)
    print(f"{len(images)} images from {args.data}; learning {config.token!r} in {config.steps} steps", flush=True)
    started = time.time()
    train_embedding(sd, images, captions, config, args.out, progress=not args.no_progress)
    print(f"trained {config.num_vectors} vector(s) for {config.token!r} in {time.time() - started:.0f}s", flush=True)
    print(Path(args.out) / f"{a1111_file_name(config.token)}.safetensors")
    print(Path(args.out) / DIFFUSERS_FILE)
    return 0
