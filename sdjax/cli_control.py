"""The CLI's spatial controls: ControlNet / T2I-Adapter flags, paired in order into ``sdjax.control.Control``s.

The i-th control picture (``--control KIND:IMAGE`` or ``--control-image IMAGE``, in command-line order) goes with
the i-th ``--controlnet``; ``--control-scale`` / ``--control-start`` / ``--control-end`` take one value for all or
one per control. Everything that can be checked without a model is checked by ``plan_controls`` before any
model loads; ``build_controls`` then loads the control models and makes the condition images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Optional, Union

from PIL import Image

from sdjax import infotext, inputs, preprocess
from sdjax.control import Control, ControlModel, check_controls
from sdjax.controlnet import SINGLE_FILE_SUFFIXES, ControlNet, builtin_controlnet_dir, check_compatible, load_controlnet
from sdjax.t2i_adapter import load_t2i_adapter

BUILTIN = "builtin"
BUILTIN_RECORD = "sdjax-builtin-controlnet"
SCALE_RANGE = (-10.0, 10.0)


@dataclasses.dataclass(frozen=True)
class ControlSource:
    """One control picture as given: ``kind`` the preprocessor (``none`` for ``--control-image``), its options."""

    kind: str
    path: str
    options: tuple[tuple[str, Any], ...] = ()
    flag: str = "--control"


@dataclasses.dataclass(frozen=True, eq=False)
class ControlPlan:
    """The checked pairing of the control flags; ``images`` are the opened pictures, one per source."""

    sources: tuple[ControlSource, ...]
    images: tuple[Image.Image, ...]
    models: tuple[str, ...]
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess_mode: bool


@dataclasses.dataclass(frozen=True)
class ControlRecord:
    """One control as the infotext records it (A1111 ControlNet extension's ``ControlNet N`` field)."""

    module: str
    model: str
    weight: float
    start: float
    end: float
    guess_mode: bool = False

    def infotext_value(self) -> str:
        mode = ", Control Mode: ControlNet is more important" if self.guess_mode else ""
        return (f"Module: {self.module}, Model: {self.model}, Weight: {float(self.weight)!r}, "
                f"Guidance Start: {float(self.start)!r}, Guidance End: {float(self.end)!r}{mode}")


def _option_value(text: str) -> Union[int, float, str]:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_control(text: str) -> ControlSource:
    """``KIND[,OPTION=VALUE...]:IMAGE`` -> a ControlSource (argparse type of ``--control``)."""
    head, colon, path = text.partition(":")
    kind, *pairs = head.split(",")
    if not colon or not path or kind not in preprocess.PREPROCESSORS:
        what = f"unknown preprocessor {kind!r}" if colon and path else "expected KIND:IMAGE"
        raise argparse.ArgumentTypeError(
            f"{what} in {text!r}; accepted kinds: {', '.join(preprocess.PREPROCESSORS)} "
            "(e.g. canny:photo.png, canny,low=50,high=150:photo.png; a ready condition image: --control-image)"
        )
    options = []
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or name not in preprocess.options_of(kind):
            accepted = ", ".join(preprocess.options_of(kind)) or "none"
            raise argparse.ArgumentTypeError(f"bad option {pair!r} of {kind} in {text!r}; accepted options "
                                             f"(as NAME=VALUE): {accepted}")
        options.append((name, _option_value(value)))
    return ControlSource(kind, path, tuple(options))


def parse_control_image(text: str) -> ControlSource:
    return ControlSource("none", text, (), "--control-image")


def add_control_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("spatial control (ControlNet, T2I-Adapter)")
    group.add_argument("--controlnet", action="append", default=[], metavar="MODEL",
                       help="a ControlNet or T2I-Adapter: diffusers folder, single file or hub repo id; 'builtin' = "
                            "the built-in model's (edge) ControlNet; repeat for several, the i-th pairs with the "
                            "i-th control image (default: with the built-in model, its ControlNet; else none)")
    group.add_argument("--control", action="append", dest="control_sources", type=parse_control, default=[],
                       metavar="KIND:IMAGE",
                       help="a control image made from IMAGE by a preprocessor: "
                            f"{', '.join(preprocess.PREPROCESSORS)} (e.g. canny:photo.png, "
                            "canny,low=50,high=150:photo.png, depth:photo.png); resized to the output size first; "
                            "repeatable (default: none)")
    group.add_argument("--control-image", action="append", dest="control_sources", type=parse_control_image,
                       default=[], metavar="IMAGE",
                       help="a ready control image (an edge map, a depth map, ...), resized to the output size; "
                            "repeatable (default: none)")
    low, high = SCALE_RANGE
    group.add_argument("--control-scale", action="append", type=float, default=[], metavar="S",
                       help=f"conditioning scale, {low:g}..{high:g}: one for all controls or one per control "
                            "(default: 1.0)")
    group.add_argument("--control-start", action="append", type=float, default=[], metavar="F",
                       help="fraction of the steps where a control starts acting, 0..1: one or one per control "
                            "(default: 0.0)")
    group.add_argument("--control-end", action="append", type=float, default=[], metavar="F",
                       help="fraction of the steps where a control stops acting, 0..1: one or one per control "
                            "(default: 1.0)")
    group.add_argument("--guess-mode", action="store_true",
                       help="ControlNets act on the conditional half of guidance only (diffusers' guess mode; "
                            "A1111's 'ControlNet is more important')")


def open_image(path: str, flag: str) -> Image.Image:
    if not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"{flag} file not found: {path}")
    try:
        image = Image.open(Path(path).expanduser())
        image.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL: unidentified, truncated or corrupt files
        raise ValueError(f"{flag} {path} is not a readable image ({e})") from None
    return image


