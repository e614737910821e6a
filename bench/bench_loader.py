"""Images per second of each pretraining-loader backend on a generated ImageNet-like JPEG set.

    python bench/bench_loader.py [--backends dali torch] [--images 2000] [--batch-size 256]
                                 [--img-size 224] [--batches 60] [--device cuda] [--csv FILE] [--data-dir DIR]

The set: ``--data-dir``, or ``--images`` ImageNet-like JPEGs written by bench/make_jpeg_set.py (ImageNet's
sizes around 500x375, quality 90, content with a photo's entropy, ~103 KiB a file) once below the
fastmae cache (``$FASTMAE_CACHE``, default ``~/.cache/fastmae``) and reused.

Each backend runs the full pretraining pipeline (decode, RandomResizedCrop, flip, normalise, to the
device): ``--warmup-s`` seconds of batches first (pipeline and worker start, and the batches the
workers prefetched meanwhile, which would inflate a short measurement), then ``--batches`` timed
ones, ending with a device synchronisation. ``cores_busy`` is the CPU time all cores spent busy during the
timed batches over their wall time (``/proc/stat``, machine-wide: DataLoader workers are other processes,
DALI's threads are this one's; empty where ``/proc/stat`` cannot be read), beside ``cpus``, the cores there
are. One row per backend is printed and upserted into the CSV
(default ``bench/results/<gpu>-loader.csv``), keyed by backend, device, batch size and image size.
Target (docs/DESIGN.md): DALI >= 4,000 img/s at 224 px on one H100 with 16 cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

import torch

from fastmae.benchmark.results import gpu_slug, read_rows, write_csv_atomically
from fastmae.data import dali_available, pretrain_loader
from fastmae.data.demo import default_cache_dir

CSV_KEY = ("backend", "device", "batch", "img_size")


def default_set(count: int, seed: int = 0) -> Path:
    """The ImageNet-like set of ``count`` JPEGs (bench/make_jpeg_set.py) below the fastmae cache, written on
    first use and reused after."""
    from make_jpeg_set import make_jpeg_set  # bench/ is the script's folder, first on the path

    root = default_cache_dir() / f"bench-jpeg-{count}-s{seed}"
    make_jpeg_set(root, count, seed=seed)
    return root


def cpu_busy_seconds() -> float | None:
    """CPU seconds all cores together have spent busy since boot (``/proc/stat``'s first line: user, nice,
    system, irq, softirq and steal; not idle or iowait), or ``None`` where ``/proc/stat`` cannot be read."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


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
    busy_start, start = cpu_busy_seconds(), time.perf_counter()
    for _ in range(batches):
        images = next(loader)
    sync()
    seconds = time.perf_counter() - start
    busy_end = cpu_busy_seconds()
    cores_busy = None if busy_start is None or busy_end is None else round((busy_end - busy_start) / seconds, 1)
    assert images.shape == (batch_size, 3, img_size, img_size)
    description = loader.describe()
    loader.close()
    return {"backend": backend, "device": device, "batch": batch_size, "img_size": img_size,
            "img_per_s": round(batches * batch_size / seconds, 1), "startup_s": round(first, 2),
            "cores_busy": "" if cores_busy is None else cores_busy, "loader": description}


def _environment(device: str) -> dict:
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    try:
        import nvidia.dali

        dali = nvidia.dali.__version__
    except ImportError:
        dali = ""
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
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

    root = args.data_dir if args.data_dir is not None else default_set(args.images)
    env = _environment(args.device)
    rows = []
    for backend in args.backends:
        if backend == "dali" and not dali_available():
            print("dali: skipped, NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
            continue
        row = {**measure(backend, root, args.batch_size, args.img_size, args.device, args.workers, args.warmup_s,
                         args.batches), **env}
        rows.append(row)
        print(f"{backend:6s} {row['img_per_s']:9.1f} img/s  {row['cores_busy']} of {row['cpus']} cores busy  "
              f"(start {row['startup_s']} s; {row['loader']})", flush=True)
    if rows:
        default = Path(__file__).parent / "results" / f"{gpu_slug(env['gpu'])}-loader.csv"
        path = args.csv if args.csv is not None else default
        upsert_rows(path, rows)
        print(f"rows written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
