"""Batch sampling as data: a prompts file read into typed rows, the plan of every image a run makes, its
fixed batches, and which batches each process runs. Pure functions; the output folder is ``batch_output``.

An image is identified by (row, image index) and made from its own prompt, negative prompt, guidance, size,
steps and seed; its seed is the row's ``seed`` + image index, or, for a row without one, the run's base
seed + row * per_prompt + image index, so every image of a plain prompt list has its own seed. Images
that share size, steps and the guided/guidance-free path are grouped, in plan order, into batches of
``batch_size`` (the last one of a group shorter). The batches are a function of the plan alone, never of
what is already done or how many processes run, so an image always comes out of the same batch and its
bytes do not change when a run is resumed or spread over more processes (XLA may round an image
differently in another batch composition; see ``sdjax.recipe.Recipe``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Iterator, Optional

from sdjax import inputs

SIZE_FACTOR = 8
PROMPT_FILE_TYPES = (".txt", ".jsonl", ".csv")
# Row fields of .jsonl/.csv files; "guidance_scale" is the API's name for "guidance".
ROW_FIELDS = ("prompt", "negative_prompt", "seed", "guidance", "guidance_scale", "width", "height", "steps")
ACCEPTED = ("a prompt per row ('prompt', required) and optionally negative_prompt, seed (0..2**32-1), guidance "
            f"(or guidance_scale, {inputs.GUIDANCE_RANGE[0]:g}..{inputs.GUIDANCE_RANGE[1]:g}), width and height "
            f"(positive multiples of {SIZE_FACTOR}), steps (1..{inputs.MAX_STEPS})")


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """One row of a prompts file; None = the run's default. ``line`` is its line number in the file."""

    prompt: str
    line: int
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    guidance: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    steps: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The run's settings for rows that leave them out, and its shape: images per prompt, batch size."""

    per_prompt: int
    batch_size: int
    steps: int
    guidance: float
    width: int
    height: int
    seed: int
    negative_prompt: str = ""


@dataclasses.dataclass(frozen=True, order=True)
class ImageId:
    row: int
    image: int

    @property
    def file_name(self) -> str:
        return f"{self.row:05d}_{self.image}.png"


@dataclasses.dataclass(frozen=True)
class PlannedImage:
    """Everything that makes one image, besides the run-wide model, sampler and noise source."""

    id: ImageId
    prompt: str
    negative_prompt: str
    seed: int
    guidance: float
    width: int
    height: int
    steps: int

    @property
    def shape_key(self) -> tuple:
        """What images of one batch share: one compiled program per size and steps, one guidance path (guidance
        1.0 for a whole batch skips the unconditional pass, which rounds apart from it) and one kind of negative
        conditioning (an SDXL base model conditions on zeros when a batch has no negative prompt)."""
        return (self.width, self.height, self.steps, self.guidance == 1.0, self.negative_prompt == "")


@dataclasses.dataclass(frozen=True)
class Plan:
    images: tuple[PlannedImage, ...]
    batches: tuple[tuple[PlannedImage, ...], ...]


