"""First contact with the CLI and API (#15): outputs never overwritten, the output folder and every numeric
knob checked before the model loads, memory estimates, unreadable inputs, single-file models, help text,
one-line errors. The CLI runs in-process (``sdjax.cli.main``) on the built-in model at 64x64."""

import inspect
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sdjax
from sdjax import cli, inputs, memory
from sdjax.pipeline import builtin_model_dir
from sdjax.samplers import SCHEDULERS

PROMPT = "a red circle on a blue background"
FAST = ["--steps", "2", "--size", "64x64", "--no-progress"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SDJAX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax_cache"))


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(cli, "load_model", refuse)


def run(capsys, *args):
    """(exit code, stdout, stderr) of ``sdjax ARGS`` in this process."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and 1 <= len(lines) <= 2, err
    assert lines[0].startswith("sdjax") and "error: " in lines[0], err
    assert len(lines) == 1 or lines[1].startswith("hint: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


# --- outputs ------------------------------------------------------------------------------------------------


def test_numbered_outputs_continue_the_counter_and_never_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00041-9.png").write_bytes(b"an earlier image")
    code, stdout, err = run(capsys, "generate", PROMPT, *FAST, "-n", "2", "--seed", "5", "--out", out)
    assert code == 0, err
    assert stdout.split() == [str(out / "00042-5.png"), str(out / "00043-6.png")]  # image i: seed + i
    code, stdout, err = run(capsys, "generate", PROMPT, *FAST, "--seed", "6", "--out", out)
    assert code == 0, err
    assert stdout.split() == [str(out / "00044-6.png")]
    assert (out / "00041-9.png").read_bytes() == b"an earlier image"
    # the file's seed regenerates it alone (up to XLA's rounding across batch shapes)
    np.testing.assert_allclose(pixels(out / "00043-6.png"), pixels(out / "00044-6.png"), atol=1)
    text = Image.open(out / "00043-6.png").text["parameters"]
    assert "Seed: 6" in text and "Batch size: 2, Batch pos: 1" in text
    assert sorted(p.name for p in out.iterdir()) == ["00041-9.png", "00042-5.png", "00043-6.png", "00044-6.png"]


def test_existing_png_is_refused_without_overwrite_and_replaced_with_it(tmp_path, capsys, monkeypatch):
    target = tmp_path / "a.png"
    target.write_bytes(b"keep me")
    with monkeypatch.context() as patch:
        patch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        code, _, err = run(capsys, "generate", PROMPT, *FAST, "--out", target)
    assert_one_line_error(code, err, f"--out {target} exists; pass --overwrite")
    assert target.read_bytes() == b"keep me"
    code, stdout, err = run(capsys, "generate", PROMPT, *FAST, "--out", target, "--overwrite")
    assert code == 0 and stdout.split() == [str(target)], err
    assert Image.open(target).size == (64, 64)
    folder = tmp_path / "fixed"
    for _ in range(2):  # --overwrite into a folder: the fixed names, replaced
        code, stdout, err = run(capsys, "generate", PROMPT, *FAST, "--seed", "3", "--out", folder, "--overwrite")
        assert code == 0 and stdout.split() == [str(folder / "sdjax_3_0.png")], err
    assert [p.name for p in folder.iterdir()] == ["sdjax_3_0.png"]


def test_interrupted_write_leaves_no_partial_png_and_keeps_the_old_one(tmp_path, capsys, monkeypatch):
    target = tmp_path / "a.png"
    target.write_bytes(b"the old image")

    def interrupted_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["generate", PROMPT, *FAST, "--out", str(target), "--overwrite"])
    assert target.read_bytes() == b"the old image"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    folder = tmp_path / "numbered"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["generate", PROMPT, *FAST, "--out", str(folder)])
    assert list(folder.iterdir()) == []


def test_unwritable_output_folder_is_refused_before_loading_the_model(tmp_path, capsys, no_model):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run(capsys, "generate", PROMPT, "--out", blocker / "out")
    assert_one_line_error(code, err, f"--out {blocker / 'out'}: cannot write to")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = run(capsys, "generate", PROMPT, "--out", locked)
        assert_one_line_error(code, err, f"--out {locked}: cannot write to {locked} (Permission denied)")


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--guidance", "nan"], "--guidance must be a finite number in [0, 100], got nan"),
        (["--guidance", "inf"], "--guidance must be a finite number in [0, 100], got inf"),
        (["--guidance", "-1"], "--guidance must be a finite number in [0, 100], got -1.0"),
        (["--steps", "0"], "--steps must be an integer in [1, 1000], got 0"),
        (["--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
        (["--seed", "4294967296"], "--seed must be an integer in [0, 4294967295], got 4294967296"),
        (["-n", "0"], "-n/--num-images must be an integer >= 1, got 0"),
        (["--seed", "4294967295", "-n", "2"], "--seed 4294967295 with -n 2: image i takes seed + i, which must "
                                              "stay below 2**32; use --seed 4294967294 or lower"),
        (["--size", "60x64"], "--size 60x64: width 60 must be a positive multiple of 8 (the VAE's downsampling "
                              "factor); nearest valid: 56 or 64"),
        (["--size", "64x0"], "--size 64x0: height 0 must be a positive multiple of 8"),
        (["--size", "big"], "size must look like WIDTHxHEIGHT"),
        (["--scheduler", "nope"], "--scheduler 'nope': unknown sampler 'nope'; accepted: sdjax names ['ddim', 'ddpm'"),
        (["--lora-scale", "0.5"], "got 1 --lora-scale values for 0 --lora files"),
        (["--lora", "missing.safetensors"], "--lora file not found: missing.safetensors"),
        (["--lora", __file__, "--lora-scale", "nan"], "--lora-scale must be a finite number in [-10, 10], got nan"),
        (["--model", "missing.safetensors"], "--model missing.safetensors: model file not found: missing.safetensors"),
        (["--config", "sd15"], "--config describes a single-file model"),
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_flag(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "--model" not in args and "--config" not in args:
        monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run(capsys, "generate", PROMPT, *args, "--out", tmp_path / "out")
    assert_one_line_error(code, err, message)
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_img2img_strength_is_checked(tmp_path, capsys, no_model):
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    for value in ("1.5", "nan"):
        code, _, err = run(capsys, "img2img", PROMPT, "--image", tmp_path / "in.png", "--strength", value)
        assert_one_line_error(code, err, f"--strength must be a finite number in [0, 1], got {float(value)}")


@pytest.fixture(scope="module")
def sd():
    return sdjax.StableDiffusion.default()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(guidance_scale=float("nan")), r"guidance_scale must be a finite number in \[0, 100\], got nan"),
        (dict(guidance_scale=[1.0, float("inf")]), r"guidance_scale must be a finite number .* got inf"),
        (dict(steps=2.5), r"num_steps must be an integer >= 1, got 2.5"),
        (dict(seed=1.5), r"seeds? must be .*integer.*got 1.5"),
        (dict(seed=2**32), r"seeds? must be .*\[0, 2\*\*32\)"),
        (dict(num_images_per_prompt=True), r"num_images_per_prompt must be a positive integer"),
        (dict(height=-8), r"height must be an integer of at least 8, got -8"),
    ],
)
def test_api_names_the_argument_the_value_and_the_range(sd, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sd.text_to_image("a cat", **{"steps": 2, **kwargs})


def test_api_checks_lora_scales_and_img2img_strength(sd):
    with pytest.raises(ValueError, match=r"LoRA scale of 'broken' must be a finite number in \[-10, 10\], got nan"):
        sd.add_lora({}, scale=float("nan"), name="broken")
    assert "broken" not in sd.lora_adapters  # refused before anything changed
    sd.add_lora({}, scale=0.5, name="fine")
    try:
        with pytest.raises(ValueError, match=r"LoRA scale of 'fine' must be a finite number in \[-10, 10\], got inf"):
            sd.set_lora_scale("fine", float("inf"))
        assert sd.lora_adapters["fine"] == 0.5
    finally:
        sd.unload_lora("fine")
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\] .* got nan"):
        sd.image_to_image("a cat", np.zeros((64, 64, 3), np.uint8), float("nan"), steps=2)


def test_non_finite_results_warn_with_the_likely_cause():
    values = np.zeros((3, 8, 8, 4), np.float32)
    values[1, 2, 3, 0] = np.nan
    values[2, 0, 0, 1] = np.inf
    with pytest.warns(RuntimeWarning, match=r"2 of 3 images have NaN or infinite latents \(image 1, 2\): "
                                            r"usually float16 overflow .* --dtype float32"):
        inputs.to_output(values, "latent")
    with pytest.warns(RuntimeWarning, match=r"1 of 4 images have NaN or infinite pixels \(image 3\)"):
        assert inputs.warn_if_not_finite(np.zeros((4, 2, 2, 3), np.uint8), "pixels", bad=np.array([3]))
    assert not inputs.warn_if_not_finite(np.zeros((2, 4)))


# --- memory ---------------------------------------------------------------------------------------------------


def test_a_request_that_cannot_fit_is_refused_with_the_estimate_and_what_fits(tmp_path, capsys):
    code, _, err = run(capsys, "generate", PROMPT, "--size", "100000x100000", "--out", tmp_path)
    assert_one_line_error(code, err, "100000x100000 with 1 image (1 per device) needs about", "GiB per device",
                          "largest that fits: ")
    width, height = map(int, re.search(r"largest that fits: (\d+)x(\d+) with 1 image", err).groups())
    assert 64 <= width == height < 100000 and width % 8 == 0
    assert list(tmp_path.iterdir()) == []
    sd = sdjax.StableDiffusion.default()
    params = memory.tree_bytes(sd.params)
    fitting = memory.check_fits(sd.config, height, width, 1, dtype=sd.dtype, param_bytes=params)
    assert fitting.total <= memory.device_memory()[0]
    with pytest.raises(memory.InsufficientMemoryError):
        memory.check_fits(sd.config, height + 64, width + 64, 1, dtype=sd.dtype, param_bytes=params)
    normal = memory.check_fits(sd.config, 64, 64, 4, dtype=sd.dtype, param_bytes=params)
    assert normal.params == params and 0 < normal.activations < 2**30


def test_memory_estimate_grows_with_size_and_batch_and_splits_over_devices():
    config = sdjax.config.PRESETS["sd15"]
    one = memory.estimate(config, 512, 512, 1, dtype=np.float16, param_bytes=0, attention_maps=False)
    assert memory.estimate(config, 1024, 1024, 1, dtype=np.float16, param_bytes=0).total > 4 * one.total
    eight = memory.estimate(config, 512, 512, 8, dtype=np.float16, param_bytes=0, attention_maps=False)
    assert math.isclose(eight.total, 8 * one.total, rel_tol=1e-6)
    split = memory.estimate(config, 512, 512, 8, dtype=np.float16, param_bytes=0, num_devices=4,
                            attention_maps=False)
    assert split.per_device_batch == 2 and math.isclose(split.total, 2 * one.total, rel_tol=1e-6)
    # SD 1.5 at 512x512 in fp16 with flash attention: between 0.3 and 3 GiB of activations
    assert 0.3 * 2**30 < one.activations < 3 * 2**30


# --- inputs and models ----------------------------------------------------------------------------------------


def test_unreadable_images_name_the_flag_and_the_file(tmp_path, capsys, no_model):
    good, bad = tmp_path / "in.png", tmp_path / "bad.png"
    Image.new("RGB", (64, 64)).save(good)
    bad.write_bytes(b"this is not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    code, _, err = run(capsys, "img2img", PROMPT, "--image", bad)
    assert_one_line_error(code, err, f"--image {bad} is not a readable image")
    code, _, err = run(capsys, "img2img", PROMPT, "--image", truncated)
    assert_one_line_error(code, err, f"--image {truncated} is not a readable image")
    code, _, err = run(capsys, "inpaint", PROMPT, "--image", good, "--mask", bad)
    assert_one_line_error(code, err, f"--mask {bad} is not a readable image")
    code, _, err = run(capsys, "depth2img", PROMPT, "--image", good, "--depth", bad)
    assert_one_line_error(code, err, f"--depth {bad} is not a readable image")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    code, _, err = run(capsys, "depth2img", PROMPT, "--image", good, "--depth", tmp_path / "bad.npy")
    assert_one_line_error(code, err, f"--depth {tmp_path / 'bad.npy'} is not a readable .npy array")
    np.save(tmp_path / "nan.npy", np.full((8, 8), np.nan))
    code, _, err = run(capsys, "depth2img", PROMPT, "--image", good, "--depth", tmp_path / "nan.npy")
    assert_one_line_error(code, err, "must hold a finite (H, W) numeric array")


def test_single_file_model_loads_without_hints_and_draws_the_same(tmp_path, capsys):
    sdjax.StableDiffusion.default().save_single_file(tmp_path / "builtin.safetensors")
    common = ["generate", PROMPT, *FAST, "--seed", "4", "--overwrite", "--guidance", "1.5"]
    code, _, err = run(capsys, *common, "--model", builtin_model_dir(), "--out", tmp_path / "folder.png")
    assert code == 0, err
    code, _, err = run(capsys, *common, "--model", tmp_path / "builtin.safetensors", "--out", tmp_path / "file.png")
    assert code == 0, err
    assert "warning" not in err  # nothing guessed: the file carries its config
    np.testing.assert_array_equal(pixels(tmp_path / "folder.png"), pixels(tmp_path / "file.png"))
    code, _, err = run(capsys, *common, "--model", tmp_path / "builtin.safetensors", "--config", builtin_model_dir(),
                       "--out", tmp_path / "config.png")
    assert code == 0, err
    np.testing.assert_array_equal(pixels(tmp_path / "folder.png"), pixels(tmp_path / "config.png"))
    code, _, err = run(capsys, *common, "--model", tmp_path / "builtin.safetensors", "--config", "sd21-v",
                       "--out", tmp_path / "wrong.png")
    assert_one_line_error(code, err)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00")
    code, _, err = run(capsys, *common, "--model", tmp_path / "broken.safetensors", "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "is not a safetensors file")


def test_offline_hub_id_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, _, err = run(capsys, "generate", PROMPT, "--model", "nobody/no-such-model", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "cannot load 'nobody/no-such-model': the Hugging Face Hub cannot be reached")


# --- help and defaults ----------------------------------------------------------------------------------------


def test_every_flag_has_help_with_its_default():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction)).choices
    for name, command in commands.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if isinstance(action, cli.argparse._HelpAction) or not action.option_strings or action.required:
                continue
            assert action.help, f"sdjax {name} {action.option_strings[0]} has no help"
            assert "default" in formatter._get_help_string(action), f"sdjax {name} {action.option_strings[0]}"
    generate = commands["generate"].format_help()
    for scheduler in SCHEDULERS:
        assert scheduler in " ".join(generate.split())


def test_one_default_sampler_for_api_and_cli():
    api = inspect.signature(sdjax.StableDiffusion.prepare).parameters["scheduler"].default
    cli_default = cli.build_parser().parse_args(["generate", "x"]).scheduler
    assert api == cli_default == "dpmpp_2m"


HIDE_TORCH = """
import importlib.util, sys
find = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] == "torch" else find(name, package)
from sdjax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_no_transformers_pytorch_advice_on_stderr(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    env.update(JAX_PLATFORMS="cpu", SDJAX_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", HIDE_TORCH, "info"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "PyTorch was not found" not in result.stderr and "None of PyTorch" not in result.stderr, result.stderr
