"""Tests for sdjax.infotext: A1111-format PNG infotext, written and read."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save as save_safetensors

from sdjax.infotext import (
    GenerationParameters,
    LoraRecord,
    format_infotext,
    lora_hash,
    model_hash,
    parse_infotext,
    png_info,
    read_png_infotext,
)

# --- an independent reader following A1111's parse_generation_parameters --------------------
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_read(text: str) -> dict[str, str]:
    """What A1111's reader would put in its result dict (before its UI defaults)."""
    res: dict[str, str] = {}
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for key, value in _RE_PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        m = _RE_SIZE.match(value)
        if m:
            res[f"{key}-1"], res[f"{key}-2"] = m.group(1), m.group(2)
        else:
            res[key] = value
    return res


FULL = GenerationParameters(
    prompt='a "red" cat, sitting: on a mat\nsecond line, (detailed:1.2)',
    negative_prompt="ugly, blurry\nlow quality: jpeg",
    steps=20,
    sampler="DPM++ 2M",
    schedule_type="Karras",
    cfg_scale=7.0,
    seed=1234,
    width=512,
    height=768,
    model="v1-5-pruned-emaonly",
    model_hash="6ce0161689",
    loras=(LoraRecord("add_detail", 0.5, "7c6bad76eb54"),
           LoraRecord("my style v2", 1.0, "ba9876543210")),
    denoising_strength=0.45,
    rng="CPU",
    version="v1.10.1",
    extra=(("Hires upscale", "2"), ("TI hashes", "easynegative: c74b4e810b03")),
)


@pytest.mark.parametrize("seed", [0, 1234, 4294967295])
def test_independent_reader_sees_every_field(seed):
    p = GenerationParameters(**{**FULL.__dict__, "seed": seed})
    text = format_infotext(p)
    d = a1111_read(text)
    tags = re.findall(r"<lora:([^:>]+):([^:>]+)>", d["Prompt"])
    assert tags == [("add_detail", "0.5"), ("my style v2", "1")]
    assert re.sub(r"\s*<lora:[^>]+>", "", d["Prompt"]) == p.prompt
    assert d["Negative prompt"] == p.negative_prompt
    assert d["Steps"] == "20"
    assert d["Sampler"] == "DPM++ 2M"
    assert d["Schedule type"] == "Karras"
    assert d["CFG scale"] == "7"  # A1111's UI writes 7, not 7.0
    assert d["Seed"] == str(seed)
    assert (d["Size-1"], d["Size-2"]) == ("512", "768")
    assert d["Model"] == "v1-5-pruned-emaonly"
    assert d["Model hash"] == "6ce0161689"
    assert d["Denoising strength"] == "0.45"
    assert d["RNG"] == "CPU"
    assert d["Lora hashes"] == "add_detail: 7c6bad76eb54, my style v2: ba9876543210"
    assert d["Hires upscale"] == "2"
    assert d["TI hashes"] == "easynegative: c74b4e810b03"
    assert d["Version"] == "v1.10.1"
    last = text.split("\n")[-1]
    assert last.startswith("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, ")
    assert last.endswith(", Version: v1.10.1")
    assert 'Lora hashes: "add_detail: 7c6bad76eb54, my style v2: ba9876543210"' in last


def test_quoting_follows_a1111():
    p = GenerationParameters(prompt="x", steps=1, seed=2, cfg_scale=7.5, extra=(
        ("Plain", "Latent"), ("Comma", "a, b"), ("Colon", "a: b"), ("Quote", 'say "hi"'),
        ("Newline", "a\nb"), ("Empty", ""), ("Unicode", "ねこ, 猫")))
    line = format_infotext(p).split("\n")[-1]
    assert "CFG scale: 7.5" in line and "Plain: Latent," in line
    assert 'Comma: "a, b"' in line and 'Colon: "a: b"' in line
    assert r'Quote: "say \"hi\""' in line and r'Newline: "a\nb"' in line
    assert 'Empty: ""' in line and 'Unicode: "ねこ, 猫"' in line
    d = a1111_read(format_infotext(p))
    assert [d[k] for k, _ in p.extra if k != "Empty"] == [v for k, v in p.extra if k != "Empty"]
    assert parse_infotext(format_infotext(p)) == p


