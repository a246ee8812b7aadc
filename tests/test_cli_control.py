"""The CLI's control flags: parsing and pairing without a model, one-line errors, and one generation with a tiny
random ControlNet for the built-in model."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import cli_control, infotext
from sdjax.cli import build_parser
from sdjax.data import render

BUILTIN_UNET = Path(__file__).resolve().parents[1] / "sdjax" / "assets" / "builtin" / "unet" / "config.json"


def run_cli(*args, cache_dir, check=True):
    env = {**os.environ, "SDJAX_CACHE_DIR": str(cache_dir), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "sdjax.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture
def pictures(tmp_path):
    paths = []
    for i, shape in enumerate(("circle", "square", "star")):
        path = tmp_path / f"{shape}.png"
        Image.fromarray(render(shape, "yellow", "blue", 0.6, (0.5, 0.5))).save(path)
        paths.append(path)
    return paths


def plan(*flags):
    return cli_control.plan_controls(build_parser().parse_args(["generate", "a cat", *map(str, flags)]))


def test_sources_keep_command_line_order_and_pair_with_models(pictures):
    a, b, c = pictures
    result = plan("--control", f"canny,low=50,high=150:{a}", "--control-image", b, "--control", f"depth:{c}",
                  "--controlnet", "x/edges", "--controlnet", "x/seg", "--controlnet", "x/depth",
                  "--control-scale", "0.5", "--control-end", "0.2", "--control-end", "0.5", "--control-end", "1",
                  "--guess-mode")
    assert [(s.kind, s.path, s.options, s.flag) for s in result.sources] == [
        ("canny", str(a), (("low", 50), ("high", 150)), "--control"),
        ("none", str(b), (), "--control-image"),
        ("depth", str(c), (), "--control"),
    ]
    assert result.models == ("x/edges", "x/seg", "x/depth")
    assert result.scales == (0.5, 0.5, 0.5) and result.starts == (0.0, 0.0, 0.0) and result.ends == (0.2, 0.5, 1.0)
    assert result.guess_mode and [image.size for image in result.images] == [(64, 64)] * 3


def test_builtin_model_defaults_to_its_controlnet(pictures, tmp_path, monkeypatch):
    monkeypatch.setattr(cli_control, "builtin_controlnet_dir", lambda: tmp_path / "controlnet")
    flags = ("--control", f"canny:{pictures[0]}", "--control-image", pictures[1])
    with pytest.raises(FileNotFoundError, match=r"^the built-in model's ControlNet is not installed \(.*controlnet "
                                                r"is missing\); give --controlnet MODEL$"):
        plan(*flags)
    (tmp_path / "controlnet").mkdir()
    (tmp_path / "controlnet" / "config.json").write_text("{}")
    result = plan(*flags)
    assert result.models == ("builtin", "builtin") and result.scales == (1.0, 1.0)
    assert plan() is None
    assert cli_control.plan_controls(build_parser().parse_args(["depth2img", "a", "--image", "x.png"])) is None


@pytest.mark.parametrize("flags, error, message", [
    (["--controlnet", "x/y"], ValueError, "--controlnet needs a control image: add --control KIND:IMAGE or "
                                          "--control-image IMAGE"),
    (["--control-scale", "2"], ValueError, "--control-scale needs a control image"),
    (["--control", "canny:{0}", "--model", "x/sd"], ValueError,
     "--control needs --controlnet MODEL (one per control image); only the built-in model has a default ControlNet"),
    (["--control", "canny:{0}", "--control", "canny:{1}", "--controlnet", "x/y"], ValueError,
     "got 2 control image(s) (--control/--control-image) for 1 --controlnet; give one image per --controlnet, in "
     "order"),
    (["--control", "canny:{0}", "--control-image", "{1}", "--control-scale", "1", "--control-scale", "2",
      "--control-scale", "3"], ValueError,
     "got 3 --control-scale values for 2 control image(s); give one for all or one per control, in order"),
    (["--control", "canny:{0}", "--control-scale", "nan"], ValueError,
     "--control-scale must be a finite number in [-10, 10], got nan"),
    (["--control", "canny:{0}", "--control-start", "0.5", "--control-end", "0.5"], ValueError,
     "control 0: --control-start 0.5 must be below --control-end 0.5 (the control would never act)"),
    (["--control", "canny:{0}", "--control-end", "1.5"], ValueError,
     "--control-end must be a finite number in [0, 1], got 1.5"),
    (["--control", "canny,low=50.5:{0}"], ValueError,
     "--control canny:{0}: canny low threshold must be an integer in [0, 255], got 50.5"),
    (["--control", "canny:missing.png"], FileNotFoundError, "--control file not found: missing.png"),
    (["--control-image", "{2}.txt"], FileNotFoundError, "--control-image file not found: "),
    (["--control", "canny:{0}", "--controlnet", "./nothing-here"], FileNotFoundError,
     "--controlnet not found: ./nothing-here"),
])
def test_pairing_errors(pictures, flags, error, message):
    flags, message = [flag.format(*pictures) for flag in flags], message.format(*pictures)
    with pytest.raises(error) as caught:
        plan(*flags)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_unreadable_control_image(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"--control-image .*bad.png is not a readable image"):
        plan("--control-image", tmp_path / "bad.png")


@pytest.mark.parametrize("text, message", [
    ("sobel:x.png", "argument --control: unknown preprocessor 'sobel' in 'sobel:x.png'; accepted kinds: canny, "
                    "depth, invert, none"),
    ("x.png", "argument --control: expected KIND:IMAGE in 'x.png'; accepted kinds: canny, depth, invert, none"),
    ("canny,lo=3:x.png", "argument --control: bad option 'lo=3' of canny in 'canny,lo=3:x.png'; accepted options "
                         "(as NAME=VALUE): low, high"),
    ("invert,low=3:x.png", "accepted options (as NAME=VALUE): none"),
])
def test_control_syntax_errors(capsys, text, message):
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["generate", "a cat", "--control", text])
    assert caught.value.code == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert message in first


def test_infotext_records_controls_as_a1111s_extension():
    records = (cli_control.ControlRecord("canny", "control_sd15_canny", 1.0, 0.0, 1.0),
               cli_control.ControlRecord("depth", "x/depth", 0.5, 0.25, 0.75, guess_mode=True))
    fields = cli_control.infotext_fields(records)
    assert fields[0] == ("ControlNet 0", "Module: canny, Model: control_sd15_canny, Weight: 1.0, Guidance Start: "
                                         "0.0, Guidance End: 1.0")
    text = infotext.format_infotext(infotext.GenerationParameters(prompt="a cat", steps=2, sampler="Euler", seed=1,
                                                                  extra=fields))
    assert 'ControlNet 0: "Module: canny, Model: control_sd15_canny, Weight: 1.0, Guidance Start: 0.0, ' in text
    assert dict(infotext.parse_infotext(text).extra)["ControlNet 1"].endswith(
        "Weight: 0.5, Guidance Start: 0.25, Guidance End: 0.75, Control Mode: ControlNet is more important")


def test_a_t2i_adapter_folder_loads_as_an_adapter(tmp_path):
    from diffusers import T2IAdapter as TorchAdapter

    from sdjax.t2i_adapter import T2IAdapter

    TorchAdapter(adapter_type="light_adapter", in_channels=3, channels=[8, 16, 32], num_res_blocks=1) \
        .save_pretrained(tmp_path / "adapter")
    assert isinstance(cli_control.load_control_model(str(tmp_path / "adapter"), np.float32), T2IAdapter)
    (tmp_path / "junk").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^--controlnet .*junk: .*no config.json"):
        cli_control.load_control_model(str(tmp_path / "junk"), np.float32)


def test_cli_errors_are_one_line(tmp_path, pictures, capsys):
    from sdjax import cli

    result = run_cli("generate", "a cat", "--control", "sobel:x.png", cache_dir=tmp_path / "cache", check=False)
    assert result.returncode == 2 and "unknown preprocessor 'sobel'" in result.stderr.splitlines()[0]
    assert "Traceback" not in result.stderr
    cases = [
        (["--control", f"canny:{tmp_path / 'missing.png'}"], "sdjax generate: error: --control file not found: "),
        (["--control", f"canny:{pictures[0]}", "--control-image", str(pictures[1]), "--controlnet", "x/y"],
         "sdjax generate: error: got 2 control image(s) (--control/--control-image) for 1 --controlnet"),
    ]
    for flags, message in cases:
        assert cli.main(["generate", "a cat", *flags, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err


# --- one generation -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_controlnet(tmp_path_factory):
    """A random diffusers ControlNet shaped like the built-in model's U-Net (zero convolutions randomised too)."""
    from diffusers import ControlNetModel
    from reference import randomize_, seeded

    unet = json.loads(BUILTIN_UNET.read_text())
    keys = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "attention_head_dim",
            "cross_attention_dim", "norm_num_groups", "flip_sin_to_cos", "freq_shift", "use_linear_projection")
    seeded(0)
    model = ControlNetModel(**{k: unet[k] for k in keys}, conditioning_embedding_out_channels=(16, 32, 64, 128))
    folder = tmp_path_factory.mktemp("controlnet") / "tiny_canny"
    randomize_(model, 0).save_pretrained(folder)
    return folder


