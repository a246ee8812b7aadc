"""Where the CLI writes images: numbered files that never overwrite (AUTOMATIC1111's ``NNNNN-SEED.png``)
or fixed names with ``--overwrite``, each written atomically; the output folder proven writable first.

The functions take the CLI's parsed arguments (``out``, ``overwrite``, ``num_images``, ``seed``)."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

from PIL import PngImagePlugin

from sdjax import inputs

NUMBERED = re.compile(r"^(\d+)-")


def _is_png_name(out: str) -> bool:
    return Path(out).suffix.lower() == ".png"


def fixed_paths(out: str, count: int, seed: int) -> list[Path]:
    """--overwrite's names: the --out .png (NAME_I.png for several), or sdjax_SEED_I.png in the folder."""
    target = Path(out)
    if _is_png_name(out):
        if count == 1:
            return [target]
        return [target.with_name(f"{target.stem}_{i}.png") for i in range(count)]
    return [target / f"sdjax_{seed}_{i}.png" for i in range(count)]


def check_output(args) -> Path:
    """Create the output folder if missing and prove it writable (a probe file) before any model is loaded;
    a .png --out that exists is refused without --overwrite. Returns the folder."""
    folder = Path(args.out).parent if _is_png_name(args.out) else Path(args.out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".sdjax-probe-", dir=folder)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as e:
        raise OSError(f"--out {args.out}: cannot write to {folder} ({e.strerror or e})") from None
    if _is_png_name(args.out) and not args.overwrite:
        existing = [p for p in fixed_paths(args.out, args.num_images, args.seed) if p.exists()]
        if existing:
            raise FileExistsError(
                f"--out {existing[0]} exists; pass --overwrite to replace it, or give a folder for numbered files"
            )
    return folder


def next_number(folder: Path) -> int:
    """One past the highest NNNNN- counter of the .png files in ``folder`` (0 in an empty folder)."""
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def numbered_name(number: int, seed: int) -> str:
    """A1111's NNNNN-SEED.png, SEED the image's own seed (``inputs.image_seeds``: seed + i for image i)."""
    return f"{number:05d}-{seed}.png"


def write_png(image, path: Path, text: str, *, replace: bool) -> bool:
    """Write ``image`` atomically: a temporary file in the same folder, then renamed into place, so an
    interrupted run leaves no partial PNG and never removes an existing one. Without ``replace`` an existing
    ``path`` is kept and False is returned (a hard link, which fails when the name exists)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png.tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(temporary, path)
            return True
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        except OSError as e:  # file systems without hard links
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV) or path.exists():
                raise
            os.replace(temporary, path)
        return True
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


def save_images(images, texts: list[str], args) -> list[Path]:
    """Numbered files that never overwrite (default), or the fixed names of --overwrite; prints each path."""
    written = []
    if args.overwrite or _is_png_name(args.out):
        for image, path, text in zip(images, fixed_paths(args.out, len(images), args.seed), texts):
            if not write_png(image, path, text, replace=args.overwrite):
                raise FileExistsError(f"--out {path} appeared while generating; not replaced (pass --overwrite)")
            written.append(path)
            print(path)
        return written
    folder = Path(args.out)
    number = next_number(folder)
    for image, text, seed in zip(images, texts, inputs.image_seeds(args.seed, len(images))):
        while not write_png(image, folder / numbered_name(number, seed), text, replace=False):
            number += 1  # another run took this number meanwhile
        written.append(folder / numbered_name(number, seed))
        print(written[-1])
        number += 1
    return written
