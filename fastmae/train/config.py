"""The settings of a pretraining run: ``PretrainConfig``, its defaults and validation.

Importing this module imports neither torch nor the model (``fastmae --help`` reads the fields); validating a
config does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("bf16", "fp16", "fp32", "fp8")  # fp8: float8 matmuls in the blocks' Linears (torchao), bf16 autocast
PARAM_DTYPES = ("fp32", "bf16")  # bf16: Linear/Conv weights kept in bf16 with fp32 masters
MICRO_BATCH_MODES = ("auto",)  # auto: split each batch into passes measured to fit the GPU
FP8_RECIPES = ("tensorwise", "rowwise")  # torchao float8 scaling recipes (fastmae.train.fp8)
PARALLEL_MODES = ("ddp", "fsdp")
MASK_STRATEGIES = ("random", "block", "grid")  # fastmae.masking's; the paper's Figure 6


class SettingError(ValueError):
    """A setting, or a combination of settings, that cannot work. The message names the setting by its config key
    (``img_size``), what was expected and what was given; ``with_flags()`` is the same message naming the
    command-line flags (``--img-size``) instead."""

    def __init__(self, message: str, keys: tuple[str, ...]) -> None:
        super().__init__(message)
        self.keys = keys

    def with_flags(self) -> str:
        """The message with each of ``keys`` written as its flag (``img_size`` -> ``--img-size``)."""
        message = str(self)
        for key in self.keys:
            message = re.sub(rf"(?<![\w'/.-]){key}(?![\w'/])", "--" + key.replace("_", "-"), message)
        return message

def invalid(cfg: object, name: str, expected: str) -> SettingError:
    """The ``SettingError`` for the setting ``name`` of ``cfg``: its name, what was expected and what was given."""
    return SettingError(f"{name} must be {expected}, got {getattr(cfg, name)!r}", (name,))


def check_data_settings(cfg: object) -> None:
    """The image-reading settings every command has (``loader``, ``on_bad_file``, ``max_skip_fraction``,
    ``bad_file_check``), each on its own: the :func:`invalid` error of the first one that is not valid."""
    from fastmae.data.bad_files import BAD_FILE_POLICIES
    from fastmae.data.bad_files import CHECKS as BAD_FILE_CHECKS
    from fastmae.data.loader import BACKENDS as LOADERS

    if cfg.loader not in LOADERS:
        raise invalid(cfg, "loader", f"one of {list(LOADERS)}")
    if cfg.on_bad_file not in BAD_FILE_POLICIES:
        raise invalid(cfg, "on_bad_file", f"one of {list(BAD_FILE_POLICIES)}")
    if not 0.0 <= cfg.max_skip_fraction < 1.0:
        raise invalid(cfg, "max_skip_fraction", "in [0, 1)")
    if cfg.bad_file_check not in BAD_FILE_CHECKS:
        raise invalid(cfg, "bad_file_check", f"one of {list(BAD_FILE_CHECKS)}")

def saved_run_config(output: str | os.PathLike) -> dict | None:
    """The ``config.json`` a run wrote into its output folder ``output`` (the effective configuration), or ``None``
    where there is none or it cannot be read."""
    path = Path(output) / "config.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) else None


def patch_size_of(model: str) -> int:
    """The patch size of the preset ``model``, from its name (``mae_vit_huge_patch14`` -> 14), as every preset's
    name carries it; no model is built."""
    match = re.search(r"_patch(\d+)", model)
    if match is None:
        raise ValueError(f"a preset name holds _patch<size>, got {model!r}")
    return int(match.group(1))


# Settings left unset (None) take these values: the paper's recipe on real data, and on the demo
# photos the recipe chosen by measurement (docs/demo-recipe.md) so that a run of a few minutes on two
# CPU cores reconstructs held-out crops visibly.
PAPER_DEFAULTS = {"model": "mae_vit_base_patch16", "img_size": 224, "epochs": 800.0, "batch_size": 64,
                  "blr": 1.5e-4, "norm_pix_loss": True}
DEMO_DEFAULTS = {"model": "mae_vit_demo_patch8_dec128d2b", "img_size": 64, "epochs": 60.0, "batch_size": 32,
                 "blr": 2e-2, "norm_pix_loss": False}

# Presets for the demo only: factories in fastmae.model like the others, but not in its PRESETS (that table
# is the official MAE presets and their fastmae names).
DEMO_PRESET_NAMES: tuple[str, ...] = ("mae_vit_demo_patch8_dec128d2b",)


def model_presets() -> dict:
    """Every model name ``PretrainConfig.model`` accepts -> its factory: ``fastmae.model.PRESETS`` and the demo
    presets (imports torch)."""
    from fastmae import model

    return {**model.PRESETS, **{name: getattr(model, name) for name in DEMO_PRESET_NAMES}}


@dataclass
class PretrainConfig:
    """Every setting of a pretraining run. ``data=None`` trains on the embedded demo dataset.

    ``None`` means: the paper's value with ``data``, the demo's without (see ``DEMO_DEFAULTS``).
    """

    model: str | None = None
    data: str | None = None
    heldout: str | None = None  # images never trained on, scored at log intervals; demo: its held-out crops
    output: str = "runs/pretrain"
    steps: int | None = None  # total optimiser steps; or give epochs
    epochs: float | None = None
    img_size: int | None = None
    batch_size: int | None = None  # images per pass on each rank
    accum: int = 1
    blr: float | None = None
    min_lr: float = 0.0
    warmup_fraction: float = 0.05  # the paper: 40 of 800 epochs
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    mask_strategy: str = "random"  # random, block (BEiT's) or grid (the paper's section 4.1): fastmae.masking
    norm_pix_loss: bool | None = None
    decoder_depth: int | None = None  # None: the preset's (the paper's ablation, Table 1a)
    decoder_embed_dim: int | None = None  # None: the preset's (Table 1b)
    decoder_num_heads: int | None = None  # None: the preset's
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
    compile: bool | None = None  # None: only for fp8 on CUDA (fastmae.train.cuda_graph.choose_fast_path)
    cuda_graph: bool | None = None  # the whole step in one CUDA graph; None: on for CUDA, one process, when it can be
    param_dtype: str | None = None  # fp32 or bf16 (fp32 masters); None: fp32
    fp8_recipe: str = "tensorwise"  # with precision fp8: torchao's scaling recipe
    micro_batch: str | None = None  # auto: measured before training; None: each batch is one pass
    deterministic: bool = False  # deterministic algorithms, for bit-exact resume (fp32 recommended)
    clip_grad: float | None = None  # max global gradient norm; None: no clipping
    max_nonfinite: int = 10  # stop after this many consecutive steps with a non-finite loss or gradient

    def __post_init__(self) -> None:
        self._check_types()
        defaults = DEMO_DEFAULTS if self.data is None else PAPER_DEFAULTS
        for key, value in defaults.items():
            if getattr(self, key) is None and not (key == "epochs" and self.steps is not None):
                setattr(self, key, value)
        self._check_values()
        self._check_combinations()

    def _check_values(self) -> None:
        """Each setting on its own: ``SettingError`` naming it, what was expected and what was given."""
        presets = model_presets()

        bad = functools.partial(invalid, self)

        if self.model not in presets:
            raise bad("model", f"one of {sorted(presets)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise bad("precision", f"one of {sorted(PRECISIONS)}")
        if self.steps is not None and self.epochs is not None:
            raise SettingError(f"give either steps or epochs, not both; got steps {self.steps} and epochs "
                               f"{self.epochs}", ("steps", "epochs"))
        if self.parallel not in PARALLEL_MODES:
            raise bad("parallel", f"one of {list(PARALLEL_MODES)}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise bad("clip_grad", "> 0 (or unset for no clipping)")
        for name in ("img_size", "batch_size", "accum", "log_every", "save_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise bad(name, ">= 1")
        if self.steps is not None and self.steps < 1:
            raise bad("steps", ">= 1")
        if self.epochs is not None and not self.epochs > 0:
            raise bad("epochs", "> 0")
        for name in ("keep_last", "num_workers"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise bad("warmup_fraction", "in [0, 1]")
        if not 0.0 < self.mask_ratio < 1.0:
            raise bad("mask_ratio", "in (0, 1)")
        if self.mask_strategy not in MASK_STRATEGIES:
            raise bad("mask_strategy", f"one of {list(MASK_STRATEGIES)}")
        for name in ("decoder_depth", "decoder_embed_dim", "decoder_num_heads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad(name, ">= 1 (or unset for the preset's)")
        check_data_settings(self)
        if self.param_dtype is not None and self.param_dtype not in PARAM_DTYPES:
            raise bad("param_dtype", f"one of {list(PARAM_DTYPES)} (or unset)")
        if self.micro_batch is not None and self.micro_batch not in MICRO_BATCH_MODES:
            raise bad("micro_batch", f"one of {list(MICRO_BATCH_MODES)} (or unset: one pass per batch)")
        if self.fp8_recipe not in FP8_RECIPES:
            raise bad("fp8_recipe", f"one of {list(FP8_RECIPES)}")

    def _check_combinations(self) -> None:
        """Settings that are fine alone but not together: ``SettingError`` naming them."""
        if self.parallel == "fsdp" and self.precision == "fp16":
            raise SettingError("precision must be bf16 or fp32 with parallel fsdp (fp16's loss scaling is not "
                               "sharded), got fp16", ("precision", "parallel"))
        if self.param_dtype == "bf16" and self.precision not in (None, "bf16"):
            raise SettingError(f"param_dtype bf16 trains under bf16 autocast: it needs precision bf16, got "
                               f"{self.precision}", ("param_dtype", "precision"))
        if self.cuda_graph and self.precision == "fp16":
            raise SettingError("cuda_graph cannot be used with precision fp16: its GradScaler decides skipped steps "
                               "on the host", ("cuda_graph", "precision"))
        if self.precision == "fp8":
            from fastmae.train.fp8 import fp8_unavailable_reason

            if self.parallel == "fsdp":
                raise SettingError("precision fp8 is not supported with parallel fsdp (float8 all-gathers are not set "
                                   "up); use parallel ddp", ("precision", "parallel"))
            why = fp8_unavailable_reason(self.device)
            if why is not None:
                raise SettingError(f"precision fp8 cannot run here: {why}", ("precision",))
        patch = patch_size_of(self.model)
        if self.img_size % patch:
            raise SettingError(f"img_size must be a multiple of {patch}, the patch size of {self.model}, got "
                               f"{self.img_size}", ("img_size",))
        num_patches = (self.img_size // patch) ** 2
        len_keep = int(num_patches * (1 - self.mask_ratio))  # as the model computes it
        if not 1 <= len_keep < num_patches:
            raise SettingError(f"mask_ratio must keep at least one of the {num_patches} patches of img_size "
                               f"{self.img_size} (patch size {patch}) and remove at least one, i.e. be in "
                               f"(0, {1 - 1 / num_patches:.4g}]; got {self.mask_ratio}, which keeps {len_keep}",
                               ("mask_ratio", "img_size"))
        if self.mask_strategy == "grid":
            from fastmae.masking import grid_strategy_problem

            grid = self.img_size // patch
            problem = grid_strategy_problem((grid, grid), len_keep)
            if problem is not None:
                raise SettingError(f"mask_strategy grid keeps the top-left patch of every 2x2 cell of the patch grid, "
                                   f"so it needs mask_ratio 0.75 and an even grid (img_size a multiple of "
                                   f"{2 * patch}): {problem} (mask_ratio {self.mask_ratio}, img_size "
                                   f"{self.img_size})", ("mask_strategy", "mask_ratio", "img_size"))
        self._check_decoder()

    def _check_decoder(self) -> None:
        """The decoder's width must be a multiple of its heads and of 4 (the sin-cos table), given or the preset's
        (read from the preset built on the meta device)."""
        overrides = {name: getattr(self, name) for name in ("decoder_depth", "decoder_embed_dim", "decoder_num_heads")}
        if all(value is None for value in overrides.values()):
            return
        import torch

        with torch.device("meta"):
            preset = model_presets()[self.model]()
        dim = overrides["decoder_embed_dim"] or preset.decoder_embed.out_features
        heads = overrides["decoder_num_heads"] or preset.decoder_blocks[0].attn.num_heads
        if dim % heads or dim % 4:
            raise SettingError(f"decoder_embed_dim must be a multiple of decoder_num_heads and of 4, got "
                               f"decoder_embed_dim {dim} and decoder_num_heads {heads} ({self.model}'s unless given)",
                               ("decoder_embed_dim", "decoder_num_heads"))

    def model_overrides(self) -> dict:
        """The preset factory's keyword arguments that replace its decoder: the decoder settings given (not None)."""
        return {name: getattr(self, name) for name in ("decoder_depth", "decoder_embed_dim", "decoder_num_heads")
                if getattr(self, name) is not None}

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
        """The config of ``values`` (a config file's keys): ``config_from_dict``'s."""
        return config_from_dict(cls, values)


ConfigT = typing.TypeVar("ConfigT")


def config_from_dict(cls: type[ConfigT], values: dict[str, typing.Any]) -> ConfigT:
    """The config dataclass ``cls`` of ``values`` (a config file's keys); unknown keys raise ``ValueError``, wrongly
    typed values ``TypeError`` (from the class's own check)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
    return cls(**values)