def test_generate_with_a_controlnet(tiny_controlnet, tmp_path, monkeypatch):
    """The CLI hands the pipeline the paired, preprocessed control and records it; the program runs."""
    from sdjax import cli
    from sdjax.controlnet import ControlNet
    from sdjax.pipeline import StableDiffusion
    from sdjax.preprocess import canny

    photo = render("circle", "red", "blue", 0.6, (0.5, 0.5), image_size=128)  # preprocessed at the output size
    Image.fromarray(photo).save(tmp_path / "photo.png")
    calls = []
    text_to_image = StableDiffusion.text_to_image

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return text_to_image(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusion, "text_to_image", spy)
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: None)  # in process: JAX's config stays as it is
    assert cli.main(["generate", "a red circle", "--controlnet", str(tiny_controlnet), "--control",
                     f"canny,low=20,high=60:{tmp_path / 'photo.png'}", "--control-scale", "0.5", "--control-end",
                     "0.8", "--steps", "2", "--no-progress", "--out", str(tmp_path / "a.png")]) == 0

    (control,) = calls[0]["controls"]
    assert isinstance(control.model, ControlNet) and control.model.config.block_out_channels == (64, 128)
    assert (control.scale, control.start, control.end, control.guess_mode) == (0.5, 0.0, 0.8, False)
    np.testing.assert_array_equal(control.image, canny(Image.fromarray(photo).resize((64, 64), Image.LANCZOS), 20, 60))
    image = Image.open(tmp_path / "a.png")
    assert image.size == (64, 64)
    assert 'ControlNet 0: "Module: canny, Model: tiny_canny, Weight: 0.5, Guidance Start: 0.0, Guidance End: 0.8"' \
        in image.text["parameters"]
    with pytest.warns(UserWarning, match=r"a.png was made with 1 ControlNet\(s\) \(Module: canny, .*give the same "
                                         r"--controlnet and --control flags to regenerate it"):
        cli_control.warn_if_recorded(tmp_path / "a.png", argparse.Namespace(control_sources=[]))


def test_a_controlnet_for_another_base_model(tiny_controlnet, pictures):
    from types import SimpleNamespace

    from sdjax.config import SD15

    sd = SimpleNamespace(config=SD15, dtype=np.float32, depth_estimator=None)
    controls = plan("--controlnet", tiny_controlnet, "--control", f"canny:{pictures[0]}")
    with pytest.raises(ValueError, match=r"^--controlnet .*tiny_canny: ControlNet built for cross_attention_dim 64 "
                                         r"cannot drive this U-Net \(768, SD 1.x\)$"):
        cli_control.build_controls(controls, sd, (64, 64))
