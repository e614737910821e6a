"""The ``fastmae bench`` command line: its flags, the run, the table, ``--compare``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastmae.benchmark.inputs import INPUT_MODES
from fastmae.benchmark.registry import TASK_IMPLS, TASKS
from fastmae.benchmark.report import format_table
from fastmae.benchmark.results import REGRESSION_THRESHOLD, compare_rows, format_comparisons, read_rows
from fastmae.benchmark.run import (CPU_DEFAULTS, DEFAULT_RESULTS_DIR, FINETUNE_CPU_DEFAULTS, FINETUNE_GPU_DEFAULTS,
                                   GPU_DEFAULTS, TASK_DEFAULTS, BenchConfig, run_bench)
from fastmae.model import PRESETS


def _default_help(gpu: object, cpu: object) -> str:
    return f"[default on CUDA: {gpu}; on a CPU: {cpu}]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastmae bench`` flags. Models, batch size, implementations, steps and warm-up default to
    the task's GPU set on a CUDA device and to a small set that runs in under a minute on a CPU."""
    gpu, cpu = GPU_DEFAULTS, CPU_DEFAULTS
    ft_gpu, ft_cpu = FINETUNE_GPU_DEFAULTS, FINETUNE_CPU_DEFAULTS
    finetune_defaults = _default_help(
        f"{','.join(ft_gpu.models)} at batch {ft_gpu.batch_size}, {','.join(ft_gpu.impls)}",
        f"{','.join(ft_cpu.models)} at batch {ft_cpu.batch_size}, {','.join(ft_cpu.impls)}")
    parser.add_argument("--task", default="pretrain", choices=TASKS,
                        help="pretrain: MAE pretraining steps (mae_* presets, mask ratio 0.75); finetune: end-to-end "
                             "fine-tuning steps of the ViT classifiers (vit_* presets, the official recipe: mixup/"
                             "cutmix, drop path, layer-decay AdamW) against timm's ViT, eager and compiled, on "
                             f"synthetic input; its defaults {finetune_defaults} [default %(default)s]")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated presets, from {sorted(PRESETS)} (pretrain) or the vit_* presets "
                             "(finetune) " + _default_help(",".join(gpu.models), ",".join(cpu.models)))
    parser.add_argument("--batch-size", default=None,
                        help="one batch size for every model, or a comma-separated one per model "
                             + _default_help(gpu.batch_size, cpu.batch_size))
    parser.add_argument("--impls", default=None,
                        help=f"comma-separated implementations, from {list(TASK_IMPLS['pretrain'])} (pretrain) or "
                             f"{list(TASK_IMPLS['finetune'])} (finetune) "
                             + _default_help(",".join(gpu.impls), ",".join(cpu.impls) + " (hf where transformers "
                                                                                          "is installed)"))
    parser.add_argument("--img-size", type=int, default=224, help="input resolution [default %(default)s]")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per row " + _default_help(gpu.steps, cpu.steps))
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation, autotuning) "
                                                                 + _default_help(gpu.warmup, cpu.warmup))
    parser.add_argument("--input", default="synthetic",
                        help=f"comma-separated input modes from {list(INPUT_MODES)}: synthetic images already on the "
                             "device, or fastmae's pretraining loader end to end on the --data folder (loader: DALI "
                             "when installed, else torch; loader-dali, loader-torch: that backend); each row says "
                             "which input it had in input_detail [default %(default)s]")
    parser.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR),
                        help="folder of the per-GPU CSV files; a relative path is taken from the current "
                             "directory [default %(default)s]")
    parser.add_argument("--compare", metavar="OLD.csv",
                        help="compare this run's rows with OLD.csv; a row more than 5%% slower is a regression "
                             "(exit code 1)")
    parser.add_argument("--against", metavar="NEW.csv",
                        help="with --compare: compare NEW.csv with OLD.csv instead of running anything")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no new row after this many seconds (rows already written stay)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu [default: cuda when available]")
    parser.add_argument("--data", default=None,
                        help="image folder for --input loader [default: JPEGs generated from the demo photos]")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader worker processes [default: cores - 1, at most 16]")
    parser.add_argument("--no-kernel-count", dest="count_kernels", action="store_false",
                        help="do not profile one more step per row to count its CUDA kernels (kernels_per_step)")


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(s.strip() for s in text.split(",") if s.strip())


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The run ``args`` ask for; flags not given take the device's defaults (``BenchConfig``)."""
    batch_sizes = None
    if args.batch_size is not None:
        try:
            batch_sizes = tuple(int(b) for b in _names(args.batch_size))
        except ValueError:
            raise ValueError(f"--batch-size must be an int or comma-separated ints, got {args.batch_size!r}") from None
    return BenchConfig(
        models=_names(args.models), impls=_names(args.impls), batch_sizes=batch_sizes, img_size=args.img_size,
        steps=args.steps, warmup=args.warmup, inputs=_names(args.input), results_dir=Path(args.results_dir),
        device=args.device, max_seconds=args.max_seconds,
        data_dir=Path(args.data) if args.data else None, loader_workers=args.workers,
        count_kernels=args.count_kernels, task=args.task,
    )


_FLAGS = {"models": "--models", "batch_sizes": "--batch-size", "steps": "--steps", "warmup": "--warmup",
          "impls": "--impls"}  # BenchConfig field -> its flag


def _flag(field: str, value: object) -> str:
    text = ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
    return f"{_FLAGS[field]} {text}"


def cpu_defaults_note(cfg: BenchConfig) -> str | None:
    """What to tell the user when a run off CUDA took the CPU defaults for some flags; ``None`` otherwise."""
    if cfg.device.type == "cuda" or not cfg.defaults_used:
        return None
    defaults = TASK_DEFAULTS[cfg.task][0]
    gpu = {"models": defaults.models, "batch_sizes": (defaults.batch_size,), "steps": defaults.steps,
           "warmup": defaults.warmup, "impls": defaults.impls}
    return (f"fastmae bench: no CUDA device in use ({cfg.device}), so the CPU defaults for the flags not given: "
            f"{' '.join(_flag(name, getattr(cfg, name)) for name in cfg.defaults_used)}. On a CUDA device the "
            f"defaults are the GPU set: {' '.join(_flag(name, value) for name, value in gpu.items())} (its "
            "compiled and CUDA-graph rows need CUDA or take minutes to compile on a CPU).")


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
    note = cpu_defaults_note(cfg)
    if note is not None:
        print(note, flush=True)
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
