"""Prompt weighting, BREAK, long prompts and clip skip (#20) against an independent reference of A1111's rules.

The reference below is written from AUTOMATIC1111's documented behaviour (wiki "Features: Attention/emphasis",
"BREAK", "Infinite prompt length"): a regex token stream over the prompt where "(" / "[" open ranges that
their closing bracket multiplies by 1.1 / (1/1.1), ":w)" multiplies the innermost open round range by w,
escapes are literal, and the encoder output is weighted per token then rescaled to the chunk's original mean.
It is encoded with the PyTorch transformers CLIPTextModel of the tiny test pipeline.
"""

import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from reference import rel_err
from sdjax import generate, prompt
from sdjax.pipeline import StableDiffusion

# --- the independent reference ---------------------------------------------------------------------------------

_TOKENS = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def reference_parse(text):
    """[(text, weight)] with ("BREAK", None) for BREAK (outside brackets), merged by equal weight."""
    out, round_open, square_open = [], [], []

    def times(start, factor):
        for item in out[start:]:
            if item[1] is not None:
                item[1] *= factor

    for m in _TOKENS.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if len(tok) == 2 and tok[0] == "\\":
            out.append([tok[1], 1.0])
        elif tok == "(":
            round_open.append(len(out))
        elif tok == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            times(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            times(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            times(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK_WORD.split(tok)):
                if i:
                    out.append(["BREAK", None])
                out.append([part, 1.0])
    for start in round_open:
        times(start, 1.1)
    for start in square_open:
        times(start, 1 / 1.1)
    merged = []
    for item in out or [["", 1.0]]:
        if merged and item[1] is not None and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(list(item))
    return merged


def reference_chunks(tokenizer, parsed, embeddings=None):
    """A1111's chunking: 75 tokens a chunk; a full chunk moves what follows a comma within its last 20
    tokens to the next; BREAK ends a chunk; an embedding (name ids -> its ids) never straddles two."""
    embeddings = embeddings or {}
    comma = tokenizer.get_vocab()[",</w>"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    done, cur, last_comma = [], [], -1

    def flush():
        nonlocal cur, last_comma
        cur = cur + [(eos, 1.0)] * (75 - len(cur))
        done.append([(bos, 1.0)] + cur + [(eos, 1.0)])
        cur, last_comma = [], -1

    for text, weight in parsed:
        if weight is None:
            flush()
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        i = 0
        while i < len(ids):
            if ids[i] == comma:
                last_comma = len(cur)
            elif len(cur) == 75 and last_comma >= 0 and 75 - last_comma <= 20:
                rest = cur[last_comma + 1:]
                cur = cur[:last_comma + 1]
                flush()
                cur = rest
            group, step = [ids[i]], 1
            for name_ids, vector_ids in embeddings.items():
                if tuple(ids[i:i + len(name_ids)]) == name_ids:
                    group, step = list(vector_ids), len(name_ids)
            if len(cur) + len(group) > 75:
                flush()
            cur += [(t, weight) for t in group]
            i += step
    if cur or not done:
        flush()
    return done


def _final_norm(model):
    """transformers 5 flattened CLIPTextModel (no ``text_model`` wrapper); 4.x has one."""
    return getattr(model, "text_model", model).final_layer_norm


def reference_conditioning(text_model, chunks, bucket, clip_skip=1):
    """Each chunk through the torch encoder, weighted, mean restored; padded with empty chunks to ``bucket``."""
    empty = [(49406, 1.0)] + [(49407, 1.0)] * 76
    chunks = chunks + [empty] * (bucket - len(chunks))
    ids = torch.tensor([[t for t, _ in c] for c in chunks])
    w = torch.tensor([[x for _, x in c] for c in chunks], dtype=torch.float64)
    with torch.no_grad():
        out = text_model(ids, output_hidden_states=True)
        z = out.last_hidden_state if clip_skip == 1 else _final_norm(text_model)(
            out.hidden_states[-clip_skip])
    z = z.double()
    zs = []
    for k in range(len(chunks)):
        before = z[k].mean()
        weighted = z[k] * w[k][:, None]
        zs.append(weighted * (before / weighted.mean()))
    return torch.cat(zs).numpy()


# --- prompts -------------------------------------------------------------------------------------------------

HAND_WRITTEN = [
    "a red circle on a blue background",
    "a (red) circle",
    "a ((red)) circle",
    "a (((red))) circle, [[blue]] background",
    "a [red] circle",
    "(red:1.3) circle",
    "(red:0.5) circle and (blue:1.75) square",
    "((red:1.3) circle:1.2), background",
    "(a [nested (deeply:1.4) thing] here)",
    "[a (mixed] brackets)",
    "\\(not weighted\\) and \\[not either\\]",
    "a backslash \\\\ (and a weight)",
    "lone \\ backslash and : colon",
    "unmatched ) and ] closers",
    "(unclosed round and [unclosed square",
    "time 10:30 and ratio 16:9",
    "a (weight: 1.2) with spaces",
    "(neg weight:-0.5) token",
    "(zero:0) token",
    "a cat BREAK a dog",
    "BREAK at the start",
    "at the end BREAK",
    "two BREAK BREAK breaks",
    "lowercase break is text, BREAKfast is text",
    "(red:1.2) BREAK [blue] BREAK (green)",
    "",
    "   ",
    "masterpiece, best quality, (ultra detailed:1.2), [lowres], 8k",
    "a:1.2) not a weight",
    "((((((very strong))))))",
    "[[[[[[very weak]]]]]]",
    "(a:1.1)(b:1.1)(c:1.2)",
    "emoji (🐱:1.3) and 日本 [語]",
]


def _words(n, word="word"):
    return " ".join([word] * n)


LONG = [
    _words(74), _words(75), _words(76), _words(77), _words(78), _words(150), _words(151), _words(300),
    ", ".join(["red cat"] * 30),  # commas near every chunk boundary
    _words(60) + ", " + _words(30),  # a comma 15 tokens before the boundary: backtrack
    _words(40) + ", " + _words(60),  # a comma too far back: no backtrack
    _words(74) + ", " + _words(10),  # a comma at the boundary itself
    "(" + _words(80) + ":1.3), " + _words(20),
    _words(50) + " BREAK " + _words(100),
    "[" + ", ".join(["blue square"] * 40) + "]",
]

PIECES = ["cat", "dog", "red", "blue", ",", "(", ")", "[", "]", ":1.4)", ":0.7)", "\\(", "\\)", " BREAK ",
          "hill", "sky", "at night", "8k"]


def generated(count, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) + rng.choice([" ", ""]) for _ in range(rng.choice([3, 10, 40, 90])))
            for _ in range(count)]


PROMPTS = HAND_WRITTEN + LONG + generated(20)


# The tiny random encoder's outputs average ~5e-4 over a chunk (|z| ~ 0.8), which makes A1111's mean ratio
# ill-conditioned (fp32 rounding of z amplified ~1000x); both encoders get the same final-norm bias shift so
# the chunk means are of the size real CLIP's are and the comparison measures the rules, not the conditioning.
BIAS_SHIFT = 0.25


@pytest.fixture(scope="module")
def sd(tiny_pipeline_dir):
    model = StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype=jnp.float32)
    encoder = model.params["text_encoder"]
    norm = {**encoder["final_layer_norm"], "bias": encoder["final_layer_norm"]["bias"] + BIAS_SHIFT}
    model.params = {**model.params, "text_encoder": {**encoder, "final_layer_norm": norm}}
    return model


