"""The bad-file policy: every file is checked once, up front, before any batch is made.

A file is bad when it is empty, is not an image (or is one no backend decodes), is truncated, or
its header (or, with ``check="decode"``, its compressed data) is damaged. PNG, grayscale, CMYK,
RGBA and images smaller than the crop are good: both backends convert them to RGB and upsample.

- ``on_bad_file="error"`` (default): bad files stop the run, each named (the first ``LISTED_BAD_FILES`` in
  sorted order, then their count).
- ``on_bad_file="skip"``: bad files are left out of the dataset; each is logged (logger
  ``fastmae.data``) with its reason, their count is logged, and more than ``max_skip_fraction`` of
  bad files stops the run over a broken dataset.

``check="header"`` reads each file's header and its last KiB, about 0.05 ms a file: a JPEG or PNG
with its end marker there (a JPEG's EOI, a PNG's IEND chunk) is good; one without it is truncated
or has data appended after the end (cameras append some), so it is decoded, and is bad only if
that fails. ``check="decode"`` decodes every file (JPEGs at 1/8 scale), about 1 ms a file. Files
are checked on a thread pool; under an initialised ``torch.distributed`` group each rank checks a
slice and the results are shared, so every rank leaves out the same files. A file damaged in a
way the check missed fails at decode, named.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fastmae.data.images import list_images, upright_size

log = logging.getLogger("fastmae.data")

BAD_FILE_POLICIES = ("error", "skip")
CHECKS = ("header", "decode")
DECODABLE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "WEBP", "TIFF", "PPM", "JPEG2000")  # by PIL and DALI alike
END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}  # MPO: a camera's multi-picture JPEG
TAIL_BYTES = 1024
LISTED_BAD_FILES = 20  # an error names this many bad files, then counts the rest
# how the errors name the settings: for ``fastmae pretrain`` and for PretrainConfig / these functions
SKIP_SETTING = "--on-bad-file skip (on_bad_file='skip')"
FRACTION_SETTING = "--max-skip-fraction (max_skip_fraction)"


class BadImageError(ValueError):
    """A bad image file stops the run (``on_bad_file="error"``), or too many were skipped."""


@dataclass
class ScannedImages:
    """The good files (sorted), their upright sizes ``(n, 2)`` (width, height), and the skipped ones."""

    files: list[Path]
    sizes: np.ndarray
    skipped: list[Path] = field(default_factory=list)


def check_image(path: Path, check: str = "header") -> tuple[int, int] | str:
    """The upright ``(width, height)`` of a good image, or why ``path`` is bad (module docstring)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as img:
            if img.format not in DECODABLE_FORMATS:
                return f"{img.format} images are not supported (only {', '.join(DECODABLE_FORMATS)})"
            size = upright_size(img)
            marker = END_MARKERS.get(img.format)
            unsure = marker is not None and not _ends_near_marker(path, marker)  # maybe truncated, maybe trailing data
            if unsure or check == "decode":
                error = _decode_error(img)
                if error is not None and unsure:
                    return (f"truncated {img.format} (no end marker {marker!r} in its last {TAIL_BYTES} bytes, "
                            f"and it does not decode: {error})")
                if error is not None:
                    return f"cannot decode: {error}"
    except Exception as exc:  # PIL raises many types for damaged or foreign files
        return f"cannot decode: {type(exc).__name__}: {exc}"
    if min(size) < 1:
        return f"empty image {size[0]}x{size[1]}"
    return size


def _ends_near_marker(path: Path, marker: bytes) -> bool:
    """Whether ``marker`` occurs in the last ``TAIL_BYTES`` bytes of the file at ``path``."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - TAIL_BYTES))
        return marker in f.read()


def _decode_error(img: Image.Image) -> str | None:
    """Why the open image ``img`` does not decode, or None when it does (JPEGs at 1/8 scale: all the
    compressed data is still read, the IDCT is cheap)."""
    try:
        if img.format in ("JPEG", "MPO"):
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    except Exception as exc:  # PIL raises many types for damaged data
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_all(files: list[Path], check: str, num_threads: int) -> list[tuple[int, int] | str]:
    with ThreadPoolExecutor(num_threads) as pool:
        return list(pool.map(lambda p: check_image(p, check), files, chunksize=64))


def _check_shared(files: list[Path], check: str, num_threads: int) -> list[tuple[int, int] | str]:
    """Every file's result; split over the ranks of an initialised torch.distributed group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _check_all(files, check, num_threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = _check_all(files[rank::world], check, num_threads)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    results: list = [None] * len(files)
    for r, part in enumerate(gathered):
        results[r::world] = part
    return results


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _listing(bad: list[tuple[Path, str]]) -> str:
    """One line per bad file, ``path: reason``, the first ``LISTED_BAD_FILES`` of them, then how many more."""
    lines = [f"  {str(path)!r}: {reason}" for path, reason in bad[:LISTED_BAD_FILES]]
    if len(bad) > LISTED_BAD_FILES:
        lines.append(f"  and {len(bad) - LISTED_BAD_FILES} more")
    return "\n".join(lines)


def scan_images(root: str | os.PathLike, on_bad_file: str = "error", max_skip_fraction: float = 0.01,
                check: str = "header", num_threads: int | None = None) -> ScannedImages:
    """Check every image file of ``root`` (a folder or a text file listing image paths, as
    ``list_images`` takes) and apply the bad-file policy (see the module docstring)."""
    if on_bad_file not in BAD_FILE_POLICIES:
        raise ValueError(f"on_bad_file must be one of {BAD_FILE_POLICIES}, got {on_bad_file!r}")
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
    files = list_images(root)
    threads = num_threads or min(32, 2 * (os.cpu_count() or 1))
    good, sizes, bad = [], [], []
    for path, result in zip(files, _check_shared(files, check, threads)):
        if isinstance(result, tuple):
            good.append(path)
            sizes.append(result)
        else:
            bad.append((path, result))
    if bad and on_bad_file == "error":
        raise BadImageError(f"{_count(len(bad), 'bad image file')} of {len(files)} in {str(root)!r} "
                            f"({SKIP_SETTING} leaves bad files out):\n{_listing(bad)}")
    for path, reason in bad:
        log.warning("skipping bad image file %s: %s", path, reason)
    skipped = [path for path, _ in bad]
    if skipped:
        fraction = len(skipped) / len(files)
        log.warning("skipped %d of %d image files of %s (%.2f%%)", len(skipped), len(files), root, 100 * fraction)
        if fraction > max_skip_fraction:
            raise BadImageError(f"{len(skipped)} of {len(files)} image files of {str(root)!r} are bad "
                                f"({100 * fraction:.2f}%), more than the {max_skip_fraction} that {FRACTION_SETTING} "
                                f"allows: is this the right dataset?\n{_listing(bad)}")
    return ScannedImages(good, np.array(sizes, dtype=np.int64).reshape(-1, 2), skipped)
