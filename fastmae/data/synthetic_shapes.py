"""A labelled synthetic image set for checking that pretraining and fine-tuning learn: shapes and textures.

Design: each image is one class's pattern drawn in a random foreground colour on a random background colour, at a
random size and position, with mild Gaussian pixel noise. Colours are drawn independently of the class (and at
least ``MIN_CONTRAST`` apart), so only the pattern's form tells the classes apart: a colour histogram classifies
at chance. Shapes are placed away from the border so the evaluation's center crop (87.5%) keeps them whole.

Every image is a pure function of ``(seed, split, class, index)``: its generator is seeded with those four numbers
(``numpy.random.SeedSequence``), so a tree is the same on every machine and run, the first ``n`` images of a class
do not depend on how many are asked for, and train and val never share an image. Patterns are rendered at
``SUPERSAMPLE`` times the size and box-filtered down (anti-aliased edges), then noise is added and the result
rounded to ``uint8``.

``shapes_dataset(root, ...)`` writes ``root/train/<class>/<i>.png``, ``root/val/<class>/<i>.png`` and optionally
``root/pretrain/<class>/<i>.png`` (a larger set, labels unused, holding the train images), ImageFolder trees as
``fastmae pretrain --data`` and ``fastmae finetune --data/--val`` read them, and returns the folders;
``render(...)`` gives one image as an array.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SUPERSAMPLE = 4  # patterns are drawn at 4x the size, then box-filtered down
MIN_CONTRAST = 120.0  # minimum Euclidean distance between the foreground and background RGB colours (0-255)
NOISE_STD = 6.0  # Gaussian pixel noise, in 0-255 units
SPLITS = {"train": 0, "val": 1}  # the split's number in each image's seed
FORMAT_VERSION = 1  # part of every image's seed: bump when rendering changes

# A pattern: (generator, y, x) -> boolean foreground mask. y, x are (H, W) pixel-centre coordinates in [0, 1).
Pattern = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


def _centre(rng: np.random.Generator, half: float) -> tuple[float, float]:
    """A random centre for an object of half-size ``half`` (fractions of the image), at least 0.08 from the edge."""
    lo, hi = 0.08 + half, 0.92 - half
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _disc(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    r = rng.uniform(0.16, 0.3)
    cy, cx = _centre(rng, r)
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def _ring(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    r = rng.uniform(0.2, 0.32)
    width = rng.uniform(0.3, 0.45) * r
    cy, cx = _centre(rng, r)
    d2 = (y - cy) ** 2 + (x - cx) ** 2
    return (d2 <= r * r) & (d2 >= (r - width) ** 2)


def _square(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    h = rng.uniform(0.14, 0.27)  # half the side
    cy, cx = _centre(rng, h)
    return (np.abs(y - cy) <= h) & (np.abs(x - cx) <= h)


def _triangle(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """An upright isosceles triangle (apex up; survives horizontal flips)."""
    h = rng.uniform(0.18, 0.32)  # half the height and half the base
    cy, cx = _centre(rng, h)
    top, bottom = cy - h, cy + h
    half_width = h * (y - top) / (bottom - top)  # 0 at the apex, h at the base
    return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)


def _cross(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A plus sign: two bars of equal length through one centre."""
    h = rng.uniform(0.2, 0.32)
    t = rng.uniform(0.25, 0.4) * h  # half the bar's thickness
    cy, cx = _centre(rng, h)
    dy, dx = np.abs(y - cy), np.abs(x - cx)
    return ((dy <= h) & (dx <= t)) | ((dx <= h) & (dy <= t))


