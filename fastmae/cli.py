"""The ``fastmae`` command: ``fastmae pretrain ...``, ``fastmae bench ...`` and ``fastmae info``.

Building the parser imports neither torch nor the training code (``fastmae --help`` stays fast); each command
imports what it needs when it runs, and the ``bench`` flags are added only when ``bench`` is the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from fastmae.train.config import (DEMO_DEFAULTS, FP8_RECIPES, MASK_STRATEGIES, MICRO_BATCH_MODES, PAPER_DEFAULTS,
                                  PARALLEL_MODES, PARAM_DTYPES, PRECISIONS, PretrainConfig, SettingError)
from fastmae.train.exit_codes import EXIT_BAD_SETTING, EXIT_NONFINITE, EXIT_PREEMPTED, run_command


PRETRAIN_HELP = {
    "model": "model preset",
    "data": "training images: an ImageFolder tree or a text file of image paths (default: the demo photos)",
    "heldout": "held-out images, never trained on (an ImageFolder tree or a text file of image paths): their "
               "masked-patch loss is logged at each log interval and the figure shows them (default: none; the "
               "demo's held-out crops without --data)",
    "output": "output folder; rerunning with the same folder resumes from its newest checkpoint",
    "steps": "total optimiser steps (instead of --epochs)",
    "epochs": "epochs over the data",
    "img_size": "input resolution in pixels",
    "batch_size": "images per forward/backward pass",
    "accum": "gradient-accumulation passes per optimiser step",
    "blr": "base learning rate; lr = blr x batch_size x accum / 256",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_fraction": "fraction of the steps spent in linear warmup (the paper: 40/800)",
    "weight_decay": "AdamW weight decay (not applied to biases, norms and tokens)",
    "mask_ratio": "fraction of patches removed, in [0, 1)",
    "mask_strategy": "which patches are removed (the paper's section 4.1 ablation): random (the paper's), block "
                     "(BEiT's blockwise masking: random rectangles, mostly of 16 patches or more), or grid (the "
                     "top-left patch of every 2x2 cell kept: needs --mask-ratio 0.75 and an even patch grid)",
    "norm_pix_loss": "normalise each target patch by its mean and std (the paper's default)",
    "decoder_depth": "decoder blocks, in place of the preset's (the paper's ablation: 1, 2, 4, 8, 12)",
    "decoder_embed_dim": "decoder width, in place of the preset's (the paper's ablation: 128 to 1024); a multiple "
                         "of the decoder heads and of 4",
    "decoder_num_heads": "decoder attention heads, in place of the preset's",
    "precision": "autocast precision (default bf16 on CUDA, fp32 on CPU); fp8: float8 matmuls in the encoder and "
                 "decoder Linears (torchao; CUDA GPUs of compute capability >= 8.9), bf16 autocast for the rest",
    "device": "torch device (default cuda when available, else cpu)",
    "seed": "random seed of weights, masks and data order",
    "log_every": "steps between logged metrics (and host syncs)",
    "save_every": "steps between checkpoints",
    "keep_last": "checkpoints kept",
    "num_workers": "data-loading worker processes (torch loader) or threads (DALI)",
    "loader": "input pipeline: dali (GPU JPEG decode), torch (PIL on DataLoader workers), or auto: DALI when "
              "installed",
    "on_bad_file": "error: stop when the up-front check finds bad image files, naming them; skip: leave bad files "
                   "out, log each, stop when more than max_skip_fraction of the files are bad",
    "max_skip_fraction": "with --on-bad-file skip: the fraction of bad files, in [0, 1), above which the run stops "
                         "over a broken dataset",
    "bad_file_check": "how each file is checked up front: header (its header and end, ~0.05 ms a file) or decode "
                      "(also decoded at low resolution, ~1 ms a file)",
    "parallel": "with several ranks (torchrun): ddp, or fsdp (FSDP2 sharding, for ViT-H)",
    "activation_checkpointing": "recompute each block's activations in the backward pass (less memory)",
    "compile": "torch.compile the model (None: only for precision fp8 on CUDA, as a compiled step is not yet "
               "measured faster; --no-compile: never); the run prints its step path and why",
    "cuda_graph": "capture the whole training step in one CUDA graph (None: on for CUDA with one process unless fp16 "
                  "or a fault hook rules it out; --no-cuda-graph: launch it eagerly)",
    "param_dtype": "fp32, or bf16: Linear/Conv weights kept in bf16 with fp32 master weights in the optimiser (needs "
                   "precision bf16, one process; None: fp32, as bf16 is not yet measured faster on a GPU)",
    "fp8_recipe": "with --precision fp8: torchao's scaling, tensorwise (fastest) or rowwise (a scale per row)",
    "micro_batch": "auto: measure before training how many images one forward/backward pass fits on the GPU and "
                   "split each batch into equal passes (the same batch, masks and learning rate); recorded in "
                   "config.json and kept on resume (None: one pass per batch)",
    "deterministic": "deterministic algorithms: with precision fp32, a resumed run repeats an uninterrupted one "
                     "bit for bit",
    "clip_grad": "clip the global gradient norm to this value",
    "max_nonfinite": f"stop (exit code {EXIT_NONFINITE}) after this many consecutive steps with a non-finite loss "
                     "or gradients; such steps are skipped",
}


CHOICES = {"precision": sorted(PRECISIONS), "parallel": PARALLEL_MODES, "mask_strategy": MASK_STRATEGIES,
           "param_dtype": PARAM_DTYPES, "fp8_recipe": FP8_RECIPES, "micro_batch": MICRO_BATCH_MODES}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.name in PAPER_DEFAULTS:
            default = f"{PAPER_DEFAULTS[f.name]}, demo {DEMO_DEFAULTS[f.name]}"
        help_text = f"{PRETRAIN_HELP[f.name]} [config key {f.name}; default {default}]"
        if "bool" in str(f.type):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name in CHOICES:
            parser.add_argument(flag, dest=f.name, choices=CHOICES[f.name], default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0].strip(), str)
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)


def _read_config_file(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith(".toml"):
        return tomllib.loads(text)
    if path.endswith(".json"):
        return json.loads(text)
    raise ValueError(f"--config must be a .json or .toml file, got {path!r}")


def build_parser(with_bench_flags: bool = True) -> argparse.ArgumentParser:
    """The ``fastmae`` parser. ``with_bench_flags=False`` leaves out the ``bench`` flags, whose definition imports
    the benchmark (and torch): ``main`` adds them only when ``bench`` is the command."""
    parser = argparse.ArgumentParser(prog="fastmae", description="Fast, faithful MAE pretraining for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="MAE pretraining (no --data: the embedded demo photos)",
                         description="MAE pretraining. Settings come from the defaults, then --config, "
                                     "then the flags below. Under torchrun the same command trains on every rank "
                                     "(e.g. torchrun --nproc_per_node=8 --no-python fastmae pretrain ...). Rerunning "
                                     "it with the same --output resumes from the newest complete checkpoint.",
                         epilog=f"Exit codes: 0 done (also when --output already holds the last step's "
                                f"checkpoint: nothing is changed); {EXIT_BAD_SETTING} a bad setting (nothing is read "
                                f"or written), a bad image file (see --on-bad-file) or no loadable checkpoint in "
                                f"--output; {EXIT_NONFINITE} stopped after too many "
                                f"consecutive non-finite steps (the last checkpoint is good); {EXIT_PREEMPTED} "
                                "preempted by SIGTERM or SIGUSR1 after saving a checkpoint (run the same command "
                                "again to resume).")
    pre.add_argument("--config", help="a .json or .toml file of config keys (the flags' names with underscores)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(pre)
    sub.add_parser("info", help="versions, the fastmae._C extension, and every op's backends on this machine")
    bench = sub.add_parser("bench", help="training-step img/s, MFU and memory of fastmae and the baselines "
                                         "(pretraining, or fine-tuning with --task finetune)",
                           description="Time complete training steps (MAE pretraining, or fine-tuning with --task "
                                       "finetune) of each model x input x implementation; each row is upserted into "
                                       "<results-dir>/<gpu>.csv as soon as it is measured.")
    if with_bench_flags:
        from fastmae.benchmark.command import add_arguments as add_bench_arguments

        add_bench_arguments(bench)
    from fastmae.finetune.command import add_parsers as add_classifier_parsers

    add_classifier_parsers(sub)  # finetune, linprobe, eval
    from fastmae.interop.command import add_parsers as add_interop_parsers

    add_interop_parsers(sub)  # export, visualize
    return parser


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fastmae.train.pretrain import pretrain

    values = _read_config_file(args.config) if args.config else {}
    for flag, other in (("steps", "epochs"), ("epochs", "steps")):  # a run's length given on the command line
        if getattr(args, flag) is not None:                          # replaces the file's, whichever way given
            values.pop(other, None)
    for f in dataclasses.fields(PretrainConfig):
        if getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
    try:
        cfg = PretrainConfig.from_dict(values)
    except SettingError as exc:
        print(f"fastmae pretrain: {exc.with_flags()}", file=sys.stderr)
        return EXIT_BAD_SETTING
    except (TypeError, ValueError) as exc:  # a config file's unknown key or wrongly typed value
        print(f"fastmae pretrain: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTING
    code, summary = run_command("fastmae pretrain", lambda: pretrain(cfg, progress=not args.no_progress))
    if code != 0 or summary.status == "already complete":  # pretrain() said so; nothing was changed
        return code
    if os.environ.get("RANK", "0") == "0":
        print(f"fastmae pretrain: {summary.steps} steps, loss {summary.first_loss:.4f} -> {summary.final_loss:.4f}, "
              f"{summary.img_per_s:.0f} img/s, {summary.skipped_steps} non-finite steps skipped"
              + (f", held-out loss {summary.heldout_loss:.4f} (flat-patch baseline {summary.heldout_baseline:.4f})"
                 if summary.heldout_loss == summary.heldout_loss else "")
              + f"; outputs in {summary.output}/ ({', '.join(summary.outputs)})")
    return 0


def cmd_info() -> int:
    import torch

    import fastmae
    from fastmae.extension import extension_status
    from fastmae.ops import backend_table

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
    elif torch.version.cuda is None:
        gpu = "none usable: this torch is a CPU-only build"
    else:
        gpu = "none visible (torch is a CUDA build; no GPU or driver found)"
    print(f"fastmae {fastmae.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {triton_version}, Python {platform.python_version()}")
    print(f"GPU: {gpu}")
    loaded, detail = extension_status()
    if loaded and not torch.cuda.is_available():
        detail += "; no GPU here, so only its CPU implementations run"
    print(f"fastmae._C: {detail}")
    rows = backend_table()
    width, backend_width = max(len(row[0]) for row in rows), max(len(row[1]) for row in rows)
    print(f"\n{'op':<{width}}  {'backend':<{backend_width}}  status")
    for op, backend, reason, auto_devices, auto_when in rows:
        status = "available" if reason is None else "unavailable: " + reason
        if reason is None and auto_devices is not None:
            status += f" (chosen automatically for {'/'.join(auto_devices)} tensors, elsewhere only when named)"
        if reason is None and auto_when is not None:
            status += f"; by priority {auto_when}"
        print(f"{op:<{width}}  {backend:<{backend_width}}  {status}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``fastmae <argv>`` (default: the command line's arguments); returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # the top level takes no option values
    args = build_parser(with_bench_flags=command == "bench").parse_args(argv)
    if args.command == "pretrain":
        return cmd_pretrain(args)
    if args.command in ("finetune", "linprobe", "eval"):
        from fastmae.finetune.command import run as run_classifier_command

        return run_classifier_command(args)
    if args.command in ("export", "visualize"):
        from fastmae.interop.command import run as run_interop_command

        return run_interop_command(args)
    if args.command == "bench":
        from fastmae.benchmark.command import cmd_bench

        return cmd_bench(args)
    return cmd_info()


if __name__ == "__main__":
    sys.exit(main())
