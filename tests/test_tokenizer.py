"""The bundled CLIP tokenizer against OpenAI's original SimpleTokenizer reading the original BPE file.

The reference is `clip/simple_tokenizer.py` from the `openai-clip` package (test extra; needs ftfy),
loaded as a single module file so that clip/__init__.py, which imports torchvision, never runs.
"""

import importlib.util
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdjax.tokenizer import bundled_tokenizer_dir, load_tokenizer, tokenize

BOS, EOS = 49406, 49407

HAND_WRITTEN = [
    "a red circle on a blue background",
    "A Photo Of An Astronaut Riding A Horse On Mars",
    "",
    "   ",
    "hello,world!!! ... ?!?",
    "don't you'll we've they're I'm she'd it's",
    "DON'T YOU'LL WE'VE",
    "3.14159 and 1,000,000 and 2024-01-13 and 0x1F",
    "tabs\tand\nnewlines\r\nand    runs   of     spaces",
    "café naïve façade Ærøskøbing Straße",
    "東京の夜景、ネオン、雨",
    "서울의 밤 풍경",
    "москва зимой, снег",
    "emoji 🐱🐶🦄 and flags 🇯🇵 and zwj 👩‍👩‍👧 and skin tones 👍🏽",
    "a photo of a <|endoftext|> cat",
    "(masterpiece:1.2), [best quality], {ultra detailed}, 8k uhd, dslr",
    "C++ and C# and F# and .NET and node.js",
    "email me at someone@example.com or visit https://example.org/path?q=1&r=2",
    "ŁÓDŹ ĆMA ŻÓŁW",
    "mixed CaSe WoRdS with UPPER and lower",
    "math: ∑ ∫ √ ∞ ≈ ≠ ± × ÷ α β γ δ",
    "arabic العربية and hebrew עברית and hindi हिन्दी and thai ภาษาไทย",
    "zero width\u200bspace and non\u00a0breaking space",
    "repeated letters aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa and zzzzzzzzz",
    "~`!@#$%^&*()_+-={}|[]\\:\";'<>?,./",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "“smart quotes” and ‘apostrophes’",  # ftfy straightens these in the reference
    "fullwidth ＡＢＣ１２３ and ligature ﬁsh",
    "html &amp; entities &lt;b&gt; &amp;amp;",
    "mojibake cafÃ©",
]

WORDS = (
    "a an the of on in with and red green blue yellow white black purple orange circle square triangle star "
    "cat dog astronaut horse castle forest city night portrait landscape highly detailed octane render trending "
    "artstation 4k 8k hdr unreal engine by greg rutkowski photorealistic cinematic lighting bokeh watercolor"
).split()
PIECES = WORDS + [",", ".", "!", "?", "...", "'s", "'ll", "--", "(", ")", "[", "]", ":", "1", "42", "2077", "3.5",
                  "é", "ñ", "ü", "日本", "🎨", "✨", "—", "…", "  ", "\t"]


def varied_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    strings = []
    for i in range(count):
        length = rng.choice([1, 3, 8, 20, 60, 120])  # 60 and 120 pieces exceed 77 tokens
        parts = [rng.choice(PIECES) for _ in range(length)]
        if i % 3 == 0:
            parts = [p.upper() if rng.random() < 0.3 else p.capitalize() for p in parts]
        strings.append(rng.choice([" ", "", "  "]).join(parts))
    return strings


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the openai-clip package (test extra) is required as the reference tokenizer")
    folder = Path(next(iter(spec.submodule_search_locations)))
    module_spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", folder / "simple_tokenizer.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer()


def test_bundled_vocabulary_layout(ours):
    vocab = json.loads((bundled_tokenizer_dir() / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == 320
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.model_max_length) == (BOS, EOS, EOS, 77)


def test_token_ids_match_openai_clip(reference, ours):
    original = reference.SimpleTokenizer()
    strings = HAND_WRITTEN + varied_strings(300, seed=0)
    mismatches = []
    for text in strings:
        # OpenAI's tokenizer first repairs text with ftfy and unescapes HTML; transformers' CLIPTokenizer
        # (and so diffusers) does not, so both are given the repaired text.
        cleaned = reference.basic_clean(text)
        got = ours(cleaned, add_special_tokens=False)["input_ids"]
        if got != original.encode(text):
            mismatches.append(text)
    assert not mismatches, f"{len(mismatches)}/{len(strings)} differ, e.g. {mismatches[:3]!r}"


def test_tokenize_pads_truncates_and_counts_dropped_tokens(reference, ours):
    original = reference.SimpleTokenizer()
    prompts = ["a red circle", "word " * 100, HAND_WRITTEN[13], ""]
    ids, dropped = tokenize(ours, prompts)
    assert ids.dtype == np.int32 and ids.shape == (4, 77)
    for row, count, prompt in zip(ids, dropped, prompts):
        content = original.encode(prompt)
        kept = content[:75]
        expected = [BOS, *kept, EOS] + [EOS] * (75 - len(kept))
        assert row.tolist() == expected
        assert count == max(0, len(content) - 75)
    assert dropped[1] == 25 and dropped[0] == 0


def test_model_tokenizer_folder_with_its_own_pad_token(tmp_path, ours):
    folder = tmp_path / "tokenizer"
    shutil.copytree(bundled_tokenizer_dir(), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = "!"  # how Stable Diffusion 2.x tokenizers pad
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").unlink()
    sd2 = load_tokenizer(folder)
    ids, _ = tokenize(sd2, ["a cat"], max_length=8)
    assert ids.tolist() == [[BOS, 320, 2368, EOS, 0, 0, 0, 0]]


def test_folder_saved_by_transformers_5(tmp_path, ours):
    ours.save_pretrained(tmp_path)  # writes tokenizer.json and tokenizer_config.json only
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    ids, dropped = tokenize(load_tokenizer(tmp_path), ["a cat"], max_length=6)
    assert ids.tolist() == [[BOS, 320, 2368, EOS, EOS, EOS]] and dropped == [0]


def test_errors(tmp_path, ours):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="list of strings"):
        tokenize(ours, "a bare string")
    with pytest.raises(ValueError, match="list of strings"):
        tokenize(ours, [])
