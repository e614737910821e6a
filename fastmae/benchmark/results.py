"""Benchmark results as CSV: one file per GPU, one row per measured configuration, upserted.

A row is identified by ``KEY`` (implementation, model, requested batch, image size, dtype, compile,
CUDA graph, input mode); writing a row replaces the row with the same key and keeps the others.
Every write goes to a temporary file that replaces the CSV in one ``os.replace``, so a run killed
mid-write never leaves a truncated file. Values are stored as text; a column that does not apply
(MFU on a CPU, say) is empty. ``kernels_per_step`` is the number of CUDA kernels one step launches
(``fastmae.benchmark.timing.count_kernels``); ``input_detail`` says which input the row had (the loader's
backend, workers, images and folder, or the synthetic batch).
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

COLUMNS = (
    "gpu", "impl", "model", "batch", "batch_used", "img_size", "mask_ratio", "dtype", "compile", "cuda_graph",
    "input", "steps", "img_per_s", "ms_per_step", "loss", "gflops_per_img", "mfu_measured", "mfu_spec",
    "matmul_tflops_measured", "spec_tflops", "peak_mem_gib", "kernels_per_step", "setup_s", "torch", "triton", "cuda",
    "git_rev", "date", "status", "input_detail",
)
KEY = ("impl", "model", "batch", "img_size", "dtype", "compile", "cuda_graph", "input")
CPU_ONLY_EMPTY = ("mfu_measured", "mfu_spec", "matmul_tflops_measured", "spec_tflops", "peak_mem_gib",
                  "kernels_per_step")
REGRESSION_THRESHOLD = 0.05  # a row more than 5% below the old img/s is a regression


def gpu_slug(gpu_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (the results file's stem)."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    if not slug:
        raise ValueError(f"gpu name {gpu_name!r} has no letters or digits to name a results file")
    return slug


def row_key(row: dict[str, str]) -> tuple[str, ...]:
    missing = [k for k in KEY if k not in row]
    if missing:
        raise ValueError(f"a results row needs the key columns {KEY}; missing {missing} in {row}")
    return tuple(str(row[k]) for k in KEY)


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a results CSV (an absent file has none)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def upsert_rows(path: str | os.PathLike, rows: Iterable[dict[str, object]]) -> None:
    """Write ``rows`` into the CSV at ``path``: replace rows with the same key, keep the others, atomically.
    A failed row (status other than ``ok``) never replaces a measured one: its numbers stay, and the
    failure is only in this run's table and exit code."""
    path = Path(path)
    merged = {row_key(r): r for r in read_rows(path)}
    for row in rows:
        text_row = {k: "" if v is None else str(v) for k, v in row.items()}
        old = merged.get(row_key(text_row))
        if text_row.get("status") != "ok" and old is not None and old.get("status") == "ok":
            continue
        merged[row_key(text_row)] = text_row
    extra = sorted({k for r in merged.values() for k in r} - set(COLUMNS))  # columns of an older/newer schema
    write_csv_atomically(path, [*COLUMNS, *extra], merged.values())


def write_csv_atomically(path: str | os.PathLike, fieldnames: list[str], rows: Iterable[dict[str, object]]) -> None:
    """Write ``rows`` (a header of ``fieldnames``, absent values empty) to a temporary file beside ``path``
    and ``os.replace`` it into place: a run killed mid-write leaves the old file whole. The file gets the
    old file's permission bits, or the usual ``0o666 & ~umask`` for a new one (not mkstemp's 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        mode = path.stat().st_mode & 0o777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@dataclass(frozen=True)
class Comparison:
    """One configuration measured in both files."""

    key: tuple[str, ...]
    old_img_per_s: float
    new_img_per_s: float

    @property
    def ratio(self) -> float:
        return self.new_img_per_s / self.old_img_per_s

    def is_regression(self, threshold: float = REGRESSION_THRESHOLD) -> bool:
        return self.ratio < 1.0 - threshold


def compare_rows(old: list[dict[str, str]], new: list[dict[str, str]]) -> list[Comparison]:
    """Every key with status ok and an img/s in both ``old`` and ``new``, in ``new``'s order."""
    old_ok = {row_key(r): float(r["img_per_s"]) for r in old if r.get("status") == "ok" and r.get("img_per_s")}
    out = []
    for r in new:
        key = row_key(r)
        if r.get("status") == "ok" and r.get("img_per_s") and key in old_ok and old_ok[key] > 0:
            out.append(Comparison(key, old_ok[key], float(r["img_per_s"])))
    return out


def format_comparisons(comparisons: list[Comparison], threshold: float = REGRESSION_THRESHOLD) -> str:
    """One line per comparison: the key, old and new img/s, the ratio, and ``REGRESSION`` where it is one."""
    if not comparisons:
        return "compare: no configuration with status ok in both files"
    lines = [f"compare: new / old img/s (regression: more than {threshold:.0%} slower)"]
    for c in comparisons:
        impl, model, batch, img_size, dtype, compile_, graph, input_ = c.key
        flag = "  REGRESSION" if c.is_regression(threshold) else ""
        lines.append(f"  {model:<32} {impl:<26} batch {batch:>4} {img_size}px {dtype} compile={compile_} "
                     f"graph={graph} {input_:<9} {c.old_img_per_s:9.1f} -> {c.new_img_per_s:9.1f}  "
                     f"x{c.ratio:.3f}{flag}")
    return "\n".join(lines)
