"""Prompt weighting, BREAK, long prompts and clip skip (#20) against an independent reference of A1111's rules,
and compel's syntax and weighting against compel itself.

The reference below is written from AUTOMATIC1111's source (modules/prompt_parser.py ``parse_prompt_attention``,
modules/sd_hijack_clip.py ``tokenize_line``): a regex token stream over the prompt where "(" / "[" open ranges that
their closing bracket multiplies by 1.1 / (1/1.1), ":w)" multiplies the innermost open round range by w, escapes
are literal and a lone backslash is dropped, every BREAK in a text run is an item ("BREAK", -1) that brackets
weight like text, items of equal weight merge, and only an item ("BREAK", -1) ends a chunk; the encoder output is
weighted per token then rescaled to the chunk's original mean. It is encoded with the PyTorch transformers
CLIPTextModel of the tiny test pipeline.
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
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _number(text):
    try:
        return float(text)
    except ValueError:  # A1111 stops with this error; sdjax reads the weight as text
        return None


def reference_parse(text):
    """[[text, weight]] as A1111 parses a prompt: a BREAK is ["BREAK", -1], weighted by its brackets like any text,
    and runs of equal weight merged (BREAKs included)."""
    out, round_open, square_open = [], [], []

    def times(start, factor):
        for item in out[start:]:
            item[1] *= factor

    for m in _TOKENS.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            out.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(out))
        elif tok == "[":
            square_open.append(len(out))
        elif weight is not None and round_open and _number(weight) is not None:
            times(round_open.pop(), _number(weight))
        elif tok == ")" and round_open:
            times(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            times(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK_WORD.split(tok)):
                if i:
                    out.append(["BREAK", -1])
                out.append([part, 1.0])
    for start in round_open:
        times(start, 1.1)
    for start in square_open:
        times(start, 1 / 1.1)
    merged = []
    for item in out or [["", 1.0]]:
        if merged and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(list(item))
    return merged


def _is_break(text, weight):
    return text == "BREAK" and weight == -1


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
        if _is_break(text, weight):
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
    "(a cat BREAK a dog)",
    "[a cat BREAK a dog], outside BREAK (inside BREAK:1.3)",
    "((two BREAK levels)) BREAK [[down BREAK here]]",
    "(weight one BREAK still breaks:1) after",
    "(negated BREAK:-1) and (zeroed BREAK out:0)",
    "(BRE:-1)(AK:-1) joined",
    "unclosed (bracket BREAK to the end",
    "lone \\ backslash\\q and \\\\ escaped",
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
          "hill", "sky", "at night", "8k", "BREAK", "\\", ":-1)", ":1)"]


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


def test_parser_matches_the_reference():
    assert len(PROMPTS) >= 50
    for text in PROMPTS:
        expected = [(t, w) for t, w in reference_parse(text)]
        parsed = prompt.parse_a1111(text)
        assert [(f.text, f.weight) for f in parsed] == expected, text
        assert [f.is_break for f in parsed] == [_is_break(t, w) for t, w in expected], text


def test_break_inside_brackets_is_weighted_text(sd):
    """A1111: a BREAK inside brackets takes the bracket's weight, and only weight -1 breaks the chunk."""
    def pairs(text):
        return [(f.text, round(f.weight, 6), f.is_break) for f in prompt.parse_a1111(text)]

    assert pairs("a cat BREAK a dog") == [("a cat", 1.0, False), ("BREAK", -1.0, True), ("a dog", 1.0, False)]
    assert pairs("(a cat BREAK a dog)") == [("a cat", 1.1, False), ("BREAK", -1.1, False), ("a dog", 1.1, False)]
    assert pairs("[x BREAK y]") == [("x", 0.909091, False), ("BREAK", -0.909091, False), ("y", 0.909091, False)]
    assert pairs("(x BREAK y:1)")[1] == ("BREAK", -1.0, True)  # still -1: still a break
    assert pairs("(BRE:-1)(AK:-1)") == [("BREAK", -1.0, True)]
    assert pairs("(x BREAK y:0)") == [("xBREAKy", 0.0, False)]  # -0.0 == 0.0: merged into one word
    assert pairs("lone \\ backslash\\q") == [("lone  backslashq", 1.0, False)]
    cond, _ = sd.tokenize_prompts(["(a cat BREAK a dog)", "a cat BREAK a dog"], ["", ""])
    assert cond.chunks == (1, 2)


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
    with pytest.raises(ValueError, match=r"\.swap\(\) \(cross-attention control\) is not supported"):
        sd.text_to_image("a cat.swap(dog)", steps=1, prompt_syntax="compel")
    with pytest.raises(ValueError, match=r"withLora\(\) is not supported"):
        prompt.parse_compel("a cat withLora(style, 0.8)")
    with pytest.raises(ValueError, match=r"\.blend\(\) of 2 prompts got 3 weights"):
        prompt.parse_compel('("a cat", "a dog").blend(1, 2, 3)')
    with pytest.raises(ValueError, match="combines several prompts; parse_compel gives its parts"):
        prompt.parse('("a cat", "a dog").and()', "compel")


