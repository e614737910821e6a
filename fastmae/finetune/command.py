"""The ``fastmae finetune``, ``fastmae linprobe`` and ``fastmae eval`` subcommands: their flags (one per config key,
as ``fastmae pretrain``'s) and what each runs. Importing this module imports no torch; running a command does.

Exit codes as ``fastmae pretrain``: 0 done, 2 a bad setting (one line naming the flag; nothing written), a bad
image file or no loadable checkpoint, 3 too many non-finite steps, 75 preempted after saving.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from fastmae.finetune.config import (CLASSIFIER_PRECISIONS, DEFAULT_MODEL, FINETUNE_BY_SIZE, FINETUNE_COMMON,
                                     LINPROBE_BY_SIZE, LINPROBE_COMMON, ClassifierConfig, EvalConfig, FinetuneConfig,
                                     LinprobeConfig)
from fastmae.train.config import PARALLEL_MODES, SettingError
from fastmae.train.exit_codes import EXIT_BAD_SETTING, EXIT_NONFINITE, EXIT_PREEMPTED, run_command

COMMANDS = ("finetune", "linprobe", "eval")

HELP = {
    "model": "a ViT preset (vit_base_patch16, ...) or an MAE preset (mae_vit_base_patch16, ...): its encoder",
    "data": "training images: an ImageFolder tree, one folder per class (required)",
    "val": "validation images (ImageFolder; its classes a subset of --data's), scored at the end of each epoch",
    "pretrained": "initialise the encoder from a checkpoint: fastmae pretrain's or the official MAE's "
                  "(ckpt-*.pt / mae_pretrain_vit_*.pth), or a timm ViT state dict; pos_embed is interpolated",
    "output": "output folder; rerunning with the same folder resumes from its newest checkpoint",
    "num_classes": "outputs of the head (default: the classes of --data)",
    "steps": "total optimiser steps (instead of --epochs)",
    "epochs": "epochs over the data",
    "warmup_epochs": "linear lr warmup, in epochs, then half-cycle cosine decay per step",
    "img_size": "input resolution in pixels",
    "batch_size": "images per forward/backward pass on each rank",
    "accum": "gradient-accumulation passes per optimiser step (default: enough for the recipe's effective batch, "
             "1024 fine-tuning / 16384 linear probing, over all ranks)",
    "blr": "base learning rate; lr = blr x effective batch / 256",
    "min_lr": "learning rate at the end of the cosine decay",
    "weight_decay": "weight decay (not on biases, norms, cls token and pos_embed)",
    "global_pool": "classify the mean of the patch tokens through fc_norm (--no-global-pool: the cls token "
                   "through norm)",
    "clip_grad": "clip the global gradient norm to this value (default: no clipping)",
    "precision": "autocast precision (default bf16 on CUDA, fp32 on CPU)",
    "device": "torch device (default cuda when available, else cpu)",
    "seed": "random seed of the head, the data order, augmentation and mixup",
    "log_every": "steps between logged metrics (and host syncs)",
    "save_every": "steps between checkpoints (default: the end of each epoch)",
    "keep_last": "checkpoints kept",
    "num_workers": "data-loading worker processes (torch loader) or threads (DALI) (default: the cores, up to 16)",
    "loader": "input pipeline: dali, torch, or auto: DALI when installed",
    "on_bad_file": "error: stop when the up-front check finds bad image files; skip: leave them out",
    "max_skip_fraction": "with --on-bad-file skip: the fraction of bad files above which the run stops",
    "bad_file_check": "how each file is checked up front: header or decode",
    "compile": "torch.compile the model",
    "deterministic": "deterministic algorithms (with fp32: a resumed run repeats an uninterrupted one)",
    "max_nonfinite": f"stop (exit code {EXIT_NONFINITE}) after this many consecutive non-finite steps",
    "parallel": "with several ranks (torchrun): ddp, or fsdp (FSDP2 sharding, for ViT-H)",  # as fastmae pretrain's
    "layer_decay": "layer-wise lr decay: block i's lr is scaled by layer_decay^(depth - i)",
    "drop_path": "stochastic depth rate of the last block (linear from 0)",
    "freeze_blocks": "partial fine-tuning: train only the last K blocks, the final norm and the head (0: the head "
                     "and norm alone; default: everything)",
    "auto_augment": "timm RandAugment policy, or none",
    "smoothing": "label smoothing",
    "reprob": "random-erasing probability",
    "remode": "random-erasing fill: const, rand or pixel",
    "recount": "random-erasing regions per image (at most)",
    "mixup": "mixup alpha (0: off)",
    "cutmix": "cutmix alpha (0: off)",
    "mixup_prob": "probability of mixup or cutmix per batch",
    "mixup_switch_prob": "probability of cutmix instead of mixup when both are on",
    "mixup_mode": "mixup parameters per batch, pair or elem",
    "checkpoint": "a fastmae finetune/linprobe checkpoint, a run folder (its newest checkpoint), or plain fine-tuned "
                  "ViT weights (official/timm; then give --model)",
    "crop_fraction": "center crop of the resized image (default 0.875 up to 224 px, else 1.0)",
}
CHOICES = {"precision": sorted(CLASSIFIER_PRECISIONS), "parallel": PARALLEL_MODES}  # as fastmae pretrain's, no fp8
EVAL_HELP = {"data": "validation images: an ImageFolder tree, its classes a subset of the checkpoint's training "
                     "classes (required)",
             "model": "the ViT preset, for checkpoints without fastmae's classifier record",
             "batch_size": "images per forward pass on each rank"}


def _recipe_default(cls: type[ClassifierConfig], name: str) -> str | None:
    """How the help names a recipe default: one value, or one per model size."""
    common, by_size = ((FINETUNE_COMMON, FINETUNE_BY_SIZE) if cls is FinetuneConfig
                       else (LINPROBE_COMMON, LINPROBE_BY_SIZE))
    if name == "model":
        return DEFAULT_MODEL
    if name in common:
        return str(common[name])
    if name in by_size["base"]:
        labels = {"base": "ViT-B and smaller", "large": "ViT-L", "huge": "ViT-H"}
        return ", ".join(f"{labels[size]} {values[name]}" for size, values in by_size.items())
    return None


def _add_flags(parser: argparse.ArgumentParser, cls: type, help_texts: dict[str, str]) -> None:
    for f in dataclasses.fields(cls):
        if f.name == "checkpoint":
            parser.add_argument("checkpoint", help=help_texts[f.name])
            continue
        flag = "--" + f.name.replace("_", "-")
        recipe = _recipe_default(cls, f.name) if issubclass(cls, ClassifierConfig) else None
        default = recipe if recipe is not None else f.default
        help_text = f"{help_texts[f.name]} [config key {f.name}; default {default}]"
        kind = str(f.type).split(" |")[0].strip()
        if f.default is dataclasses.MISSING:
            parser.add_argument(flag, dest=f.name, required=True, help=f"{help_texts[f.name]} [required]")
        elif kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif f.name in CHOICES:
            parser.add_argument(flag, dest=f.name, choices=CHOICES[f.name], default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type={"int": int, "float": float}.get(kind, str), default=None,
                                help=help_text)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``finetune``, ``linprobe`` and ``eval`` to the ``fastmae`` subparsers."""
    epilog = (f"Exit codes: 0 done (also when --output already holds the last step's checkpoint); "
              f"{EXIT_BAD_SETTING} a bad setting (nothing is read or written), a bad image file or no loadable "
              f"checkpoint in --output; {EXIT_NONFINITE} stopped after too many consecutive non-finite steps; "
              f"{EXIT_PREEMPTED} preempted by SIGTERM or SIGUSR1 after saving a checkpoint (rerun to resume).")
    for cls, help_line, description in (
            (FinetuneConfig, "fine-tune a pretrained encoder for classification (or its last K blocks)",
             "Fine-tuning with the official MAE recipe (FINETUNE.md) per model size: AdamW with layer-wise lr "
             "decay, RandAugment, mixup/cutmix, label smoothing, random erasing, drop path. --freeze-blocks K "
             "fine-tunes only the last K blocks (partial fine-tuning)."),
            (LinprobeConfig, "linear probing: a BatchNorm + linear head on a frozen encoder, trained with LARS",
             "Linear probing with the official MAE recipe (main_linprobe.py): the cls token, a BatchNorm1d "
             "(no affine) + linear head, everything else frozen, LARS, RandomResizedCrop + flip.")):
        parser = sub.add_parser(cls.command, help=help_line,
                                description=description + " Settings come from the defaults, then --config, "
                                "then the flags. Under torchrun the same command trains on every rank (DDP, or "
                                "FSDP2 with --parallel fsdp: sharded checkpoints, which fastmae eval reads too).",
                                epilog=epilog)
        parser.add_argument("--config", help="a .json or .toml file of config keys (the flags' names with "
                                             "underscores)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        _add_flags(parser, cls, HELP)
    parser = sub.add_parser("eval", help="top-1/top-5 accuracy of a classifier checkpoint on a validation set",
                            description="Score a checkpoint on an ImageFolder validation set (resize + center "
                                        "crop); under torchrun each rank scores its share.",
                            epilog=f"Exit codes: 0 done; {EXIT_BAD_SETTING} a bad setting, checkpoint or image.")
    _add_flags(parser, EvalConfig, {**HELP, **EVAL_HELP})


def _config_values(args: argparse.Namespace, cls: type) -> dict:
    from fastmae.cli import _read_config_file

    values = _read_config_file(args.config) if getattr(args, "config", None) else {}
    for flag, other in (("steps", "epochs"), ("epochs", "steps")):
        if getattr(args, flag, None) is not None:
            values.pop(other, None)
    for f in dataclasses.fields(cls):
        if getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
    return values


def run(args: argparse.Namespace) -> int:
    """Run the ``finetune``, ``linprobe`` or ``eval`` command of ``args``; returns the exit code."""
    name = f"fastmae {args.command}"
    cls = {"finetune": FinetuneConfig, "linprobe": LinprobeConfig, "eval": EvalConfig}[args.command]
    try:
        values = _config_values(args, cls)
        cfg = cls.from_dict(values) if cls is not EvalConfig else EvalConfig(**values)
    except SettingError as exc:
        print(f"{name}: {exc.with_flags()}", file=sys.stderr)
        return EXIT_BAD_SETTING
    except (TypeError, ValueError, OSError) as exc:  # a config file's unknown key, wrong type, or unreadable file
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTING
    return _run_eval(cfg, name) if args.command == "eval" else _run_training(cfg, name, not args.no_progress)


def _run_eval(cfg: EvalConfig, name: str) -> int:
    from fastmae.data.bad_files import BadImageError
    from fastmae.finetune.evaluate import run_eval

    try:
        result, path = run_eval(cfg)
    except SettingError as exc:
        print(f"{name}: {exc.with_flags()}", file=sys.stderr)
        return EXIT_BAD_SETTING
    except BadImageError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTING
    if os.environ.get("RANK", "0") == "0":
        print(f"{name}: {result.line()}")
    return 0


def _run_training(cfg: ClassifierConfig, name: str, progress: bool) -> int:
    from fastmae.finetune.trainer import train_classifier

    code, summary = run_command(name, lambda: train_classifier(cfg, progress=progress))
    if code != 0 or summary.status == "already complete":
        return code
    if os.environ.get("RANK", "0") == "0":
        print(f"{name}: {summary.steps} steps, loss {summary.first_loss:.4f} -> {summary.final_loss:.4f}, "
              f"{summary.img_per_s:.0f} img/s, {summary.skipped_steps} non-finite steps skipped"
              + (f"; validation {summary.val.line()}" if summary.val is not None else "")
              + f"; outputs in {summary.output}/ ({', '.join(summary.outputs)})")
    return 0
