"""CLIP tokenizer: transformers' CLIPTokenizer over a model's `tokenizer/` folder or the bundled one.

The bundled folder (sdjax/assets/tokenizer) holds OpenAI's CLIP BPE vocabulary in the layout of
Stable Diffusion 1.x, so the built-in model and tests work without a download. It was made once by
scripts/build_tokenizer_vocab.py.
"""

import os
from pathlib import Path

import numpy as np

# transformers prints "None of PyTorch, TensorFlow >= 2.0, or Flax have been found..." on import when no
# framework is installed; sdjax uses only its tokenizers, so the advice is noise on every command.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
import transformers  # noqa: E402

_REQUIRED_FILES = ("vocab.json", "merges.txt")


def bundled_tokenizer_dir() -> Path:
    return Path(__file__).resolve().parent / "assets" / "tokenizer"


def load_tokenizer(path: str | Path | None = None) -> transformers.CLIPTokenizer:
    """CLIPTokenizer from a folder with vocab.json and merges.txt (or tokenizer.json); None: the bundled one."""
    folder = bundled_tokenizer_dir() if path is None else Path(path)
    missing = [name for name in _REQUIRED_FILES if not (folder / name).is_file()]
    # transformers 5 writes only the fast tokenizer's tokenizer.json; that is enough too.
    if missing and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no CLIP tokenizer at {folder}: missing {', '.join(missing)}; expected a folder with "
            f"{' and '.join(_REQUIRED_FILES)} or tokenizer.json (a diffusers model's tokenizer/ folder), "
            "or path=None for the bundled one"
        )
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def tokenize(
    tokenizer: transformers.PreTrainedTokenizerBase, prompts: list[str], max_length: int = 77
) -> tuple[np.ndarray, list[int]]:
    """Token ids (B, max_length) int32: BOS, the prompt, EOS, then the tokenizer's pad token.

    Prompts longer than max_length - 2 tokens are cut (EOS is kept last, as CLIP was trained);
    the second result says how many prompt tokens each prompt lost, for the caller to warn about.
    """
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (BOS and EOS), got {max_length}")
    content = tokenizer(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]
    dropped = [max(0, len(ids) - (max_length - 2)) for ids in content]
    encoded = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
    )
    return encoded["input_ids"].astype(np.int32), dropped
