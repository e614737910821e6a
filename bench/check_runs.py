"""Checkers for bench/device_check.sh's ``large`` step set: they read what runs left behind (``metrics.jsonl``,
checkpoints, logs, results CSVs) and exit 1 with the reason when a check fails, 0 when it holds.

    python bench/check_runs.py losses REF RUN [RUN ...] [--rtol R] [--atol A]
        every step REF logged has the same loss in each RUN, within |run - ref| <= atol + rtol * |ref|
        (rtol 0 and atol 0: bit for bit). RUN's metrics.jsonl may hold a step twice (logged before a
        preemption and again after the resume): the last row counts, as fastmae pretrain keeps it.
    python bench/check_runs.py nonfinite RUN --log LOG --exit-code RC --max-nonfinite M [--host-skip-ok]
        a run with NaN injected from some step on stopped as it should: exit code 3 (EXIT_NONFINITE), the
        log names the M consecutive skipped steps, the skips happened on the device (no "host sync per step"
        in the log; ``--host-skip-ok`` allows them on the host, as a CPU run's foreach AdamW must), and the
        newest checkpoint's weights are all finite.
    python bench/check_runs.py throughput RUN --csv CSV --model M --impl I --batch B [--min-ratio F]
        the training run's img/s (median of its logged intervals after the first, which holds start-up)
        against the ``fastmae bench`` rows of the same model, implementation and batch in CSV, one per input
        mode; fails when the run reaches less than F of the synthetic-input row.
    python bench/check_runs.py memory CSV --model M --batch B [--max-gib G]
        the peak memory of the ``fastmae`` and ``fastmae-actckpt`` rows: activation checkpointing must need
        less, and ``fastmae`` at most G GiB (DESIGN.md: ViT-H at batch 256 fits in 80 GB without it).
        Rows without a peak (a CPU run) are reported and pass.

Each checker prints what it compared, so the log of a device run shows the numbers, not only the verdict.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

EXIT_NONFINITE = 3  # fastmae.train.exit_codes.EXIT_NONFINITE (kept importable without torch; a test ties them)


class CheckFailed(Exception):
    """A check did not hold; the message says what was expected and what was found."""


def read_metrics(run: str | Path) -> list[dict]:
    """The rows of ``RUN/metrics.jsonl`` (one JSON object a line)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise CheckFailed(f"{path} does not exist: the run logged nothing")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise CheckFailed(f"{path}:{number} is not JSON ({exc})") from None
    return rows


def step_losses(run: str | Path) -> dict[int, float | None]:
    """``{step: loss}`` of a run; a step logged twice keeps its last row (the one after a resume)."""
    return {int(row["step"]): row.get("loss") for row in read_metrics(run)}


def compare_losses(ref: str | Path, runs: list[str | Path], rtol: float, atol: float) -> list[str]:
    """One line per run: how far its losses are from ``ref``'s; ``CheckFailed`` naming the first step beyond
    ``atol + rtol * |ref|`` (or missing, or non-finite)."""
    if rtol < 0 or atol < 0:
        raise ValueError(f"rtol and atol must be >= 0, got rtol {rtol}, atol {atol}")
    expected = step_losses(ref)
    if not expected:
        raise CheckFailed(f"{ref}: no logged step to compare with")
    lines = []
    for run in runs:
        got = step_losses(run)
        worst = 0.0
        for step, want in sorted(expected.items()):
            have = got.get(step)
            if want is None or have is None or not (math.isfinite(want) and math.isfinite(have)):
                raise CheckFailed(f"{run}: step {step} loss {have} vs {want} in {ref} (missing or not finite)")
            diff = abs(have - want)
            if diff > atol + rtol * abs(want):
                raise CheckFailed(f"{run}: step {step} loss {have!r} differs from {ref}'s {want!r} by {diff:.3g} "
                                  f"(> {atol:g} + {rtol:g} x |ref|)")
            worst = max(worst, diff / abs(want) if want else diff)
        lines.append(f"{run}: steps {min(expected)}-{max(expected)} match {ref} "
                     f"(largest relative difference {worst:.3g}; allowed rtol {rtol:g}, atol {atol:g})")
    return lines


