"""Write an ImageNet-like JPEG set for loader and training checks: ``OUT_DIR/class_XXX/NNNNNN.jpg``.

    python bench/make_jpeg_set.py OUT_DIR --count 5000 [--classes 10] [--quality 90] [--seed 0] [--workers N]

Why these images: a loader's cost is the JPEG decode, which depends on the pixel count and on the
entropy of the content. So the sizes are ImageNet's usual ones (``SIZES``: 500x375 mostly, with
portrait, 3:2, square and 16:9 images mixed in, chosen per image with fixed weights), the quality is
90 with PIL's default 4:2:0 chroma subsampling, and the content is a sum of smooth random fields at
three scales (64, 16 and 4 px cells, bicubic-upsampled Gaussian noise, partly shared between the
colour channels as natural images are) plus per-pixel sensor-like noise: files of 75-135 KiB, 103 KiB
on average (ImageNet's training images average ~110 KB), where flat colours would be a few KB and
white noise several times too large. About 20 ms an image on one core: 5,000 in ~7 s on 16 cores.

Image ``i`` is a function of ``(seed, i)`` alone, so a set is the same whichever worker wrote it.
``count`` images go round-robin into ``classes`` folders. The set is written by ``workers``
processes (default: every core) into a temporary folder that is renamed into place; ``OUT_DIR`` must
not exist, unless it holds a set written with the same settings (its ``.manifest.json``; hidden, so
the loaders skip it), which is then reused as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

# (width, height) and weight: ImageNet's common shapes (its median image is 500x375, then 375x500)
SIZES: tuple[tuple[tuple[int, int], float], ...] = (
    ((500, 375), 0.55), ((375, 500), 0.15), ((500, 333), 0.12), ((500, 500), 0.10), ((500, 281), 0.08),
)
FIELDS = ((64, 40.0), (16, 28.0), (4, 24.0))  # (cell size in px, amplitude in grey levels) of the smooth fields
PIXEL_NOISE = 18.0  # grey levels of independent per-pixel noise
SHARED = 0.6  # the fraction of each field shared by the three channels (the rest is per channel)
MANIFEST = ".manifest.json"


def image_size(seed: int, index: int) -> tuple[int, int]:
    """``(width, height)`` of image ``index``: one of ``SIZES``, drawn with their weights."""
    shapes, weights = zip(*SIZES)
    pick = np.random.default_rng([seed, index, 1]).choice(len(shapes), p=np.array(weights) / sum(weights))
    return shapes[pick]


def _smooth_field(rng: np.random.Generator, width: int, height: int, cell: int) -> np.ndarray:
    """``(height, width)`` float32 Gaussian noise on a grid of ``cell`` px, bicubic-upsampled: a smooth field."""
    grid = rng.standard_normal((math.ceil(height / cell) + 1, math.ceil(width / cell) + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC))


def render(seed: int, index: int) -> Image.Image:
    """Image ``index`` of the set ``seed`` (module docstring): an RGB ``PIL.Image`` of ``image_size(seed, index)``."""
    width, height = image_size(seed, index)
    rng = np.random.default_rng([seed, index, 2])
    pixels = np.full((height, width, 3), 128.0, dtype=np.float32)  # (H, W, 3)
    for cell, amplitude in FIELDS:
        shared = _smooth_field(rng, width, height, cell)
        for channel in range(3):
            own = _smooth_field(rng, width, height, cell)
            pixels[:, :, channel] += amplitude * (SHARED * shared + (1 - SHARED) * own)
    pixels += PIXEL_NOISE * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def relative_path(index: int, classes: int) -> Path:
    """Where image ``index`` goes: ``class_{index % classes:03d}/{index:06d}.jpg``."""
    return Path(f"class_{index % classes:03d}") / f"{index:06d}.jpg"


def _write(job: tuple[Path, int, int, int, int]) -> int:
    """Write one image (``(folder, seed, index, classes, quality)``); its size in bytes."""
    folder, seed, index, classes, quality = job
    path = folder / relative_path(index, classes)
    render(seed, index).save(path, format="JPEG", quality=quality)
    return path.stat().st_size


def make_jpeg_set(out_dir: str | os.PathLike, count: int, classes: int = 10, quality: int = 90, seed: int = 0,
                  workers: int | None = None) -> dict:
    """Write the set (module docstring) to ``out_dir``; its manifest (the settings, the mean file size and the
    seconds it took). An ``out_dir`` already holding the same set is reused; any other existing one is a
    ``ValueError``."""
    for name, value, low in (("count", count, 1), ("classes", classes, 1), ("quality", quality, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if quality > 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    if classes > count:
        raise ValueError(f"classes must be <= count (every class folder gets an image), got {classes} > {count}")
    out = Path(out_dir)
    settings = {"count": count, "classes": classes, "quality": quality, "seed": seed}
    if out.exists():
        try:
            manifest = json.loads((out / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            manifest = None
        if manifest is not None and {k: manifest.get(k) for k in settings} == settings:
            return manifest
        raise ValueError(f"{str(out)!r} exists and holds no set written with {settings}; give a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    start = time.perf_counter()
    try:
        for k in range(classes):
            (tmp / f"class_{k:03d}").mkdir()
        jobs = [(tmp, seed, i, classes, quality) for i in range(count)]
        processes = max(1, min(workers or os.cpu_count() or 1, count))
        if processes == 1:
            sizes = [_write(job) for job in jobs]
        else:
            with Pool(processes) as pool:
                sizes = pool.map(_write, jobs, chunksize=max(1, count // (8 * processes)))
        manifest = {**settings, "mean_bytes": round(sum(sizes) / count),
                    "seconds": round(time.perf_counter() - start, 2), "processes": processes}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=5000, help="images [default %(default)s]")
    parser.add_argument("--classes", type=int, default=10, help="class folders [default %(default)s]")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality [default %(default)s]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes [default: every core]")
    args = parser.parse_args(argv)
    existed = args.out_dir.exists()
    try:
        m = make_jpeg_set(args.out_dir, args.count, args.classes, args.quality, args.seed, args.workers)
    except ValueError as exc:
        print(f"make_jpeg_set: {exc}", file=sys.stderr)
        return 2
    print(f"make_jpeg_set: {m['count']} JPEGs (quality {m['quality']}, {m['classes']} classes, "
          f"{m['mean_bytes'] / 1024:.0f} KiB on average) in {args.out_dir}, "
          + ("reused: written earlier" if existed else "written")
          + f" in {m['seconds']} s by {m['processes']} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
