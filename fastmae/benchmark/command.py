"""The ``fastmae bench`` command line: its flags, the run, the table, ``--compare``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastmae.benchmark.inputs import INPUT_MODES
from fastmae.benchmark.registry import ALL_IMPLS, DEFAULT_IMPLS, default_baselines_dir
from fastmae.benchmark.report import format_table
from fastmae.benchmark.results import REGRESSION_THRESHOLD, compare_rows, format_comparisons, read_rows
from fastmae.benchmark.run import DEFAULT_BATCH, DEFAULT_MODELS, BenchConfig, run_bench
from fastmae.model import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastmae bench`` flags."""
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated presets, from {sorted(PRESETS)} [default %(default)s]")
    parser.add_argument("--batch-size", default=str(DEFAULT_BATCH),
                        help="one batch size for every model, or a comma-separated one per model [default %(default)s]")
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                        help=f"comma-separated implementations, from {list(ALL_IMPLS)} [default %(default)s]")
    parser.add_argument("--img-size", type=int, default=224, help="input resolution [default %(default)s]")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row [default %(default)s]")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning) "
                                                              "[default %(default)s]")
    parser.add_argument("--input", default="synthetic",
                        help=f"comma-separated input modes from {list(INPUT_MODES)}: synthetic images already on the "
                             "device, or the JPEG loader end to end [default %(default)s]")
    parser.add_argument("--results-dir", default="bench/results",
                        help="folder of the per-GPU CSV files [default %(default)s]")
    parser.add_argument("--compare", metavar="OLD.csv",
                        help="compare this run's rows with OLD.csv; a row more than 5%% slower is a regression "
                             "(exit code 1)")
    parser.add_argument("--against", metavar="NEW.csv",
                        help="with --compare: compare NEW.csv with OLD.csv instead of running anything")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no new row after this many seconds (rows already written stay)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu [default: cuda when available]")
    parser.add_argument("--baselines", default=None,
                        help="folder holding the baselines' steps.py [default: bench/baselines beside the package]")
    parser.add_argument("--data", default=None,
                        help="image folder for --input loader [default: JPEGs generated from the demo photos]")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader worker processes [default: cores - 1, at most 16]")


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    try:
        batch_sizes = tuple(int(b) for b in _names(args.batch_size))
    except ValueError:
        raise ValueError(f"--batch-size must be an int or comma-separated ints, got {args.batch_size!r}") from None
    return BenchConfig(
        models=_names(args.models), impls=_names(args.impls), batch_sizes=batch_sizes, img_size=args.img_size,
        steps=args.steps, warmup=args.warmup, inputs=_names(args.input), results_dir=Path(args.results_dir),
        device=args.device, max_seconds=args.max_seconds,
        baselines_dir=Path(args.baselines) if args.baselines else default_baselines_dir(),
        data_dir=Path(args.data) if args.data else None, loader_workers=args.workers,
    )


def _compare(old_path: str, new_rows: list[dict[str, str]]) -> int:
    if not Path(old_path).is_file():
        raise ValueError(f"--compare: no such file {old_path!r}")
    comparisons = compare_rows(read_rows(old_path), new_rows)
    print(format_comparisons(comparisons))
    regressions = [c for c in comparisons if c.is_regression(REGRESSION_THRESHOLD)]
    if regressions:
        print(f"fastmae bench: {len(regressions)} regression(s) against {old_path}")
    return 1 if regressions else 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``fastmae bench``: 0 when every row ran (or was skipped/oom) and nothing regressed, else 1; 2 on bad flags."""
    try:
        if args.against:
            if not args.compare:
                raise ValueError("--against NEW.csv needs --compare OLD.csv")
            if not Path(args.against).is_file():
                raise ValueError(f"--against: no such file {args.against!r}")
            return _compare(args.compare, read_rows(args.against))
        cfg = config_from_args(args)
        if args.compare and not Path(args.compare).is_file():
            raise ValueError(f"--compare: no such file {args.compare!r}")
    except ValueError as exc:
        print(f"fastmae bench: {exc}", file=sys.stderr)
        return 2
    rows, csv_path = run_bench(cfg, log=lambda line: print(line, flush=True))
    print()
    print(format_table(rows))
    failed = [r for r in rows if str(r["status"]).startswith("error")]
    print(f"\nfastmae bench: {len(rows)} rows ({len(failed)} failed) -> {csv_path}")
    code = 1 if failed else 0
    if args.compare:
        measured = [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]
        code = max(code, _compare(args.compare, measured))
    return code
