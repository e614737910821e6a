"""The settings of ``fastmae finetune``, ``fastmae linprobe`` and ``fastmae eval``, and the official recipe per model
size.

Design: as ``PretrainConfig``, a setting left ``None`` takes the recipe's value, here the one of the model's size
(``recipe_defaults``): the official MAE fine-tuning (FINETUNE.md / main_finetune.py) and linear probing
(main_linprobe.py) recipes. Models smaller than ViT-B (tiny, small, demo) take ViT-B's, for which the official repo
has none of their own. Validation raises ``SettingError`` (``fastmae.train.config``) naming the setting, before
anything is read or written. Importing this module imports no torch; validating a config does (model depth).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from fastmae.train.config import (PARALLEL_MODES, PRECISIONS, PretrainConfig, SettingError, check_data_settings,
                                  config_from_dict, invalid, model_presets, patch_size_of)

# autocast precisions (pretraining's fp8 is not wired into the classifier: its Linears stay bf16 under autocast)
CLASSIFIER_PRECISIONS = tuple(p for p in PRECISIONS if p != "fp8")

# The official fine-tuning recipe (FINETUNE.md). Its layer-wise lr decay is 0.65 for ViT-B and 0.75 for ViT-L/H
# (issue 17 wrote "0.75 / 0.65 for B / L-H", swapped against FINETUNE.md's commands; the official values win).
# blr is per 256 images (lr = blr x effective batch / 256); the effective batch is 1024 for every size
# (32 per GPU x 32 GPUs for B/L, 16 x 64 for H).
FINETUNE_COMMON = {"batch_size": 32, "warmup_epochs": 5.0, "min_lr": 1e-6, "weight_decay": 0.05,
                   "global_pool": True}
FINETUNE_BY_SIZE = {
    "base": {"epochs": 100.0, "blr": 5e-4, "layer_decay": 0.65, "drop_path": 0.1},
    "large": {"epochs": 50.0, "blr": 1e-3, "layer_decay": 0.75, "drop_path": 0.2},
    "huge": {"epochs": 50.0, "blr": 1e-3, "layer_decay": 0.75, "drop_path": 0.3},
}
# The official linear probe (main_linprobe.py, FINETUNE.md): LARS, blr 0.1, no weight decay, the cls token,
# effective batch 16384 (512 per GPU x 32 GPUs); 90 epochs for ViT-B, "50 is sufficient" for ViT-L/H.
LINPROBE_COMMON = {"batch_size": 512, "warmup_epochs": 10.0, "min_lr": 0.0, "weight_decay": 0.0,
                   "global_pool": False, "blr": 0.1}
LINPROBE_BY_SIZE = {"base": {"epochs": 90.0}, "large": {"epochs": 50.0}, "huge": {"epochs": 50.0}}

DEFAULT_MODEL = "vit_base_patch16"
ERASE_MODES = ("const", "rand", "pixel")  # timm's RandomErasing modes
MIXUP_MODES = ("batch", "pair", "elem")  # timm's Mixup modes


def size_of(vit_name: str) -> str:
    """The recipe size of a ViT preset: ``"large"``, ``"huge"``, or ``"base"`` (base and everything smaller)."""
    for size in ("large", "huge"):
        if f"_{size}_" in vit_name:
            return size
    return "base"


def vit_names() -> list[str]:
    """The ViT presets (``fastmae.vit.VIT_PRESETS``; imports torch)."""
    from fastmae.vit import VIT_PRESETS

    return sorted(VIT_PRESETS)


def resolve_model(name: str) -> str:
    """The ViT preset of ``name``: a ViT preset itself, or the ViT of an MAE preset (``vit_preset_for``);
    ``SettingError`` naming both lists otherwise."""
    from fastmae.vit import VIT_PRESETS, vit_preset_for

    if name in VIT_PRESETS:
        return name
    if name in model_presets():
        return vit_preset_for(name)
    raise SettingError(f"model must be a ViT preset ({', '.join(sorted(VIT_PRESETS))}) or an MAE preset "
                       f"({', '.join(sorted(model_presets()))}), got {name!r}", ("model",))


def preset_depth(vit_name: str) -> int:
    """The number of blocks of a ViT preset, from a copy built on the meta device (no memory, no init cost)."""
    import torch

    from fastmae.vit import VIT_PRESETS

    with torch.device("meta"):
        return len(VIT_PRESETS[vit_name]().blocks)


def world_size_from_env() -> int:
    """The number of ranks of this job: ``WORLD_SIZE`` under torchrun, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class ClassifierConfig:
    """What ``fastmae finetune`` and ``fastmae linprobe`` share. ``None``: the recipe's value for the model's size
    (``recipe_defaults``); ``accum=None``: enough passes to reach the recipe's effective batch (``resolved_accum``).
    """

    command: ClassVar[str]
    EFFECTIVE_BATCH: ClassVar[int]
    COMMON: ClassVar[dict[str, Any]]
    BY_SIZE: ClassVar[dict[str, dict[str, Any]]]

    model: str | None = None  # a ViT preset or an MAE preset (its ViT); default vit_base_patch16
    data: str | None = None  # training images: an ImageFolder tree (or a list file); required
    val: str | None = None  # validation images, scored at the end of each epoch; optional
    pretrained: str | None = None  # an MAE checkpoint (fastmae or official) or a timm ViT state dict
    output: str = "runs/classifier"
    num_classes: int | None = None  # default: the classes of data
    steps: int | None = None  # total optimiser steps; or epochs
    epochs: float | None = None
    warmup_epochs: float | None = None
    img_size: int = 224
    batch_size: int | None = None  # images per pass on each rank
    accum: int | None = None
    blr: float | None = None
    min_lr: float | None = None
    weight_decay: float | None = None
    global_pool: bool | None = None  # average the patch tokens (True) or take the cls token (False)
    clip_grad: float | None = None
    precision: str | None = None  # default: bf16 on CUDA, fp32 on CPU
    device: str | None = None
    seed: int = 0
    log_every: int = 20
    save_every: int | None = None  # steps; default: the end of each epoch
    keep_last: int = 3
    num_workers: int | None = None  # default: the loader's (the cores, at most 16)
    loader: str = "auto"
    on_bad_file: str = "error"
    max_skip_fraction: float = 0.01
    bad_file_check: str = "header"
    compile: bool = False
    deterministic: bool = False
    max_nonfinite: int = 10
    parallel: str = "ddp"  # how several ranks (torchrun) share the work: ddp, or fsdp (FSDP2); one process ignores it

    _check_types = PretrainConfig._check_types  # each value against its field's type (TypeError naming the key)

    def __post_init__(self) -> None:
        self._check_types()
        if self.model is None:
            self.model = DEFAULT_MODEL
        self._check_model()
        for key, value in self.recipe_defaults(self.vit).items():
            if getattr(self, key) is None and not (key == "epochs" and self.steps is not None):
                setattr(self, key, value)
        self._check_values()
        self._check_combinations()

    @classmethod
    def recipe_defaults(cls, vit_name: str) -> dict[str, Any]:
        """The recipe's value of every ``None``-defaulted setting for the ViT preset ``vit_name``."""
        return {**cls.COMMON, **cls.BY_SIZE[size_of(vit_name)]}

    def _check_model(self) -> None:
        self.vit = resolve_model(self.model)  # the ViT preset trained

    _bad = invalid  # self._bad(name, expected): the SettingError for that setting

    def _check_values(self) -> None:
        """Each setting on its own: ``SettingError`` naming it, what was expected and what was given."""

        if self.data is None:
            raise self._bad("data", "the training images, an ImageFolder tree (one folder per class)")
        if self.precision is not None and self.precision not in CLASSIFIER_PRECISIONS:
            raise self._bad("precision", f"one of {sorted(CLASSIFIER_PRECISIONS)}")
        if self.parallel not in PARALLEL_MODES:
            raise self._bad("parallel", f"one of {list(PARALLEL_MODES)}")
        if self.steps is not None and self.epochs is not None:
            raise SettingError(f"give either steps or epochs, not both; got steps {self.steps} and epochs "
                               f"{self.epochs}", ("steps", "epochs"))
        for name in ("img_size", "batch_size", "log_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise self._bad(name, ">= 1")
        for name in ("steps", "accum", "save_every", "num_classes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise self._bad(name, ">= 1 (or unset)")
        if self.epochs is not None and not self.epochs > 0:
            raise self._bad("epochs", "> 0")
        for name in ("warmup_epochs", "min_lr", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise self._bad(name, ">= 0")
        if not self.blr > 0:
            raise self._bad("blr", "> 0")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise self._bad("clip_grad", "> 0 (or unset for no clipping)")
        if self.keep_last < 0:
            raise self._bad("keep_last", ">= 0")
        if self.num_workers is not None and self.num_workers < 0:
            raise self._bad("num_workers", ">= 0 (or unset)")
        check_data_settings(self)

    def _check_combinations(self) -> None:
        if self.parallel == "fsdp" and self.precision == "fp16":  # as PretrainConfig
            raise SettingError("precision must be bf16 or fp32 with parallel fsdp (fp16's loss scaling is not "
                               "sharded), got fp16", ("precision", "parallel"))
        patch = patch_size_of(self.vit)
        if self.img_size % patch:
            raise SettingError(f"img_size must be a multiple of {patch}, the patch size of {self.vit}, got "
                               f"{self.img_size}", ("img_size",))

    def resolved_accum(self, world_size: int) -> int:
        """``accum``, or when unset the passes per step that reach the recipe's effective batch
        (``EFFECTIVE_BATCH``) with ``batch_size`` images on each of ``world_size`` ranks (rounded up)."""
        if self.accum is not None:
            return self.accum
        return max(1, math.ceil(self.EFFECTIVE_BATCH / (self.batch_size * world_size)))

    @classmethod
    def from_dict(cls, values: dict) -> ClassifierConfig:
        """The config of ``values`` (a config file's keys): ``config_from_dict``'s."""
        return config_from_dict(cls, values)


@dataclass
class FinetuneConfig(ClassifierConfig):
    """End-to-end fine-tuning (``freeze_blocks=None``) or partial fine-tuning of the last ``freeze_blocks`` blocks
    (the paper's Figure 9): AdamW (0.9, 0.999) with layer-wise lr decay, RandAugment, mixup/cutmix, label smoothing,
    random erasing, drop path."""

    command: ClassVar[str] = "finetune"
    EFFECTIVE_BATCH: ClassVar[int] = 1024
    COMMON: ClassVar[dict[str, Any]] = FINETUNE_COMMON
    BY_SIZE: ClassVar[dict[str, dict[str, Any]]] = FINETUNE_BY_SIZE

    output: str = "runs/finetune"
    layer_decay: float | None = None
    drop_path: float | None = None
    freeze_blocks: int | None = None  # train only the last K blocks (+ the final norm and the head); None: all
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm's RandAugment policy; "none": off
    smoothing: float = 0.1
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"

    @property
    def mixup_active(self) -> bool:
        """Whether timm's ``Mixup`` runs (as main_finetune.py: either alpha > 0)."""
        return self.mixup > 0 or self.cutmix > 0

    def _check_values(self) -> None:
        super()._check_values()
        if self.auto_augment == "none":
            self.auto_augment = None
        if self.auto_augment is not None:
            from fastmae.data.eval import rand_augment_policy_check

            try:
                rand_augment_policy_check(self.auto_augment)
            except ValueError:
                raise self._bad("auto_augment", "a timm RandAugment policy such as rand-m9-mstd0.5-inc1, or none") \
                    from None
        if not 0 < self.layer_decay <= 1:
            raise self._bad("layer_decay", "in (0, 1]")
        if not 0 <= self.drop_path < 1:
            raise self._bad("drop_path", "in [0, 1)")
        if not 0 <= self.smoothing < 1:
            raise self._bad("smoothing", "in [0, 1)")
        for name in ("reprob", "mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise self._bad(name, "in [0, 1]")
        for name in ("mixup", "cutmix"):
            if not getattr(self, name) >= 0:
                raise self._bad(name, ">= 0 (0: off)")
        if self.remode not in ERASE_MODES:
            raise self._bad("remode", f"one of {list(ERASE_MODES)}")
        if self.recount < 1:
            raise self._bad("recount", ">= 1")
        if self.mixup_mode not in MIXUP_MODES:
            raise self._bad("mixup_mode", f"one of {list(MIXUP_MODES)}")

    def _check_combinations(self) -> None:
        super()._check_combinations()
        if self.mixup_active and self.batch_size % 2:
            raise SettingError(f"batch_size must be even with mixup or cutmix (timm's Mixup mixes each image with "
                               f"its mirror in the batch), got {self.batch_size}; or turn both off with mixup 0 "
                               f"and cutmix 0", ("batch_size", "mixup", "cutmix"))
        if self.freeze_blocks is not None:
            depth = preset_depth(self.vit)
            if not 0 <= self.freeze_blocks <= depth:
                raise SettingError(f"freeze_blocks must be in [0, {depth}], the number of blocks of {self.vit} "
                                   f"to fine-tune, got {self.freeze_blocks}", ("freeze_blocks",))


@dataclass
class LinprobeConfig(ClassifierConfig):
    """Linear probing as main_linprobe.py: a frozen encoder, a ``BatchNorm1d`` (no affine) + linear head trained
    with LARS, RandomResizedCrop + flip only, plain cross-entropy."""

    command: ClassVar[str] = "linprobe"
    EFFECTIVE_BATCH: ClassVar[int] = 16384
    COMMON: ClassVar[dict[str, Any]] = LINPROBE_COMMON
    BY_SIZE: ClassVar[dict[str, dict[str, Any]]] = LINPROBE_BY_SIZE

    output: str = "runs/linprobe"


@dataclass
class EvalConfig:
    """``fastmae eval``: top-1/top-5 of a classifier checkpoint on an ImageFolder validation set."""

    checkpoint: str  # a checkpoint file, or a run folder (its newest checkpoint)
    data: str  # validation images: an ImageFolder tree (or a list file)
    model: str | None = None  # only for checkpoints without fastmae's metadata (official/timm fine-tuned weights)
    batch_size: int = 64
    crop_fraction: float | None = None  # default: 0.875 up to 224 px, else 1.0 (as main_finetune.py)
    precision: str | None = None
    device: str | None = None
    loader: str = "auto"
    num_workers: int | None = None
    on_bad_file: str = "error"
    max_skip_fraction: float = 0.01
    bad_file_check: str = "header"

    _check_types = PretrainConfig._check_types

    def __post_init__(self) -> None:
        self._check_types()

        bad = functools.partial(invalid, self)

        if self.model is not None:
            self.model = resolve_model(self.model)
        if self.batch_size < 1:
            raise bad("batch_size", ">= 1")
        if self.crop_fraction is not None and not 0 < self.crop_fraction <= 1:
            raise bad("crop_fraction", "in (0, 1]")
        if self.precision is not None and self.precision not in CLASSIFIER_PRECISIONS:
            raise bad("precision", f"one of {sorted(CLASSIFIER_PRECISIONS)}")
        if self.num_workers is not None and self.num_workers < 0:
            raise bad("num_workers", ">= 0 (or unset)")
        check_data_settings(self)


def eval_crop_fraction(img_size: int) -> float:
    """The evaluation crop of main_finetune.py: resize to ``img_size / 0.875`` then center-crop up to 224 px
    (256 -> 224), a plain resize above."""
    return 224 / 256 if img_size <= 224 else 1.0
