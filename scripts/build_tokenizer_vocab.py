"""Build sdjax/assets/tokenizer/ from OpenAI's CLIP BPE file (run once; the output is committed).

The CLIP byte-level BPE vocabulary (MIT licence, (c) 2021 OpenAI) ships as `bpe_simple_vocab_16e6.txt.gz`
inside the `openai-clip`, `open-clip-torch` and `clip-anytorch` packages:

    pip download open-clip-torch --no-deps -d /tmp/oc
    python scripts/build_tokenizer_vocab.py /tmp/oc/open_clip_torch-*.whl

The argument may be the .gz itself or a wheel/zip that contains it. The output is the layout of the
`tokenizer/` folder of Stable Diffusion 1.x (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json), which `transformers.CLIPTokenizer.from_pretrained` reads offline.
"""

import argparse
import gzip
import json
import zipfile
from pathlib import Path

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses the first 49152 - 256 - 2 merge rules; with 2 * 256 byte tokens and 2 special tokens
# that gives the 49408-token vocabulary of every CLIP text encoder.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "sdjax" / "assets" / "tokenizer"

CLIP_LICENSE = """\
The files vocab.json and merges.txt in this folder are derived from bpe_simple_vocab_16e6.txt.gz
of https://github.com/openai/CLIP, distributed under the following licence:

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def byte_symbols() -> list[str]:
    """The printable character standing for each byte, in CLIP's vocabulary order.

    Bytes that are printable Latin-1 characters stand for themselves and come first; the other 68
    bytes are mapped, in increasing order, to code points 256, 257, ... so that no token contains
    whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def read_bpe_lines(source: Path) -> list[str]:
    if source.suffix == ".gz":
        data = gzip.decompress(source.read_bytes())
    else:
        with zipfile.ZipFile(source) as archive:
            member = next((n for n in archive.namelist() if n.endswith("/" + BPE_FILE_NAME)), None)
            if member is None:
                raise FileNotFoundError(f"{source} contains no {BPE_FILE_NAME}")
            data = gzip.decompress(archive.read(member))
    return data.decode("utf-8").split("\n")


def build(lines: list[str]) -> tuple[dict[str, int], list[str]]:
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is the "#version" header
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"expected {NUM_MERGES} merge rules of two symbols each, got {len(merges)} lines")
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"expected {VOCAB_SIZE} distinct tokens, got {len(vocab)}")
    return vocab, merges


def special_token(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def write(out: Path, vocab: dict[str, int], merges: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # Stable Diffusion 1.x pads with <|endoftext|>; SD 2.x tokenizers pad with "!" (id 0).
    config = {
        "add_prefix_space": False,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    special = {
        "bos_token": special_token(BOS, normalized=True),
        "eos_token": special_token(EOS, normalized=False),
        "pad_token": special_token(EOS, normalized=False),
        "unk_token": special_token(EOS, normalized=False),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "LICENSE").write_text(CLIP_LICENSE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help=f"{BPE_FILE_NAME} or a wheel that contains it")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    vocab, merges = build(read_bpe_lines(args.source))
    write(args.out, vocab, merges)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