@pytest.fixture(scope="module")
def text_model(tiny_pipeline_dir):
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(tiny_pipeline_dir / "text_encoder").eval()
    with torch.no_grad():
        _final_norm(model).bias += BIAS_SHIFT
    return model


_encode = jax.jit(generate.encode_prompts, static_argnums=(0, 4))


def ours(sd, prompts, syntax="a1111", clip_skip=None):
    cond, _ = sd.tokenize_prompts(prompts, [""] * len(prompts), syntax)
    models = sd.models_for(clip_skip)
    return cond, np.asarray(_encode(models, sd.params, cond.ids, cond.weights, "a1111"))


def _fragments(parsed):
    return [("BREAK", None) if f.is_break else (f.text, f.weight) for f in parsed]


def test_parser_matches_the_reference():
    assert len(PROMPTS) >= 50
    for text in PROMPTS:
        expected = [(t, w) for t, w in reference_parse(text)]
        assert _fragments(prompt.parse_a1111(text)) == expected, text


def test_conditioning_matches_the_reference(sd, text_model):
    cond, context = ours(sd, PROMPTS)
    bucket = cond.ids.shape[1] // 77
    assert bucket in (4, 8) and context.shape == (len(PROMPTS), bucket * 77, 32)
    worst = 0.0
    for row, text in enumerate(PROMPTS):
        chunks = reference_chunks(sd.tokenizer, reference_parse(text))
        assert cond.chunks[row] == len(chunks), text
        ids = np.concatenate([[t for t, _ in c] for c in chunks])
        assert cond.ids[row, :len(ids)].tolist() == ids.tolist(), text
        expected = reference_conditioning(text_model, chunks, bucket)
        err = rel_err(context[row], expected)
        worst = max(worst, err)
        assert err <= 1e-5, (text, err)
    print(f"{len(PROMPTS)} prompts, worst relative error {worst:.1e}")


def test_chunk_counts_at_the_boundaries(sd):
    counts = {n: sd.tokenize_prompts([_words(n)], [""])[0].chunks[0] for n in (74, 75, 76, 150, 151, 300, 301)}
    assert counts == {74: 1, 75: 1, 76: 2, 150: 2, 151: 3, 300: 4, 301: 5}
    assert prompt.chunk_bucket(5) == 8 and [prompt.chunk_bucket(k) for k in (1, 2, 3, 4)] == [1, 2, 3, 4]


