"""``--fast NAME``: few-step presets fill the sampler, steps and guidance the user left out."""

import os
import subprocess
import sys

import pytest
from PIL import Image

from sdjax import cli, fast, samplers
from sdjax.config import SchedulerConfig


def resolved(*flags, command=("generate", "a cat")):
    """The namespace ``sdjax`` runs with after ``--fast``, and its note."""
    args = cli.build_parser().parse_args([*command, *flags])
    note = fast.apply_fast(args)
    return args, note


@pytest.mark.parametrize("name", list(fast.FAST_PRESETS))
def test_presets_resolve_to_their_settings(name):
    preset = fast.FAST_PRESETS[name]
    args, _ = resolved("--fast", name)
    assert (args.scheduler, args.steps, args.guidance) == (preset.scheduler, preset.steps, 1.0)
    sampler, options = cli.sampler_choice(args)
    assert sampler == preset.scheduler and options == dict(preset.scheduler_options)
    samplers.make_schedule(sampler, SchedulerConfig(), args.steps, **options)  # a schedule the library accepts


def test_preset_values():
    expected = {
        "lcm": ("lcm", 4, {}),
        "tcd": ("tcd", 4, {"eta": 0.3}),
        "hyper": ("ddim", 8, {"timestep_spacing": "trailing"}),
        "lightning": ("euler", 4, {"timestep_spacing": "trailing"}),
        "turbo": ("euler_a", 1, {"timestep_spacing": "trailing"}),
    }
    assert {n: (p.scheduler, p.steps, dict(p.scheduler_options)) for n, p in fast.FAST_PRESETS.items()} == expected
    lcm_lora = ("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors")
    assert fast.FAST_PRESETS["lcm"].sd15_lora == lcm_lora


def test_explicit_flags_win():
    args, _ = resolved("--fast", "tcd", "--steps", "25", "--guidance", "2.5")
    assert (args.scheduler, args.steps, args.guidance) == ("tcd", 25, 2.5)
    assert cli.sampler_choice(args) == ("tcd", {"eta": 0.3})
    # a flag given with the default's value is still the user's choice
    args, _ = resolved("--fast", "lcm", "--steps", "25")
    assert args.steps == 25
    # another sampler takes none of the preset's sampler options
    args, _ = resolved("--fast", "tcd", "--scheduler", "euler")
    assert cli.sampler_choice(args) == ("euler", {}) and args.steps == 4
    args, _ = resolved("--fast", "turbo", "--timestep-spacing", "leading")
    assert cli.sampler_choice(args) == ("euler_a", {"timestep_spacing": "leading"})
    args, _ = resolved("--fast", "lightning", "--schedule-type", "Karras")
    assert cli.sampler_choice(args) == ("euler", {"sigmas": "karras"})


def test_without_fast_nothing_changes():
    args, note = resolved()
    assert (args.scheduler, args.steps, args.guidance, note) == ("dpmpp_2m", 25, None, None)


def test_image_commands_take_fast():
    args, _ = resolved("--fast", "lcm", command=("img2img", "a cat", "--image", "x.png"))
    assert (args.scheduler, args.steps) == ("lcm", 4)
    args, _ = resolved("--fast", "hyper", command=("inpaint", "a cat", "--image", "x.png", "--mask", "m.png"))
    assert (args.scheduler, args.steps) == ("ddim", 8)


def test_notes_name_what_the_preset_expects(tmp_path):
    args, note = resolved("--fast", "lcm")  # the built-in model's own LCM-LoRA
    assert note == "--fast lcm: with the built-in model's LCM-LoRA, distilled by sdjax"
    assert args.lora == [str(fast.BUILTIN_LCM_LORA)] and fast.BUILTIN_LCM_LORA.is_file()
    assert resolved("--fast", "lcm", "--lora", str(tmp_path / "mine.safetensors"))[0].lora == [
        str(tmp_path / "mine.safetensors")]  # the user's LoRA replaces it
    _, note = resolved("--fast", "tcd")
    assert "built-in model has no distilled LoRA for it" in note and "h1t/TCD-SD15-LoRA" in note
    _, note = resolved("--fast", "tcd", "--model", "some/model")
    assert "h1t/TCD-SD15-LoRA" in note and "--lora" in note
    (tmp_path / "tcd.safetensors").touch()
    assert resolved("--fast", "tcd", "--model", "some/model", "--lora", str(tmp_path / "tcd.safetensors"))[1] is None
    assert resolved("--fast", "turbo", "--model", "stabilityai/sd-turbo")[1] is None


def sdjax(*args, cache_dir):
    env = {**os.environ, "SDJAX_CACHE_DIR": str(cache_dir), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "sdjax.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_bad_preset_and_from_png_are_one_line_errors(tmp_path):
    result = sdjax("generate", "a cat", "--fast", "nope", cache_dir=tmp_path)
    assert result.returncode == 2
    assert "sdjax generate: error: argument --fast: invalid choice: 'nope'" in result.stderr
    assert "Traceback" not in result.stderr
    result = sdjax("generate", "--fast", "lcm", "--from-png", tmp_path / "x.png", cache_dir=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "sdjax generate: error: --fast lcm and --from-png both set the sampler and " \
                                    "steps; give one of them"


def test_fast_lcm_runs_on_the_builtin_model(tmp_path):
    out = tmp_path / "fast.png"
    result = sdjax("generate", "a red circle", "--fast", "lcm", "--steps", "2", "--size", "64x64", "-n", "1",
                   "--no-progress", "--out", out, cache_dir=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sdjax: note: --fast lcm: with the built-in model's LCM-LoRA, distilled by sdjax" in result.stderr
    text = Image.open(out).text["parameters"]
    assert "Steps: 2, Sampler: LCM" in text and "CFG scale: 1" in text
    assert "<lora:builtin_lcm_lora:1>" in text and "Lora hashes" in text
