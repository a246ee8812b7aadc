"""The output folder of a batch-sampling run (``sdjax sample``): one PNG per image named from its (row, image),
``manifest.jsonl`` with a row per finished image, and ``run.json`` with the settings that determine the images.

Every write is atomic (a temporary name in the folder, fsync, ``os.replace``) and a manifest row is appended
only after its image is in place, so a run killed at any moment leaves whole files. A run starting in the
folder drops temporary leftovers and counts an image done when its file exists: a manifest row is a function
of the plan, so the manifest is rewritten from the files present (a file whose row the kill cut off gets it
back) in (row, image) order, at the start and at the end. The end state equals an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from sdjax.batch import ImageId, Plan, PlannedImage
from sdjax.outputs import write_png

RUN_FILE, MANIFEST_FILE = "run.json", "manifest.jsonl"
TEMPORARY_PATTERNS = (".*.png.tmp", f".{MANIFEST_FILE}.tmp", f".{RUN_FILE}.tmp")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The settings that determine a run's images, each named as its ``sdjax sample`` flag."""

    model: Optional[str]
    config: Optional[str]
    dtype: Optional[str]
    scheduler: str
    schedule_type: Optional[str]
    noise: str
    steps: int
    size: Optional[tuple[int, int]]
    guidance: float
    negative_prompt: str
    seed: int
    per_prompt: int
    batch_size: int
    prompts_sha256: str

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as read back


def check_settings(folder: Path, settings: RunSettings) -> None:
    """Refuse, naming the first differing setting, a folder whose ``run.json`` records other settings."""
    path = folder / RUN_FILE
    if not path.exists():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not a run.json sdjax wrote; give another --out") from None
    for name, value in settings.to_json().items():
        if not isinstance(recorded, dict) or name not in recorded or recorded[name] != value:
            if name == "prompts_sha256":
                raise ValueError(f"--out {folder} holds a run of another prompts file (its sha256 differs); resume "
                                 "with the same file, or give another --out")
            shown = _shown(recorded.get(name)) if isinstance(recorded, dict) else "?"
            raise ValueError(f"--out {folder} holds a run with --{name.replace('_', '-')} {shown}, not "
                             f"{_shown(value)}; resume with the same settings, or give another --out")


def record_settings(folder: Path, settings: RunSettings) -> None:
    """``run.json`` for a new run (once its model has loaded, so a failed start leaves none behind)."""
    if not (folder / RUN_FILE).exists():
        _write_atomic(folder / RUN_FILE, json.dumps(settings.to_json(), indent=1) + "\n")


def _shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return "x".join(map(str, value))
    return repr(value) if isinstance(value, str) else str(value)


def start(folder: Path, plan: Plan, sampler: str) -> None:
    """Drop temporary leftovers, rewrite the manifest from the images present (process 0, before any writes)."""
    for pattern in TEMPORARY_PATTERNS:
        for leftover in folder.glob(pattern):
            leftover.unlink()
    rewrite_manifest(folder, plan, sampler, finished(folder, plan))


def finished(folder: Path, plan: Plan) -> set[ImageId]:
    """The images whose file is in place (writes are atomic: an existing file is whole)."""
    return {image.id for image in plan.images if (folder / image.id.file_name).is_file()}


def rewrite_manifest(folder: Path, plan: Plan, sampler: str, done: set[ImageId]) -> None:
    """The manifest of the ``done`` images, in (row, image) order, written atomically."""
    rows = [manifest_row(image, sampler) for image in plan.images if image.id in done]
    _write_atomic(folder / MANIFEST_FILE, "".join(line + "\n" for line in rows))


def manifest_row(image: PlannedImage, sampler: str) -> str:
    return json.dumps(dict(
        row=image.id.row, image=image.id.image, prompt=image.prompt, negative_prompt=image.negative_prompt,
        seed=image.seed, guidance=image.guidance, width=image.width, height=image.height, steps=image.steps,
        sampler=sampler, file=image.id.file_name,
    ), ensure_ascii=False)


def save_image(folder: Path, image: PlannedImage, picture, infotext: str, sampler: str, *,
               append_row: bool = True) -> None:
    """The PNG (with its infotext) put in place atomically, then its manifest row appended."""
    write_png(picture, folder / image.id.file_name, infotext, replace=True)
    if not append_row:
        return
    with open(folder / MANIFEST_FILE, "a", encoding="utf-8") as f:
        f.write(manifest_row(image, sampler) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