# --- the prompts file ---------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_prompts(path) -> tuple[PromptRow, ...]:
    """The rows of a .txt (one prompt per line; blank lines and lines starting with '#' skipped), .jsonl (one
    JSON object per line) or .csv (a header row naming the columns) prompts file. A bad row is a ValueError
    naming the file, its line and what is accepted."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_TYPES:
        raise ValueError(f"prompts file {path} must be {', '.join(PROMPT_FILE_TYPES)}, got {suffix or 'no suffix'!r}")
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix == ".txt":
        rows = tuple(PromptRow(line.strip(), number) for number, line in enumerate(text.splitlines(), 1)
                     if line.strip() and not line.strip().startswith("#"))
    else:
        records = _jsonl_records(path, text) if suffix == ".jsonl" else _csv_records(path, text)
        rows = tuple(_row(path, number, record) for number, record in records)
    if not rows:
        expected = "one prompt per line" if suffix == ".txt" else ACCEPTED
        raise ValueError(f"prompts file {path} holds no prompts; expected {expected}")
    return rows


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}: not JSON ({e.msg}); expected one object per line with "
                             f"{ACCEPTED}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object with {ACCEPTED}, got {line.strip():.60}")
        yield number, record


def _csv_records(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    if "prompt" not in columns:
        raise ValueError(f"{path} line 1: the header row must name a 'prompt' column, got {columns}; "
                         f"columns: {', '.join(ROW_FIELDS)}")
    for record in reader:  # line_num: the record's last line (a quoted cell may span lines)
        if None in record:
            raise ValueError(f"{path} line {reader.line_num}: more cells than the header's {len(columns)} columns")
        given = {k: v for k, v in record.items() if v is not None and v.strip() != ""}
        if given:
            yield reader.line_num, given


def _row(path: Path, number: int, record: dict) -> PromptRow:
    where = f"{path} line {number}"
    unknown = sorted(set(record) - set(ROW_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; accepted: {', '.join(ROW_FIELDS)}")
    if "guidance" in record and "guidance_scale" in record:
        raise ValueError(f"{where}: give guidance or guidance_scale, not both")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r:.60}; expected {ACCEPTED}")
    negative = record.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"{where}: 'negative_prompt' must be a string, got {negative!r:.60}")
    low, high = inputs.GUIDANCE_RANGE
    guidance = record.get("guidance", record.get("guidance_scale"))
    return PromptRow(
        prompt=prompt.strip(), line=number, negative_prompt=negative,
        seed=_integer(where, "seed", record.get("seed"), inputs.SEED_RANGE[0], inputs.SEED_RANGE[1] - 1),
        guidance=None if guidance is None else _number(where, "guidance", guidance, low, high),
        width=_size(where, "width", record.get("width")),
        height=_size(where, "height", record.get("height")),
        steps=_integer(where, "steps", record.get("steps"), 1, inputs.MAX_STEPS),
    )


def _integer(where: str, name: str, value, low: int, high: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{where}: {name} must be an integer in [{low}, {high}], got {value!r:.60}")
    return value


def _number(where: str, name: str, value, low: float, high: float) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"{where}: {name} must be a number in [{low:g}, {high:g}], got {value!r:.60}")
    return float(value)


def _size(where: str, name: str, value) -> Optional[int]:
    size = _integer(where, name, value, 1, 1 << 16)
    if size is not None and size % SIZE_FACTOR:
        raise ValueError(f"{where}: {name} must be a positive multiple of {SIZE_FACTOR}, got {size}")
    return size


# --- the plan and its split ---------------------------------------------------------------------------------


def make_plan(rows: tuple[PromptRow, ...], defaults: Defaults) -> Plan:
    """Every image of the run, in (row, image) order, and its fixed batches (see the module's docstring)."""
    images = []
    for index, row in enumerate(rows):
        first_seed = row.seed if row.seed is not None else defaults.seed + index * defaults.per_prompt
        if first_seed + defaults.per_prompt > inputs.SEED_RANGE[1]:
            raise ValueError(f"line {row.line}: seeds {first_seed}..{first_seed + defaults.per_prompt - 1} of its "
                             f"images pass 2**32 - 1; use a lower seed (or --seed)")
        for image in range(defaults.per_prompt):
            images.append(PlannedImage(
                id=ImageId(index, image), prompt=row.prompt,
                negative_prompt=defaults.negative_prompt if row.negative_prompt is None else row.negative_prompt,
                seed=first_seed + image, guidance=defaults.guidance if row.guidance is None else row.guidance,
                width=row.width or defaults.width, height=row.height or defaults.height,
                steps=row.steps or defaults.steps,
            ))
    groups: dict[tuple, list[PlannedImage]] = {}
    for image in images:  # dicts keep insertion order: groups in order of their first image
        groups.setdefault(image.shape_key, []).append(image)
    batches = tuple(tuple(group[i:i + defaults.batch_size])
                    for group in groups.values() for i in range(0, len(group), defaults.batch_size))
    return Plan(tuple(images), batches)


def process_batches(plan: Plan, process_index: int, process_count: int) -> tuple[tuple[PlannedImage, ...], ...]:
    """The batches process ``process_index`` of ``process_count`` runs: every ``process_count``-th batch from
    its index on, so step k of all processes together covers batches k * count .. (k + 1) * count - 1.
    Disjoint and covering for any count; a single-process run is (0, 1)."""
    inputs.check_integer("process_count", process_count, 1)
    inputs.check_integer("process_index", process_index, 0, process_count - 1)
    return plan.batches[process_index::process_count]