def test_plain_prompts_are_unchanged_bit_for_bit(sd):
    prompts = ["a red circle on a blue background", "a green square", "", "hello, world! 3.14"]
    cond, context = ours(sd, prompts)
    ids = sd.tokenize(prompts)
    assert np.array_equal(cond.ids, ids) and np.all(cond.weights == 1)
    before = jax.jit(lambda p, i: sd.text_encoder.apply({"params": p}, i, skip_layers=0))(sd.params["text_encoder"], ids)
    assert np.array_equal(context, np.asarray(before))
    for syntax in ("plain", "compel"):
        assert np.array_equal(ours(sd, prompts, syntax)[1], context)


def test_negative_prompt_is_padded_to_the_prompts_chunks(sd):
    cond, uncond = sd.tokenize_prompts([_words(100)], ["blurry"])
    assert cond.ids.shape == uncond.ids.shape == (1, 154)
    assert uncond.ids[0, 77:].tolist() == [49406] + [49407] * 76
    cond, uncond = sd.tokenize_prompts(["a cat"], [_words(200)])
    assert cond.ids.shape == uncond.ids.shape == (1, 231)


def test_prompt_lengths_within_a_bucket_do_not_recompile(sd):
    run = dict(steps=2, scheduler="ddim", output="latent")
    sd.text_to_image(["(a cat:1.3), " + _words(120), _words(76)], **run)  # two chunks
    count = sd.executor.compile_count()
    sd.text_to_image(["[x] " + _words(140), "BREAK y"], ["neg", _words(90)], **run)
    sd.text_to_image(["short", "(short:1.2)"], ["a " + _words(100), ""], **run)
    assert sd.executor.compile_count() == count
    sd.text_to_image(["short", "x"], **run)  # one chunk: its own program
    assert sd.executor.compile_count() == count + 1


def test_weighted_long_prompt_runs_end_to_end(sd):
    latents = sd.text_to_image("a (red:1.4) circle, " + _words(100) + " BREAK [blue] square", "blurry", steps=2,
                               scheduler="ddim", output="latent")
    assert np.all(np.isfinite(np.asarray(latents)))


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_is_a1111s(sd, text_model, clip_skip):
    text = "a (red:1.2) circle"
    cond, context = ours(sd, [text], clip_skip=clip_skip)
    expected = reference_conditioning(text_model, reference_chunks(sd.tokenizer, reference_parse(text)), 1, clip_skip)
    assert rel_err(context[0], expected) <= 1e-5


def test_clip_skip_in_the_api(sd):
    run = dict(steps=2, scheduler="ddim", output="latent", seed=3)
    one, two = sd.text_to_image("a cat", **run, clip_skip=1), sd.text_to_image("a cat", **run, clip_skip=2)
    assert np.array_equal(np.asarray(one), np.asarray(sd.text_to_image("a cat", **run)))
    assert not np.array_equal(np.asarray(one), np.asarray(two))
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match=r"clip_skip must be an integer in \[1, 3\]"):
            sd.text_to_image("a cat", **run, clip_skip=bad)


def test_errors(sd):
    with pytest.raises(ValueError, match="prompt_syntax='sd' is not known; accepted: 'a1111', 'compel', 'plain'"):
        sd.text_to_image("a cat", steps=1, prompt_syntax="sd")
    with pytest.raises(ValueError, match=r"unclosed '\('"):
        prompt.parse_compel("a (cat")


# --- compel ---------------------------------------------------------------------------------------------------

COMPEL_PROMPTS = ["a cat++ on a hill", "a (red cat)1.3 on a hill", "(a (small)+ dog)++ running",
                  "plain words only", "a cat+ and a dog+++", "(sky)1.5, (sea)1.1"]


def test_compel_syntax_and_upweighting_match_compel(sd, text_model):
    compel = pytest.importorskip("compel")
    c = compel.Compel(tokenizer=sd.tokenizer, text_encoder=text_model)
    for text in COMPEL_PROMPTS:
        with torch.no_grad():
            expected = c([text]).numpy()[0]
        cond, _ = sd.tokenize_prompts([text], [""], "compel")
        ids, weights = c.conditioning_provider.get_token_ids_and_expand_weights(
            *_compel_fragments(compel, text), device="cpu")[:2]
        assert cond.ids[0].tolist() == ids.tolist() and np.allclose(cond.weights[0], weights.numpy()), text
        empty = prompt.prompt_chunks(sd.tokenizer, [prompt.Fragment("")])[0][0]
        got = _encode(sd.models, sd.params, cond.ids, cond.weights, "compel", np.asarray([empty], np.int32))
        err = rel_err(np.asarray(got)[0], expected)
        assert err <= 1e-5, (text, err)


def _compel_fragments(compel, text):
    conjunction = compel.prompt_parser.PromptParser().parse_conjunction(text)
    fragments = conjunction.prompts[0].children
    return [f.text for f in fragments], [f.weight for f in fragments]