def _texture_window(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """A square window of half-size 0.25-0.4 (the texture is drawn inside it) and the texture's period."""
    h = rng.uniform(0.25, 0.4)
    cy, cx = _centre(rng, h)
    window = (np.abs(y - cy) <= h) & (np.abs(x - cx) <= h)
    return window, float(rng.uniform(0.12, 0.2))


def _stripes_h(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    window, period = _texture_window(rng, y, x)
    return window & (((y / period + rng.uniform()) % 1.0) < 0.5)


def _stripes_v(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    window, period = _texture_window(rng, y, x)
    return window & (((x / period + rng.uniform()) % 1.0) < 0.5)


def _checker(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    window, period = _texture_window(rng, y, x)
    phase_y, phase_x = rng.uniform(size=2)
    return window & ((((y / period + phase_y) % 1.0) < 0.5) ^ (((x / period + phase_x) % 1.0) < 0.5))


PATTERNS: dict[str, Pattern] = {
    "disc": _disc, "ring": _ring, "square": _square, "triangle": _triangle, "cross": _cross,
    "stripes_h": _stripes_h, "stripes_v": _stripes_v, "checker": _checker,
}
CLASSES: tuple[str, ...] = tuple(PATTERNS)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB colours (float, 0-255), at least ``MIN_CONTRAST`` apart."""
    while True:
        fg, bg = rng.uniform(0, 255, size=(2, 3))
        if np.linalg.norm(fg - bg) >= MIN_CONTRAST:
            return fg, bg


def _check_args(img_size: int, classes: Sequence[str], seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 8:
        raise ValueError(f"img_size must be an int >= 8, got {img_size!r}")
    if isinstance(classes, str) or not classes:
        raise TypeError(f"classes must be a non-empty sequence of names from {list(CLASSES)}, got {classes!r}")
    unknown = [c for c in classes if c not in PATTERNS]
    if unknown or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names from {list(CLASSES)}, got {list(classes)!r}")


def render(class_name: str, img_size: int, seed: int, split: str = "train", index: int = 0) -> np.ndarray:
    """Image ``index`` of class ``class_name`` in ``split`` of the set seeded ``seed``: ``(img_size, img_size, 3)``
    uint8 RGB."""
    _check_args(img_size, [class_name], seed)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be an int >= 0, got {index!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence(
        [FORMAT_VERSION, seed, SPLITS[split], CLASSES.index(class_name), index]))
    big = img_size * SUPERSAMPLE
    coords = (np.arange(big) + 0.5) / big
    y, x = np.meshgrid(coords, coords, indexing="ij")  # (big, big) each
    mask = PATTERNS[class_name](rng, y, x)  # (big, big) bool
    fg, bg = _colours(rng)
    image = np.where(mask[..., None], fg, bg)  # (big, big, 3)
    image = image.reshape(img_size, SUPERSAMPLE, img_size, SUPERSAMPLE, 3).mean(axis=(1, 3))  # (S, S, 3) box filter
    image = image + rng.normal(0.0, NOISE_STD, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def shapes_dataset(root: str | os.PathLike, n_per_class: int, img_size: int = 32, seed: int = 0,
                   classes: Sequence[str] = CLASSES, n_val_per_class: int | None = None,
                   n_pretrain_per_class: int | None = None) -> dict[str, Path]:
    """Write the ImageFolder trees of the set and return them by split name.

    - ``root/train``: ``n_per_class`` labelled PNGs per class (images ``0 .. n_per_class - 1`` of the train split);
    - ``root/val``: ``n_val_per_class`` per class (default a quarter of ``n_per_class``, at least 1), never in train;
    - with ``n_pretrain_per_class`` (>= ``n_per_class``): ``root/pretrain``, images ``0 .. n_pretrain_per_class - 1``
      of the train split, for pretraining without labels (a superset of ``train``: the semi-supervised setting where
      the labelled images are a few of the pretraining images). Its class folders are only a layout.

    A ``root`` whose ``manifest.txt`` records the same arguments is reused as it is; another ``root`` must not
    exist, be empty, or hold a tree written by this function with other arguments (it is replaced). The trees are
    written in a temporary folder and renamed into place, so an interrupted run never leaves a partial tree.
    """
    _check_args(img_size, classes, seed)
    for name, value, optional in (("n_per_class", n_per_class, False), ("n_val_per_class", n_val_per_class, True),
                                  ("n_pretrain_per_class", n_pretrain_per_class, True)):
        if not (optional and value is None) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be an int >= 1{' (or None)' if optional else ''}, got {value!r}")
    if n_pretrain_per_class is not None and n_pretrain_per_class < n_per_class:
        raise ValueError(f"n_pretrain_per_class must be at least n_per_class ({n_per_class}): the pretraining images "
                         f"include the labelled ones, got {n_pretrain_per_class}")
    n_val = max(1, n_per_class // 4) if n_val_per_class is None else n_val_per_class
    counts = {"train": n_per_class, "val": n_val}
    if n_pretrain_per_class is not None:
        counts["pretrain"] = n_pretrain_per_class
    root = Path(root)
    manifest = (f"fastmae synthetic shapes v{FORMAT_VERSION}: img_size {img_size}, seed {seed}, images per class "
                f"{counts}, classes {','.join(classes)}\n")
    splits = {split: root / split for split in counts}
    if (root / "manifest.txt").is_file():
        if (root / "manifest.txt").read_text() == manifest and all(p.is_dir() for p in splits.values()):
            return splits
        shutil.rmtree(root)  # ours, written with other arguments
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"root must be a new or empty folder (or one written by shapes_dataset), got {str(root)!r}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shapes-", dir=root.parent))
    try:
        for name in classes:
            for split in counts:
                (tmp / split / name).mkdir(parents=True)
            for i in range(max(counts["train"], counts.get("pretrain", 0))):  # the train split's stream
                image = Image.fromarray(render(name, img_size, seed, "train", i))
                for split in ("train", "pretrain"):
                    if i < counts.get(split, 0):
                        image.save(tmp / split / name / f"{i:04d}.png")
            for i in range(n_val):
                Image.fromarray(render(name, img_size, seed, "val", i)).save(tmp / "val" / name / f"{i:04d}.png")
        (tmp / "manifest.txt").write_text(manifest)
        if root.exists():
            root.rmdir()  # empty (checked above)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return splits