# --- compel ---------------------------------------------------------------------------------------------------

COMPEL_PROMPTS = [
    # up-weighting
    "a cat++ on a hill", "a (red cat)1.3 on a hill", "(a (small)+ dog)++ running", "plain words only",
    "a cat+ and a dog+++", "(sky)1.5, (sea)1.1",
    # down-weighting: compel's masked re-encodings
    "a cat-- on a hill", "a (red cat)0.5 on a hill", "a (red cat)0.5 on a (green hill)1.3",
    "a cat- and a dog-- on a hill", "a cat- dog- on a hill", "(a (small)-- dog)0.8 running",
    "(a (big)++ dog)0.7 running", '"a red"0.7 ball, sky.attend(0.6)', "(nothing)0 but a cat", "a cat-, a dog+",
    # what compel reads as plain text
    "a (cat", "x (a=b) y", "a \\(literal\\) bracket-",
]
COMPEL_COMBINED = [
    '("a cat", "a dog").blend(0.3, 0.7)', '("a red cat-", "a dog++").blend(1, 2)',
    '("a cat", "a dog").blend(1, 1, no_normalize)', '("a cat", "a (dog)0.5 on a hill").blend()',
    '("a cat", "a dog").and()', '("a cat--", "a dog").and(1, 0.5)', '("a cat", "a (dog)0.6", "sky").and(0.8, 1, 1.2)',
]


def _compel_parts(conjunction):
    """compel's parse as (prompts, blend weights, normalize, weight) per part, like sdjax's ``Part``."""
    out = []
    for item, weight in zip(conjunction.prompts, conjunction.weights):
        if type(item).__name__ == "Blend":
            prompts = tuple(tuple((f.text, f.weight) for f in p.children) for p in item.prompts)
            out.append((prompts, tuple(item.weights), item.normalize_weights, weight))
        else:
            out.append(((tuple((f.text, f.weight) for f in item.children),), (1.0,), True, weight))
    return out


COMPEL_PIECES = ["cat", "dog", "a", " ", " ", "(", ")", "+", "-", "++", "--", "1.3", "0.5", ",", ".", '"', "\\(", "\\)",
                 '\\"', "=", "x-y", ".attend(", "0.8)", "\t", "\\,", "\\", "-0.5", ".5", "a.b", ".blend(", ".and("]


def test_compel_parser_matches_compels():
    compel = pytest.importorskip("compel")
    parser = compel.prompt_parser.PromptParser()
    rng = random.Random(0)
    generated_ = ["".join(rng.choice(COMPEL_PIECES) for _ in range(rng.randint(1, 14))) for _ in range(300)]
    for text in COMPEL_PROMPTS + COMPEL_COMBINED + generated_:
        try:
            expected = _compel_parts(parser.parse_conjunction(text))
        except Exception:  # compel cannot read it: neither can sdjax
            with pytest.raises(ValueError):
                prompt.parse_compel(text)
            continue
        got = [(p.prompts, p.blend, p.normalize, p.weight) for p in prompt.parse_compel(text)]
        assert got == (expected or [(((("", 1.0),),), (1.0,), True, 1.0)]), text  # compel fails on "()"


def _ours_compel(sd, texts, negatives=None):
    cond, uncond = sd.tokenize_prompts(texts, negatives or [""] * len(texts), "compel")
    empty = prompt.prompt_chunks(sd.tokenizer, [prompt.Fragment("")])[0][0]
    empty = np.tile(np.asarray(empty, np.int32), (len(texts), 1))
    return cond, np.asarray(_encode(sd.models, sd.params, cond.ids, cond.weights, "compel", empty, cond.variants))


def _check_against_compel(sd, c, texts, worst, **compare):
    cond, ours_ = _ours_compel(sd, texts)
    for row, text in enumerate(texts):
        with torch.no_grad():
            expected = c([text]).numpy()[0]
        assert cond.chunks[row] == len(expected) // 77, text
        err = rel_err(ours_[row, :len(expected)], expected)
        worst[text] = err
        assert err <= 1e-5, (text, err)


