"""Images per second of each pretraining-loader backend on a generated ImageNet-like JPEG set.

    python bench/bench_loader.py [--backends dali torch] [--images 2000] [--batch-size 256]
                                 [--img-size 224] [--batches 40] [--device cuda] [--csv FILE]

The set: ``--images`` JPEGs of about ImageNet's size (500x375, one in five 375x500, quality 95),
each a random crop of one of the demo photos (fastmae/data/demo.py) — natural content, which
decodes like real photos (random noise does not). It is written once below the fastmae cache
(``$FASTMAE_CACHE``, default ``~/.cache/fastmae``) and reused.

Each backend runs the full pretraining pipeline (decode, RandomResizedCrop, flip, normalise, to the
device): ``--warmup-s`` seconds of batches first (pipeline and worker start, and the batches the
workers prefetched meanwhile, which would inflate a short measurement), then ``--batches`` timed
ones, ending with a device synchronisation. One row per backend is printed and upserted into the CSV
(default ``bench/results/<gpu>-loader.csv``), keyed by backend, device, batch size and image size.
Target (docs/DESIGN.md): DALI >= 4,000 img/s at 224 px on one H100 with 16 cores.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import random
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from fastmae.benchmark.results import gpu_slug, read_rows, write_csv_atomically
from fastmae.data import dali_available, pretrain_loader
from fastmae.data.demo import DEMO_PHOTOS, default_cache_dir

SIZE = (500, 375)  # ImageNet's typical width x height
PORTRAIT_EVERY = 5  # one image in five is 375x500
CSV_KEY = ("backend", "device", "batch", "img_size")


def _write_image(photos: list[Image.Image], index: int, folder: Path, seed: int) -> int:
    """Image ``index``: a random 4:3 crop (35-100% of the largest) of a demo photo, resized to 500x375
    (or 375x500), saved as JPEG quality 95; returns its size in bytes."""
    rng = random.Random(seed * 1_000_003 + index)
    photo = photos[index % len(photos)]
    size = SIZE[::-1] if index % PORTRAIT_EVERY == 0 else SIZE
    scale = min(photo.width / size[0], photo.height / size[1]) * rng.uniform(0.35, 1.0) ** 0.5
    w, h = max(1, int(size[0] * scale)), max(1, int(size[1] * scale))
    left, top = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
    path = folder / f"{Path(DEMO_PHOTOS[index % len(photos)]).stem}" / f"{index:06d}.jpg"
    photo.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BICUBIC).save(path, quality=95)
    return path.stat().st_size


def imagenet_like_set(count: int, cache: Path | None = None, seed: int = 0) -> Path:
    """The folder of ``count`` ImageNet-like JPEGs (module docstring), written on first use."""
    cache = cache if cache is not None else default_cache_dir()
    root = cache / f"bench-jpeg-{SIZE[0]}x{SIZE[1]}-{count}-s{seed}"
    if root.is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-jpeg-", dir=cache))
    try:
        files = importlib.resources.files("skimage.data")
        photos = []
        for name in DEMO_PHOTOS:
            with Image.open(files / name) as photo:
                photos.append(photo.convert("RGB"))
            (tmp / Path(name).stem).mkdir()
        start = time.perf_counter()
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            sizes = list(pool.map(lambda i: _write_image(photos, i, tmp, seed), range(count)))
        print(f"wrote {count} JPEGs ({sum(sizes) / count / 1024:.0f} KiB each on average) in "
              f"{time.perf_counter() - start:.1f} s to {root}")
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def measure(backend: str, root: Path, batch_size: int, img_size: int, device: str, workers: int | None,
            warmup_s: float, batches: int) -> dict:
    """One row: the timed img/s of ``backend`` after ``warmup_s`` seconds of drawing batches (which
    also empties the queue of batches its workers prepared while it started)."""
    start = time.perf_counter()
    loader = pretrain_loader(root, batch_size, img_size, backend=backend, device=device, dtype=torch.bfloat16,
                             num_workers=workers)
    next(loader)
    first = time.perf_counter() - start
    while time.perf_counter() - start < first + warmup_s:
        next(loader)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(batches):
        images = next(loader)
    sync()
    seconds = time.perf_counter() - start
    assert images.shape == (batch_size, 3, img_size, img_size)
    description = loader.describe()
    loader.close()
    return {"backend": backend, "device": device, "batch": batch_size, "img_size": img_size,
            "img_per_s": round(batches * batch_size / seconds, 1), "startup_s": round(first, 2),
            "loader": description}


def _environment(device: str) -> dict:
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    try:
        import nvidia.dali

        dali = nvidia.dali.__version__
    except ImportError:
        dali = ""
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"gpu": gpu, "cpus": os.cpu_count(), "torch": torch.__version__, "dali": dali, "git": git}


def upsert_rows(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` into the CSV at ``path``, replacing rows with the same ``CSV_KEY`` values; atomically
    (a temporary file renamed into place), so a run killed mid-write keeps the old rows."""
    key = lambda row: tuple(str(row[k]) for k in CSV_KEY)  # noqa: E731
    old = read_rows(path)
    fresh = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in fresh] + rows
    fields = list(dict.fromkeys(f for r in merged for f in r))
    write_csv_atomically(path, fields, merged)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["dali", "torch"], choices=["dali", "torch"])
    parser.add_argument("--images", type=int, default=2000, help="images in the generated set")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=60, help="timed batches")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="seconds of untimed batches first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers / DALI threads")
    parser.add_argument("--data-dir", type=Path, default=None, help="benchmark these images instead")
    parser.add_argument("--csv", type=Path, default=None, help="default bench/results/<gpu>-loader.csv")
    args = parser.parse_args(argv)

    root = args.data_dir if args.data_dir is not None else imagenet_like_set(args.images)
    env = _environment(args.device)
    rows = []
    for backend in args.backends:
        if backend == "dali" and not dali_available():
            print("dali: skipped, NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
            continue
        row = {**measure(backend, root, args.batch_size, args.img_size, args.device, args.workers, args.warmup_s,
                         args.batches), **env}
        rows.append(row)
        print(f"{backend:6s} {row['img_per_s']:9.1f} img/s  (start {row['startup_s']} s; {row['loader']})", flush=True)
    if rows:
        default = Path(__file__).parent / "results" / f"{gpu_slug(env['gpu'])}-loader.csv"
        path = args.csv if args.csv is not None else default
        upsert_rows(path, rows)
        print(f"rows written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