def _per_control(flag: str, values: list[float], count: int, default: float, low: float, high: float) -> tuple:
    for value in values:
        inputs.check_number(flag, value, low, high)
    if not values:
        return (default,) * count
    if len(values) == 1:
        return (float(values[0]),) * count
    if len(values) != count:
        raise ValueError(f"got {len(values)} {flag} values for {count} control image(s); give one for all or one "
                         "per control, in order")
    return tuple(float(v) for v in values)


def plan_controls(args) -> Optional[ControlPlan]:
    """The control flags checked and paired (None without control images), before any model is loaded."""
    if not hasattr(args, "control_sources"):  # a command without control options
        return None
    sources = tuple(args.control_sources)
    if not sources:
        given = [flag for flag, value in (("--controlnet", args.controlnet), ("--control-scale", args.control_scale),
                                          ("--control-start", args.control_start),
                                          ("--control-end", args.control_end), ("--guess-mode", args.guess_mode))
                 if value]
        if given:
            raise ValueError(f"{given[0]} needs a control image: add --control KIND:IMAGE or --control-image IMAGE")
        return None
    models = list(args.controlnet)
    if not models:
        if args.model is not None:
            raise ValueError(f"{sources[0].flag} needs --controlnet MODEL (one per control image); only the built-in "
                             "model has a default ControlNet")
        models = [BUILTIN] * len(sources)
    if len(models) != len(sources):
        raise ValueError(f"got {len(sources)} control image(s) (--control/--control-image) for {len(models)} "
                         "--controlnet; give one image per --controlnet, in order")
    scales = _per_control("--control-scale", args.control_scale, len(sources), 1.0, *SCALE_RANGE)
    starts = _per_control("--control-start", args.control_start, len(sources), 0.0, 0.0, 1.0)
    ends = _per_control("--control-end", args.control_end, len(sources), 1.0, 0.0, 1.0)
    for index, (start, end) in enumerate(zip(starts, ends)):
        if start >= end:
            raise ValueError(f"control {index}: --control-start {start:g} must be below --control-end {end:g} "
                             "(the control would never act)")
    for source in sources:
        if source.kind != "depth":  # a dry run on a tiny image: bad options fail before any model loads
            _condition(source, Image.new("RGB", (8, 8)), (8, 8), None)
    images = tuple(open_image(s.path, s.flag) for s in sources)
    for model in models:
        if model == BUILTIN:
            _check_builtin()
        looks_local = model.startswith((".", "/", "~")) or Path(model).suffix.lower() in SINGLE_FILE_SUFFIXES
        if model != BUILTIN and looks_local and not Path(model).expanduser().exists():
            raise FileNotFoundError(f"--controlnet not found: {model}")
    return ControlPlan(sources, images, tuple(models), scales, starts, ends, bool(args.guess_mode))


def _class_name(folder: Path) -> Optional[str]:
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _check_builtin() -> Path:
    folder = builtin_controlnet_dir()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the built-in model's ControlNet is not installed ({folder} is missing); give "
                                "--controlnet MODEL")
    return folder