def test_text_encoder_attention_mask_is_transformers(sd, text_model):
    """compel masks down-weighted tokens out of the encoder's attention (transformers' attention_mask)."""
    ids = np.asarray([prompt.prompt_chunks(sd.tokenizer, [prompt.Fragment("a red cat on a hill")])[0][0]] * 2)
    mask = np.ones_like(ids)
    mask[0, 2:4] = 0
    mask[1, 5:40] = 0
    got = sd.text_encoder.apply({"params": sd.params["text_encoder"]}, jnp.asarray(ids), attention_mask=mask)
    with torch.no_grad():
        expected = text_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    assert rel_err(np.asarray(got), expected) <= 1e-5
    plain = sd.text_encoder.apply({"params": sd.params["text_encoder"]}, jnp.asarray(ids))
    assert rel_err(np.asarray(plain), expected) > 1e-3


def test_compel_syntax_and_weighting_match_compel(sd, text_model):
    compel = pytest.importorskip("compel")
    c = compel.Compel(tokenizer=sd.tokenizer, text_encoder=text_model)
    for text in COMPEL_PROMPTS:  # tokens and weights as compel's
        cond, _ = sd.tokenize_prompts([text], [""], "compel")
        fragments = prompt.parse(text, "compel")
        ids, weights = c.conditioning_provider.get_token_ids_and_expand_weights(
            [f.text for f in fragments], [f.weight for f in fragments], device="cpu")[:2]
        assert cond.ids[0].tolist() == ids.tolist() and np.allclose(cond.weights[0], weights.numpy()), text
    worst = {}
    _check_against_compel(sd, c, COMPEL_PROMPTS + COMPEL_COMBINED, worst)
    print(f"compel: {len(worst)} prompts, worst relative error {max(worst.values()):.1e}")


def test_compel_long_prompts_match_compel_without_truncation(sd, text_model):
    """sdjax chunks long prompts (A1111's rule); compel's truncate_long_prompts=False chunks at phrase or word
    ends: where both cut at the same places, the conditioning is compel's, down-weighted spans across a chunk
    boundary included."""
    compel = pytest.importorskip("compel")
    c = compel.Compel(tokenizer=sd.tokenizer, text_encoder=text_model, truncate_long_prompts=False)
    texts = [_words(100), _words(60) + " (" + _words(30, "cat") + ")0.7 " + _words(20),
             "(" + _words(70) + ")0.8 " + _words(30, "dog") + "++", _words(70) + ", (" + _words(30, "cat") + ")0.5",
             _words(140) + " cat-- " + _words(20)]
    worst = {}
    _check_against_compel(sd, c, texts, worst)
    print(f"compel, long prompts: worst relative error {max(worst.values()):.1e}")


def test_compel_plain_and_mixed_batches(sd):
    """Prompts without down-weights need no variants (the encoding of before); a batch mixing both gives
    each prompt what it gives alone, and the negative prompts get the same variant count."""
    cond, uncond = sd.tokenize_prompts(["a cat++", "a dog"], ["", "blurry"], "compel")
    assert cond.variants is None and uncond.variants is None
    cond, uncond = sd.tokenize_prompts(["a cat--", "a dog"], ["", "blurry"], "compel")
    assert cond.variants.ids.shape == uncond.variants.ids.shape == (2, 4, 77)
    assert cond.variants.mix[1].tolist() == [[1.0]] + [[0.0]] * 4
    _, both = _ours_compel(sd, ["a cat-- on a hill", "a dog"])  # (XLA's rounding may differ with the batch size)
    _, alone = _ours_compel(sd, ["a dog"])
    assert rel_err(both[1], alone[0]) <= 1e-6
    _, alone = _ours_compel(sd, ["a cat-- on a hill"])
    assert rel_err(both[0], alone[0]) <= 1e-6


def test_compel_variants_do_not_recompile(sd):
    run = dict(steps=2, scheduler="ddim", output="latent", prompt_syntax="compel")
    sd.text_to_image(["a cat-- on a hill", "a dog"], **run)
    count = sd.executor.compile_count()
    sd.text_to_image(["a cat- dog-- (sky)0.5 on a (hill)0.9", "(a dog)0.7"], ["blurry-", ""], **run)
    sd.text_to_image(['("a cat", "a dog").blend(0.3, 0.7)', "a dog-"], **run)
    assert sd.executor.compile_count() == count
