"""Options of the training commands (``sdjax train-lora``, ``sdjax train-embedding``); ``sdjax.cli`` adds the
model options and dispatches here. The work is done by ``sdjax.lora_train`` and ``sdjax.embedding_train``."""

from __future__ import annotations

import argparse

from sdjax import embedding_train, lora_train


def _add_data_options(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--data", required=True, help="image folder with same-name .txt captions or metadata.jsonl")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--caption-from-folder-name", action="store_true",
                        help="caption images that have none with their folder's name")
    parser.add_argument("--resolution", type=int, default=None, help="training image side (default: model native)")


def _add_run_options(parser: argparse.ArgumentParser, *, steps: int, lr: float, weight_decay: float,
                     seed_help: str) -> None:
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=1, help="images per micro-batch, over all devices")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=lr, help="learning rate (AdamW)")
    parser.add_argument("--warmup", type=int, default=0, help="linear learning-rate warmup steps")
    parser.add_argument("--weight-decay", type=float, default=weight_decay, help="AdamW weight decay")
    parser.add_argument("--cache-latents", action="store_true", help="encode the images with the VAE once")
    parser.add_argument("--base-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="frozen base weights (default: bfloat16 on TPU/GPU, float32 on CPU)")
    parser.add_argument("--parallel", choices=("mesh", "pmap"), default="mesh",
                        help="data parallelism over the local devices")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--checkpoint-every", type=int, default=500, help="save a checkpoint every N steps")
    parser.add_argument("--log-every", type=int, default=10, help="log the loss every N steps")
    parser.add_argument("--sample-every", type=int, default=0, help="write sample images every N steps")
    parser.add_argument("--sample-prompt", action="append", default=[], dest="sample_prompts",
                        help="prompt of the sample images; repeat for several (default: none)")
    parser.add_argument("--sample-steps", type=int, default=20, help="denoising steps of the sample images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_train_lora_options(parser: argparse.ArgumentParser) -> None:
    _add_data_options(parser, "output folder (adapter files, checkpoint, log, samples)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--targets", default="attention",
                        help="U-Net layer groups, comma separated: attention, feed_forward, proj, conv")
    parser.add_argument("--text-encoder-targets", default="",
                        help="text encoder layer groups (attention, feed_forward); default: none")
    parser.add_argument("--caption-dropout", type=float, default=0.0,
                        help="share of captions replaced by the empty prompt (for classifier-free guidance)")
    _add_run_options(parser, steps=1000, lr=1e-4, weight_decay=1e-2,
                     seed_help="seed of the LoRA initialisation and data order")


def add_train_embedding_options(parser: argparse.ArgumentParser) -> None:
    _add_data_options(parser, "output folder (embedding files, checkpoint, log, samples)")
    parser.add_argument("--token", required=True,
                        help="the new word, e.g. '<my-thing>'; captions must contain it unless --template is given")
    parser.add_argument("--init-word", default="*",
                        help="word whose embedding the vectors start from (A1111's initialization text; '' = zeros)")
    parser.add_argument("--vectors", type=int, default=1, help="vectors per token (A1111's 'number of vectors')")
    parser.add_argument("--template", default=None,
                        help="caption template with {token} and optionally {caption}, e.g. 'a photo of {token}'")
    _add_run_options(parser, steps=1000, lr=5e-3, weight_decay=0.0, seed_help="seed of the data order")


def run_lora(args) -> int:
    return lora_train.run_from_args(args)


def run_embedding(args) -> int:
    return embedding_train.run_from_args(args)