ROUND_TRIP = [
    FULL,
    GenerationParameters(prompt="a cat", steps=30, sampler="Euler a", cfg_scale=7.5, seed=-1 + 2,
                         width=1024, height=1024),
    GenerationParameters(prompt="夜の東京, ネオン — «café» ✨", negative_prompt="",
                         steps=25, sampler="DPM++ 2M Karras", cfg_scale=5.5, seed=99,
                         width=768, height=512, model="sd_xl_base_1.0", version="v1.6.0"),
    GenerationParameters(prompt="", negative_prompt="bad hands", steps=10, seed=7, width=64,
                         height=64, loras=(LoraRecord("only", 0.75),)),
    GenerationParameters(prompt="line one\n\nline three", steps=4, cfg_scale=1.0, seed=3,
                         denoising_strength=1.0, rng="NV",
                         loras=(LoraRecord("x", -0.3, "abcdefabcdef"), LoraRecord("y", 2.0)),
                         extra=(("Clip skip", "2"), ("ENSD", "31337"))),
]


@pytest.mark.parametrize("p", ROUND_TRIP)
def test_round_trip(p):
    assert parse_infotext(format_infotext(p)) == p


REAL_V110 = """masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, outdoors <lora:add_detail:0.5> <lora:epiNoiseoffset_v2>
Negative prompt: (worst quality, low quality:1.4), easynegative, bad-hands-5
Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3046318453, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+, Lora hashes: "add_detail: 7c6bad76eb54, epiNoiseoffset_v2: d1131f7207d6", TI hashes: "easynegative: c74b4e810b03, bad-hands-5: aa7651be154c", Version: v1.10.1"""  # noqa: E501

REAL_OLD = """a photo of an astronaut riding a horse on mars,
highly detailed, 8k
Negative prompt: lowres, bad anatomy
Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 768x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, RNG: CPU, Clip skip: 2, Version: v1.6.0"""  # noqa: E501


def test_real_a1111_v110_text():
    p = parse_infotext(REAL_V110)
    assert p.prompt == ("masterpiece, best quality, 1girl, solo, long hair, looking at viewer, "
                        "smile, outdoors")
    assert p.negative_prompt == "(worst quality, low quality:1.4), easynegative, bad-hands-5"
    assert (p.steps, p.sampler, p.schedule_type) == (25, "DPM++ 2M", "Karras")
    assert (p.cfg_scale, p.seed, p.width, p.height) == (7.0, 3046318453, 512, 768)
    assert (p.model_hash, p.model) == ("6ce0161689", "v1-5-pruned-emaonly")
    assert p.denoising_strength == 0.45
    assert p.loras == (LoraRecord("add_detail", 0.5, "7c6bad76eb54"),
                       LoraRecord("epiNoiseoffset_v2", 1.0, "d1131f7207d6"))
    assert p.rng is None and p.version == "v1.10.1"
    assert p.extra == (("Hires upscale", "2"), ("Hires steps", "15"),
                       ("Hires upscaler", "R-ESRGAN 4x+"),
                       ("TI hashes", "easynegative: c74b4e810b03, bad-hands-5: aa7651be154c"))
    assert parse_infotext(format_infotext(p)) == p


def test_real_a1111_old_style_sampler():
    p = parse_infotext(REAL_OLD)
    assert p.prompt == "a photo of an astronaut riding a horse on mars,\nhighly detailed, 8k"
    assert p.negative_prompt == "lowres, bad anatomy"
    assert p.sampler == "DPM++ 2M Karras" and p.schedule_type is None
    assert (p.steps, p.cfg_scale, p.seed, p.width, p.height) == (30, 7.5, 42, 768, 512)
    assert p.rng == "CPU" and p.version == "v1.6.0" and p.loras == ()
    assert p.extra == (("Clip skip", "2"),)


def test_tags_inside_a1111_prompt_and_unmatched_hashes():
    text = ("best quality, <lora:detail:0.8>, 1girl <lora:other:0.6:0.2>\n"
            'Steps: 20, Seed: 1, Size: 512x512, '
            'Lora hashes: "detail: aaaaaaaaaaaa, other: bbbbbbbbbbbb", '
            r'Wildcard prompt: "a \"b\", c"')
    p = parse_infotext(text)
    # Tags are removed like A1111's extra-network parser removes them; multi-part tags stay.
    assert p.prompt == "best quality, , 1girl <lora:other:0.6:0.2>"
    assert p.loras == (LoraRecord("detail", 0.8),)
    assert ("Lora hashes", "detail: aaaaaaaaaaaa, other: bbbbbbbbbbbb") in p.extra
    assert ("Wildcard prompt", 'a "b", c') in p.extra