def check_nonfinite(run: str | Path, log: str | Path, exit_code: int, max_nonfinite: int,
                    host_skip_ok: bool = False) -> list[str]:
    """The NaN-injection run stopped as ``fastmae pretrain`` promises (module docstring)."""
    import torch

    from fastmae.train.checkpoint import list_checkpoints

    text = Path(log).read_text(errors="replace")
    if exit_code != EXIT_NONFINITE:
        raise CheckFailed(f"exit code {exit_code}, expected {EXIT_NONFINITE} (stopped after non-finite steps); "
                          f"log tail: {text[-600:]!r}")
    streak = f"{max_nonfinite} consecutive steps skipped"
    if streak not in text:
        raise CheckFailed(f"the log does not say {streak!r}; log tail: {text[-600:]!r}")
    host_skip = "host sync per step" in text
    if host_skip and not host_skip_ok:
        raise CheckFailed("the optimizer skips on the host (the log says 'host sync per step'), expected torch's "
                          "fused AdamW skipping on the device")
    checkpoints = list_checkpoints(Path(run) / "checkpoints")
    if not checkpoints:
        raise CheckFailed(f"{run}/checkpoints holds no complete checkpoint (the last good state)")
    newest = checkpoints[-1]
    if not newest.is_file():
        raise CheckFailed(f"{newest} is a sharded checkpoint; this checker reads one-file checkpoints")
    weights = torch.load(newest, map_location="cpu", weights_only=True)["model"]
    bad = [name for name, value in weights.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise CheckFailed(f"{newest}: non-finite weights in {bad[:5]}")
    where = "on the host (allowed here)" if host_skip else "on the device (no host sync)"
    return [f"exit code {exit_code}; the log says {streak!r}; the skips ran {where}; "
            f"{newest.name} ({len(weights)} tensors) is finite"]


def _bench_rows(csv_path: str | Path, model: str, impl: str, batch: int) -> list[dict[str, str]]:
    from fastmae.benchmark.results import read_rows

    return [r for r in read_rows(csv_path) if (r["model"], r["impl"], r["batch"]) == (model, impl, str(batch))
            and r["status"] == "ok" and r.get("img_per_s")]


def check_throughput(run: str | Path, csv_path: str | Path, model: str, impl: str, batch: int,
                     min_ratio: float) -> list[str]:
    """The training run's img/s against the bench rows of the same step (module docstring)."""
    rates = [row["img_per_s"] for row in read_metrics(run)[1:] if row.get("img_per_s")]
    if not rates:
        raise CheckFailed(f"{run}: fewer than two logged intervals; log more often (--log-every) or run longer")
    trained = statistics.median(rates)
    rows = {r["input"]: float(r["img_per_s"]) for r in _bench_rows(csv_path, model, impl, batch)}
    if "synthetic" not in rows:
        raise CheckFailed(f"{csv_path} has no ok synthetic-input row of {impl} {model} batch {batch}")
    lines = [f"{run}: training (its loader) {trained:.1f} img/s, median of {len(rates)} intervals"]
    lines += [f"  fastmae bench {impl} {model} batch {batch}, input {mode}: {rate:.1f} img/s "
              f"(training reaches {trained / rate:.2f}x)" for mode, rate in sorted(rows.items())]
    if trained < min_ratio * rows["synthetic"]:
        raise CheckFailed("\n".join(lines) + f"\ntraining reaches {trained / rows['synthetic']:.2f}x the synthetic-"
                          f"input step, below {min_ratio:g}x")
    return lines


def check_memory(csv_path: str | Path, model: str, batch: int, max_gib: float) -> list[str]:
    """Peak memory of ``fastmae`` against ``fastmae-actckpt`` at ``batch`` (module docstring)."""
    peaks = {}
    for impl in ("fastmae", "fastmae-actckpt"):
        rows = _bench_rows(csv_path, model, impl, batch)
        if not rows:
            raise CheckFailed(f"{csv_path} has no ok row of {impl} {model} batch {batch}")
        peaks[impl] = rows[0].get("peak_mem_gib") or None
    if None in peaks.values():
        return [f"{model} batch {batch}: no peak memory in the rows (a CPU run measures none); nothing to compare"]
    plain, ckpt = float(peaks["fastmae"]), float(peaks["fastmae-actckpt"])
    line = f"{model} batch {batch}: peak {plain:.1f} GiB, {ckpt:.1f} GiB with activation checkpointing"
    if not ckpt < plain:
        raise CheckFailed(line + ": activation checkpointing does not lower the peak")
    if plain > max_gib:
        raise CheckFailed(line + f": more than {max_gib:g} GiB without activation checkpointing")
    return [line + f" (limit {max_gib:g} GiB without it)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    p = sub.add_parser("losses")
    p.add_argument("ref")
    p.add_argument("runs", nargs="+")
    p.add_argument("--rtol", type=float, default=0.0)
    p.add_argument("--atol", type=float, default=0.0)
    p = sub.add_parser("nonfinite")
    p.add_argument("run")
    p.add_argument("--log", required=True)
    p.add_argument("--exit-code", type=int, required=True)
    p.add_argument("--max-nonfinite", type=int, required=True)
    p.add_argument("--host-skip-ok", action="store_true", help="allow the skips on the host (a CPU run)")
    p = sub.add_parser("throughput")
    p.add_argument("run")
    p.add_argument("--csv", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--impl", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--min-ratio", type=float, default=0.8)
    p = sub.add_parser("memory")
    p.add_argument("csv")
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--max-gib", type=float, default=80.0)
    args = parser.parse_args(argv)
    try:
        if args.check == "losses":
            lines = compare_losses(args.ref, args.runs, args.rtol, args.atol)
        elif args.check == "nonfinite":
            lines = check_nonfinite(args.run, args.log, args.exit_code, args.max_nonfinite, args.host_skip_ok)
        elif args.check == "throughput":
            lines = check_throughput(args.run, args.csv, args.model, args.impl, args.batch, args.min_ratio)
        else:
            lines = check_memory(args.csv, args.model, args.batch, args.max_gib)
    except CheckFailed as exc:
        print(f"check_runs {args.check}: FAILED: {exc}")
        return 1
    print("\n".join(lines))
    print(f"check_runs {args.check}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
