"""The CLI's PNG infotext, read by an independent parser written from A1111's format (modules/infotext_utils.py:
parse_generation_parameters), and --from-png regenerating an image byte for byte."""

import hashlib
import json
import re

import jax
import numpy as np
import pytest
from PIL import Image

import sdjax
from sdjax import cli, lora

# A1111's parameter pattern and its unquote: a value is JSON-quoted when it holds a comma, colon or newline.
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_parse(text: str) -> dict:
    *lines, last = text.strip().split("\n")
    prompt, negative, done_prompt = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_prompt, line = True, line[16:].strip()
        if done_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    fields = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in A1111_PARAM.findall(last):
        if len(value) > 1 and value[0] == '"' and value[-1] == '"':
            value = json.loads(value)
        fields[key] = value
    return fields


@pytest.fixture(scope="module")
def single_file_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    sd = sdjax.StableDiffusion.default()
    path = folder / "shapes-model.safetensors"
    sd.save_single_file(path)
    adapter = lora.init_lora(sd.params, {"unet": lora.DEFAULT_TARGETS}, rank=2, alpha=None, key=jax.random.PRNGKey(0))
    adapter = jax.tree.map(lambda x: x + 0.01 if x.ndim else x, adapter)  # not a no-op
    lora_file = lora.save_lora(folder / "style, v2.safetensors", adapter, format="kohya")
    return path, lora_file


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured


def test_every_field_reads_back_with_a1111s_rules(single_file_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDJAX_CACHE_DIR", str(tmp_path / "cache"))
    model, lora_file = single_file_model
    prompt = 'a red circle, on a "blue": background'
    _run(["generate", prompt, "--negative", "blurry, ugly: bad", "--model", model, "--steps", 3, "--size", "64x48",
          "--seed", 41, "-n", 2, "--scheduler", "DPM++ 2M", "--schedule-type", "Exponential", "--guidance", 6.5,
          "--noise", "torch-cuda", "--lora", lora_file, "--lora-scale", 0.7, "--no-progress", "--out",
          tmp_path / "out"], capsys)
    paths = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in paths] == ["00000-41.png", "00001-42.png"]
    file_hash = hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    for path, seed in zip(paths, (41, 42)):
        fields = a1111_parse(Image.open(path).text["parameters"])
        assert fields["Prompt"] == prompt + " <lora:style, v2:0.7>"
        assert fields["Negative prompt"] == "blurry, ugly: bad"
        assert (fields["Steps"], fields["Sampler"], fields["Schedule type"], fields["CFG scale"]) == \
            ("3", "DPM++ 2M", "Exponential", "6.5")
        assert (fields["Seed"], fields["Size"], fields["Model"], fields["Model hash"]) == \
            (str(seed), "64x48", "shapes-model", file_hash)
        assert fields["RNG"] == "NV" and fields["Version"] == f"sdjax {sdjax.__version__}"
        assert fields["Lora hashes"] == f"style v2: {sdjax.infotext.lora_hash(lora_file)}"


def test_from_png_regenerates_byte_identically(single_file_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDJAX_CACHE_DIR", str(tmp_path / "cache"))
    model, lora_file = single_file_model
    common = ["--model", model, "--lora", lora_file, "--no-progress"]
    _run(["generate", "a blue square", *common, "--lora-scale", 0.5, "--steps", 4, "--size", "64x64", "--seed", 5,
          "-n", 2, "--scheduler", "euler_a", "--noise", "torch-cpu", "--out", tmp_path / "a"], capsys)
    second = tmp_path / "a" / "00001-6.png"
    _run(["generate", "--from-png", second, *common, "--out", tmp_path / "b"], capsys)
    (again,) = (tmp_path / "b").glob("*.png")
    assert again.name == "00000-6.png" and again.read_bytes() == second.read_bytes()
    # without the LoRA the image cannot be regenerated: a one-line error, exit 2
    code = cli.main(["generate", "--from-png", str(second), "--model", str(model), "--out", str(tmp_path / "c")])
    assert code == 2 and "LoRA(s) ['style, v2'] which are not loaded" in capsys.readouterr().err


def test_a1111_infotext_png_regenerates(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDJAX_CACHE_DIR", str(tmp_path / "cache"))
    text = ("a green circle\nNegative prompt: red\nSteps: 3, Sampler: Euler a, Schedule type: Karras, CFG scale: 2, "
            "Seed: 77, Size: 64x64, Model hash: 0123456789, Model: v1-5, RNG: CPU, Version: v1.10.1")
    png = tmp_path / "from_a1111.png"
    Image.new("RGB", (8, 8)).save(png, pnginfo=sdjax.infotext.png_info(text))
    _run(["generate", "--from-png", png, "--no-progress", "--out", tmp_path / "out"], capsys)
    (made,) = (tmp_path / "out").glob("*.png")
    sd = sdjax.StableDiffusion.default()
    expected = sd.text_to_image("a green circle", "red", steps=3, scheduler="Euler a", schedule_type="Karras",
                                guidance_scale=2.0, seed=77, width=64, height=64, noise="torch-cpu", output="np")
    np.testing.assert_array_equal(np.asarray(Image.open(made)), expected[0])
    assert made.name == "00000-77.png"


def test_bad_a1111_names_are_one_line_errors(tmp_path, capsys):
    for argv, message in [
        (["--scheduler", "Euler b"], "unknown sampler 'Euler b'; accepted: sdjax names"),
        (["--scheduler", "DPM++ 2M Karras", "--schedule-type", "Exponential"], "names schedule type 'Karras' but schedule_type='Exponential'"),
        (["--scheduler", "DPM++ 2M SDE", "--noise", "torch-cpu"], "Brownian tree"),
    ]:
        code = cli.main(["generate", "x", "--steps", "2", "--size", "64x64", "--out", str(tmp_path), *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) <= 2
