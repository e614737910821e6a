"""The settings of a pretraining run: ``PretrainConfig``, its defaults and validation."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

import torch

from fastmae.data.bad_files import BAD_FILE_POLICIES
from fastmae.data.bad_files import CHECKS as BAD_FILE_CHECKS
from fastmae.data.loader import BACKENDS as LOADERS
from fastmae.model import PRESETS

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PARALLEL_MODES = ("ddp", "fsdp")


# Settings left unset (None) take these values: the paper's recipe on real data, and on the demo
# photos a short, small-batch run that visibly learns on two CPU cores in a few minutes (raw-pixel
# targets, so the reconstruction figure shows the model's own colours, and a 10x base lr for the
# 64-image batch).
PAPER_DEFAULTS = {"model": "mae_vit_base_patch16", "img_size": 224, "epochs": 800.0, "blr": 1.5e-4,
                  "norm_pix_loss": True}
DEMO_DEFAULTS = {"model": "mae_vit_tiny_patch16", "img_size": 96, "epochs": 45.0, "blr": 1.5e-3,
                 "norm_pix_loss": False}


@dataclass
class PretrainConfig:
    """Every setting of a pretraining run. ``data=None`` trains on the embedded demo dataset.

    ``None`` means: the paper's value with ``data``, the demo's without (see ``DEMO_DEFAULTS``).
    """

    model: str | None = None
    data: str | None = None
    output: str = "runs/pretrain"
    steps: int | None = None  # total optimiser steps; or give epochs
    epochs: float | None = None
    img_size: int | None = None
    batch_size: int = 64
    accum: int = 1
    blr: float | None = None
    min_lr: float = 0.0
    warmup_fraction: float = 0.05  # the paper: 40 of 800 epochs
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    norm_pix_loss: bool | None = None
    precision: str | None = None  # default: bf16 on CUDA, fp32 on CPU
    device: str | None = None  # default: cuda when available
    seed: int = 0
    log_every: int = 20
    save_every: int = 200
    keep_last: int = 3
    num_workers: int = 2
    loader: str = "auto"  # dali, torch, or auto: DALI when installed
    on_bad_file: str = "error"  # error: stop at a bad image file, naming it; skip: leave bad files out
    max_skip_fraction: float = 0.01  # on_bad_file="skip": stop when more than this fraction of files is bad
    bad_file_check: str = "header"  # header: header and tail of each file; decode: also decode each file
    parallel: str = "ddp"  # how several ranks (torchrun) share the work; one process ignores it
    activation_checkpointing: bool = False
    compile: bool = False
    deterministic: bool = False  # deterministic algorithms, for bit-exact resume (fp32 recommended)
    clip_grad: float | None = None  # max global gradient norm; None: no clipping
    max_nonfinite: int = 10  # stop after this many consecutive steps with a non-finite loss or gradient

    def __post_init__(self) -> None:
        self._check_types()
        defaults = DEMO_DEFAULTS if self.data is None else PAPER_DEFAULTS
        for key, value in defaults.items():
            if getattr(self, key) is None and not (key == "epochs" and self.steps is not None):
                setattr(self, key, value)
        if self.model not in PRESETS:
            raise ValueError(f"model must be one of {sorted(PRESETS)}, got {self.model!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give either steps or epochs, not both")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {list(PARALLEL_MODES)}, got {self.parallel!r}")
        if self.parallel == "fsdp" and self.precision == "fp16":
            raise ValueError("parallel='fsdp' takes precision bf16 or fp32 (fp16's loss scaling is not sharded), "
                             "got fp16")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0 (or unset for no clipping), got {self.clip_grad}")
        for name in ("img_size", "batch_size", "accum", "log_every", "save_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        for name in ("keep_last", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.loader not in LOADERS:
            raise ValueError(f"loader must be one of {list(LOADERS)}, got {self.loader!r}")
        if self.on_bad_file not in BAD_FILE_POLICIES:
            raise ValueError(f"on_bad_file must be one of {list(BAD_FILE_POLICIES)}, got {self.on_bad_file!r}")
        if not 0.0 <= self.max_skip_fraction < 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1), got {self.max_skip_fraction}")
        if self.bad_file_check not in BAD_FILE_CHECKS:
            raise ValueError(f"bad_file_check must be one of {list(BAD_FILE_CHECKS)}, got {self.bad_file_check!r}")

    def _check_types(self) -> None:
        """Each value against its field's type (``int``, ``float``, ``bool``, ``str``, optionally ``None``), so that
        a config file's ``batch_size = "8"`` is named here rather than failing in a comparison; an int given for a
        float setting becomes a float."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            hint = hints[f.name]
            allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            if value is None and type(None) in allowed:
                continue
            kind = next(t for t in allowed if t is not type(None))
            if kind is float and type(value) is int:
                setattr(self, f.name, float(value))
            elif type(value) is not kind:  # exact: True is no int here
                expected = kind.__name__ + (" or None" if type(None) in allowed else "")
                raise TypeError(f"config key {f.name} must be {expected}, got {value!r} ({type(value).__name__})")

    @classmethod
    def from_dict(cls, values: dict) -> PretrainConfig:
        """The config of ``values`` (a config file's keys); unknown keys raise ``ValueError``, wrongly typed values
        ``TypeError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)
