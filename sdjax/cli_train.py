"""Options of the training commands (``sdjax train-lora``, ``sdjax train-embedding``, ``sdjax train-controlnet``);
``sdjax.cli`` adds the model options and dispatches here. The work is done by ``sdjax.lora_train``,
``sdjax.embedding_train`` and ``sdjax.controlnet_train``."""

from __future__ import annotations

import argparse

from sdjax import controlnet_train, embedding_train, lora_train


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
    parser.add_argument("--distill", choices=("lcm",), default=None,
                        help="instead of the diffusion loss, distil the model into an LCM-LoRA (latent consistency "
                             "distillation; sample it with --fast lcm --lora)")
    parser.add_argument("--distill-guidance", type=float, nargs=2, default=(4.0, 16.0), metavar=("MIN", "MAX"),
                        help="--distill: range of the teacher's guidance scale, drawn per example (default 4 16, "
                             "diffusers' LCM-LoRA script's w of 3..15)")
    parser.add_argument("--distill-solver-steps", type=int, default=50,
                        help="--distill: the teacher's DDIM grid (LCMScheduler's original_inference_steps)")
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


def add_train_controlnet_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="image folder with same-name .txt captions or metadata.jsonl")
    parser.add_argument("--shapes", type=int, default=None, metavar="N",
                        help="train on N images of the built-in model's shapes data set instead of --data")
    parser.add_argument("--conditions", default=None,
                        help="folder of ready condition images, named as their --data images (default: made from "
                             "the images by --condition)")
    parser.add_argument("--condition", choices=controlnet_train.CONDITIONS, default="canny",
                        help="how condition images are made from the training images (OpenCV Canny, 100/200)")
    parser.add_argument("--out", required=True,
                        help="output folder (diffusers ControlNet: config.json + weights; checkpoint, log); an "
                             "existing checkpoint there is resumed")
    parser.add_argument("--caption-from-folder-name", action="store_true",
                        help="caption images that have none with their folder's name")
    parser.add_argument("--resolution", type=int, default=None, help="training image side (default: model native)")
    parser.add_argument("--conditioning-channels", default="16,32,96,256",
                        help="channels of the condition image encoder, one per level, comma separated (four "
                             "levels downsample 8x)")
    parser.add_argument("--caption-dropout", type=float, default=0.5,
                        help="share of captions replaced by the empty prompt (the ControlNet paper's 0.5)")
    parser.add_argument("--high-noise-share", type=float, default=0.0,
                        help="share of examples whose timestep is drawn from --high-noise-from up, where the layout "
                             "is decided (default: 0, all timesteps alike)")
    parser.add_argument("--high-noise-from", type=int, default=500, help="first timestep of --high-noise-share")
    _add_run_options(parser, steps=1000, lr=1e-5, weight_decay=1e-2,
                     seed_help="seed of the condition encoder's initialisation, the data order and --shapes")


def run_lora(args) -> int:
    return lora_train.run_from_args(args)


def run_embedding(args) -> int:
    return embedding_train.run_from_args(args)


def run_controlnet(args) -> int:
    return controlnet_train.run_from_args(args)