def load_control_model(name: str, dtype) -> ControlModel:
    """``--controlnet NAME``: a ControlNet, or a T2I-Adapter where the folder says so or a ControlNet load fails."""
    if name == BUILTIN:
        return load_controlnet(_check_builtin(), dtype=dtype)
    path = Path(name).expanduser()
    try:
        if path.is_dir() and _class_name(path) == "T2IAdapter":
            return load_t2i_adapter(path, dtype=dtype)
        try:
            return load_controlnet(name, dtype=dtype)
        except ValueError as error:  # not ControlNet weights or config: maybe a T2I-Adapter file or repo
            if path.is_dir():
                raise
            try:
                return load_t2i_adapter(name, dtype=dtype)
            except (ValueError, OSError):
                raise error from None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--controlnet {name}: {' '.join(str(e).split())}") from None
    except (ValueError, OSError) as e:  # a bad checkpoint or config, the hub out of reach
        raise ValueError(f"--controlnet {name}: {' '.join(str(e).split())}") from None


def record_name(name: str) -> str:
    """The infotext's model name: the file or folder name, a hub id as it is."""
    if name == BUILTIN:
        return BUILTIN_RECORD
    path = Path(name).expanduser()
    if path.is_file():
        return path.stem
    return path.name if path.is_dir() else name


def _condition(source: ControlSource, image: Image.Image, size: tuple[int, int], depth_estimator):
    width, height = size
    if image.size != (width, height):
        image = image.convert("RGB").resize((width, height), Image.LANCZOS)
    options = dict(source.options)
    if source.kind == "depth" and "estimator" not in options and depth_estimator is not None:
        options["estimator"] = depth_estimator
    try:
        return preprocess.preprocess(source.kind, image, **options)
    except (ValueError, OSError) as e:
        given = f"{source.kind}:{source.path}" if source.flag == "--control" else source.path
        hint = "; a local DPT model: depth,estimator=FOLDER:IMAGE" if isinstance(e, OSError) else ""
        raise ValueError(f"{source.flag} {given}: {' '.join(str(e).split())}{hint}") from None


def build_controls(plan: ControlPlan, sd, size: tuple[int, int]) -> tuple[list[Control], tuple[ControlRecord, ...]]:
    """Load the plan's models (each once), make its condition images at ``size`` (width, height) and check
    them against ``sd``; returns the Controls and their infotext records."""
    loaded: dict[str, ControlModel] = {}
    for name in plan.models:
        if name not in loaded:
            model = load_control_model(name, sd.dtype)
            if isinstance(model, ControlNet):
                try:
                    check_compatible(model.config, sd.config.unet)
                except ValueError as e:
                    raise ValueError(f"--controlnet {name}: {e}") from None
            loaded[name] = model
    if plan.guess_mode and not any(isinstance(m, ControlNet) for m in loaded.values()):
        raise ValueError("--guess-mode is a ControlNet option; the T2I-Adapters given have none")
    depth_estimator = getattr(sd, "depth_estimator", None)
    if depth_estimator is None and any(s.kind == "depth" for s in plan.sources):
        depth_estimator = preprocess.DepthEstimator()  # one for every depth control: it loads once
    controls, records = [], []
    for source, image, name, scale, start, end in zip(plan.sources, plan.images, plan.models, plan.scales,
                                                      plan.starts, plan.ends):
        model = loaded[name]
        guess = plan.guess_mode and isinstance(model, ControlNet)
        controls.append(Control(model, _condition(source, image, size, depth_estimator), scale, start, end, guess))
        records.append(ControlRecord(source.kind, record_name(name), scale, start, end, guess))
    try:
        check_controls(controls, sd.config.unet)
    except ValueError as e:
        message = str(e)
        for index, name in enumerate(plan.models):
            message = message.replace(f"controls[{index}]", f"--controlnet {name}")
        raise ValueError(message) from None
    return controls, tuple(records)


def infotext_fields(records: tuple[ControlRecord, ...]) -> tuple[tuple[str, str], ...]:
    """A1111 ControlNet extension's infotext fields: ``ControlNet 0: "Module: canny, Model: ..., Weight: 1, ..."``."""
    return tuple((f"ControlNet {i}", record.infotext_value()) for i, record in enumerate(records))


def warn_if_recorded(png: Union[str, Path], args) -> None:
    """--from-png of an image made with controls, without control flags: say the result will differ."""
    extra = infotext.parse_infotext(infotext.read_png_infotext(png)).extra
    fields = [value for key, value in extra if key.startswith("ControlNet ")]
    if fields and not getattr(args, "control_sources", None):
        warnings.warn(f"{png} was made with {len(fields)} ControlNet(s) ({fields[0]}); give the same --controlnet "
                      "and --control flags to regenerate it")