@pytest.mark.parametrize("text", [
    "", "a cat", "a cat\nSteps: 20, Seed: 3", "a cat, with: hat\nNegative prompt: x",
])
def test_no_parameters_line(text):
    with pytest.raises(ValueError):
        parse_infotext(text)


def test_bad_typed_value():
    with pytest.raises(ValueError, match="Steps"):
        parse_infotext("x\nSteps: many, Seed: 1, Size: 8x8")
    with pytest.raises(ValueError, match="Size"):
        parse_infotext("x\nSteps: 2, Seed: 1, Size: big")


@pytest.mark.parametrize("p", [
    GenerationParameters(prompt="a", steps=20, seed=1),                        # < 3 pairs
    GenerationParameters(prompt="a <lora:x:1>", steps=1, seed=1, cfg_scale=2),   # tag in prompt
    GenerationParameters(prompt="a\nNegative prompt: b", steps=1, seed=1, cfg_scale=2),
    GenerationParameters(prompt="a", steps=1, seed=1, width=8),                 # no height
    GenerationParameters(prompt="a", steps=1, seed=1, cfg_scale=2, extra=(("Seed", "3"),)),
    GenerationParameters(prompt="a", steps=1, seed=1, cfg_scale=2, extra=(("bad:key", "3"),)),
    GenerationParameters(prompt="a", steps=1, seed=1, cfg_scale=float("nan")),
    GenerationParameters(prompt="a", steps=1.5, seed=1, cfg_scale=2),  # type: ignore[arg-type]
    GenerationParameters(prompt="a", steps=1, seed=1, loras=(LoraRecord("a:b", 1.0),)),
])
def test_format_rejects_unreadable(p):
    with pytest.raises(ValueError):
        format_infotext(p)


# --- PNG chunk --------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [FULL, ROUND_TRIP[2]])  # latin-1 -> tEXt, other unicode -> iTXt
def test_png_round_trip(tmp_path, p):
    path = tmp_path / "img.png"
    text = format_infotext(p)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, pnginfo=png_info(text))
    assert read_png_infotext(path) == text
    assert read_png_infotext(str(path)) == text
    assert parse_infotext(read_png_infotext(path)) == p


def test_png_errors(tmp_path):
    bare = tmp_path / "bare.png"
    Image.new("RGB", (4, 4)).save(bare)
    with pytest.raises(ValueError, match="bare.png"):
        read_png_infotext(bare)
    notpng = tmp_path / "notes.png"
    notpng.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        read_png_infotext(notpng)
    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (4, 4)).save(jpeg)
    with pytest.raises(ValueError, match="photo.jpg"):
        read_png_infotext(jpeg)
    with pytest.raises(FileNotFoundError):
        read_png_infotext(tmp_path / "missing.png")


# --- hashes -----------------------------------------------------------------------------------
def test_model_hash(tmp_path):
    data = np.random.default_rng(0).bytes(2 * (1 << 20) + 12345)  # crosses the 1 MiB chunks
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    assert len(model_hash(str(path))) == 10


def test_lora_hash(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"lora_up.weight": rng.standard_normal((64, 4), dtype=np.float32),
               "lora_down.weight": rng.standard_normal((4, 64), dtype=np.float32)}
    data = save_safetensors(tensors, metadata={"ss_network_dim": "4"})
    n = int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[8 + n:]).hexdigest()[:12]
    path = tmp_path / "style.safetensors"
    path.write_bytes(data)
    assert lora_hash(path) == expected
    # The "addnet" hash skips the header, so editing metadata keeps it.
    other = tmp_path / "style2.SAFETENSORS"
    other.write_bytes(save_safetensors(tensors, metadata={"ss_network_dim": "4", "note": "x" * 99}))
    assert lora_hash(other) == expected
    # kohya-ss's precomputed hash in the metadata wins, as in A1111's NetworkOnDisk.
    pre = tmp_path / "pre.safetensors"
    pre.write_bytes(save_safetensors(tensors, metadata={"sshs_model_hash": "f" * 64}))
    assert lora_hash(pre) == "f" * 12
    # Other formats: sha256 of the whole file.
    pt = tmp_path / "old.pt"
    pt.write_bytes(data)
    assert lora_hash(pt) == hashlib.sha256(data).hexdigest()[:12]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError):
        lora_hash(bad)
