"""MAE pretraining in one process or under ``torchrun`` (DDP or FSDP2): ``fastmae pretrain``.

The output folder holds ``config.json`` (the effective configuration), ``metrics.jsonl`` (one object per logged
step: step, loss, lr, img_per_s, skipped_steps, grad_norm), TensorBoard events in ``tensorboard/``,
``checkpoints/``, ``loss.png`` (the losses against the step, redrawn at each checkpoint) and ``reconstruction.png``.
With held-out images (``heldout``; without ``data``, the demo's held-out crops) each row of ``metrics.jsonl`` also
holds ``heldout_loss`` and ``heldout_baseline`` (``fastmae.train.heldout``), and the figure shows them. Running the same command again resumes from the newest complete
checkpoint: model, optimiser, loss scaler, step, loader position and every rank's RNG state, and the masks
are a function of (seed, step) (``fastmae.train.masks``), so an fp32 run with ``deterministic`` resumes
bit-exactly.

Stops: ``PretrainSummary.status == "preempted"`` after SIGTERM/SIGUSR1 (``fastmae.train.preemption``; the CLI
exits with 75), ``NonFiniteError`` after too many consecutive non-finite steps (``fastmae.train.nonfinite``;
the CLI exits with 3). A run whose newest checkpoint is already at its last step is left as it is
(``status == "already complete"``). Settings that cannot work raise ``SettingError`` before the output folder is
touched (the CLI exits with 2).

The step runs eagerly, or compiled with the whole step captured in one CUDA graph (``fastmae.train.cuda_graph``:
the default on CUDA for one process; the run prints which and why); ``micro_batch auto`` runs each batch in passes
measured to fit the GPU (``fastmae.train.memory``); ``precision fp8`` runs the blocks' Linears in float8
(``fastmae.train.fp8``). Running out of device memory in training stops with a ``SettingError`` that names the batch
and what to change (exit 2), not a traceback.

``pretrain()`` builds a ``Trainer`` (data, model, optimiser, loss scaler, non-finite guard) and runs its ``fit``;
``TrainHooks`` (``fastmae.train.hooks``) are the points where tests inject faults.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fastmae.data.bad_files import BadImageError
from fastmae.data.demo import demo_dataset
from fastmae.data.eval_transform import ImageFiles, eval_transform
from fastmae.data.images import list_images
from fastmae.data.loader import dali_available, pretrain_loader
from fastmae.masking import mask_noise_for
from fastmae.model import MaskedAutoencoderViT
from fastmae.train.checkpoint import (list_checkpoints, load_latest_checkpoint, prune_checkpoints, save_checkpoint,
                                      write_atomic)
from fastmae.train.config import PretrainConfig, SettingError, model_presets, saved_run_config
from fastmae.train.cuda_graph import (CAPTURABLE_ADAMW, PAPER_BETAS, GraphedStep, capturable_adamw,
                                      choose_fast_path, nonfinite_flag, update)
from fastmae.train.distributed import (Ranks, add_activation_checkpointing, barrier, close_ranks, gradient_sync,
                                       init_ranks, wrap_model)
from fastmae.train.faults import fault_hooks
from fastmae.train.figure import save_reconstruction_figure
from fastmae.train.fp8 import convert_to_fp8
from fastmae.train.heldout import HeldOut
from fastmae.train.hooks import TrainHooks
from fastmae.train.loss_plot import save_loss_plot
from fastmae.train.masks import mask_noise
from fastmae.train.master_weights import MasterWeights
from fastmae.train.memory import (MemoryPlan, adamw_state_bytes, agree_micro_batch, measure_pass_peak,
                                  out_of_memory_message, plan_micro_batch, recorded_micro_batch, usable_memory)
from fastmae.train.nonfinite import NonFiniteError, NonFiniteGuard, skip_syncs_host
from fastmae.train.optim import (adapt_optimizer_state, build_optimizer, choose_optimizer, lr_at, param_groups,
                                 saved_by_other_adamw)
from fastmae.train.preemption import PreemptionWatch
from fastmae.train.run_log import RunLog
from fastmae.train.sharded import load_sharded, save_sharded
from fastmae.train.state import restore_training_state, training_state


@dataclass
class PretrainSummary:
    """What :func:`pretrain` did.

    ``steps``: the step the run stopped at (counted from the start, resumed steps included); ``first_loss`` and
    ``final_loss``: the first and last logged loss of this invocation (NaN when it logged none);
    ``img_per_s``: this invocation's training throughput over all ranks (saves excluded); ``output``: the output
    folder; ``status``: "complete", "preempted" after SIGTERM/SIGUSR1 and its checkpoint, or "already complete"
    when the newest checkpoint was at (or past) the last step and nothing was done; ``skipped_steps``: non-finite
    steps skipped since the run began (a resumed run's count included); ``heldout_loss`` and ``heldout_baseline``:
    the last held-out scores (``fastmae.train.heldout``; NaN without held-out images); ``outputs``: the files and
    folders of the output folder, for the summary line.
    """

    steps: int
    first_loss: float
    final_loss: float
    img_per_s: float
    output: Path
    status: str = "complete"  # or "preempted", "already complete"
    skipped_steps: int = 0
    heldout_loss: float = float("nan")  # the last held-out loss (NaN without held-out images)
    heldout_baseline: float = float("nan")  # the flat-patch baseline's loss on the same images and masks
    outputs: tuple[str, ...] = ()  # what the output folder holds, as the summary line lists it


DEMO_CROPS_PER_PHOTO = 64  # training crops of each demo photo (fastmae.data.demo)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,  # the config's precisions ->
          "fp8": torch.bfloat16}  # their autocast dtype (fp8: float8 Linears, bf16 autocast for the rest)


def _write_json_atomic(path: Path, obj: object) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def total_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The global gradient norm, a device scalar (under FSDP the shards' norms are combined across ranks)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def pretrain(cfg: PretrainConfig, progress: bool = True, hooks: TrainHooks | None = None) -> PretrainSummary:
    """Train ``cfg.model`` with the MAE objective; resumes from ``cfg.output`` when it holds a checkpoint.

    ``hooks``: called at fixed points of the loop (``fastmae.train.hooks``); default: the faults of
    ``FASTMAE_FAULT`` when it is set (``fastmae.train.faults``), else none. Settings that cannot work raise
    ``SettingError`` before the output folder is touched, and before any data is read unless they depend on the
    data (a batch larger than each rank's share of the images).
    """
    check_run(cfg)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    ranks = init_ranks(cfg.device)
    watch = PreemptionWatch(ranks)
    try:
        trainer = Trainer(cfg, ranks, hooks if hooks is not None else fault_hooks(ranks.rank), progress)
        return trainer.fit(watch)
    except NonFiniteError:
        barrier(ranks)  # every rank stops at the same step: leave together, so that none is killed mid-exit
        raise
    finally:
        close_ranks(ranks)
        watch.close()  # after the last collective: a signal until then still stops the run cleanly
        torch.use_deterministic_algorithms(deterministic)


def new_model(cfg: PretrainConfig) -> MaskedAutoencoderViT:
    """A freshly initialised ``cfg.model`` for ``cfg.img_size`` and ``cfg.norm_pix_loss``, with the decoder settings
    given in ``cfg`` in place of the preset's (on the CPU; the current RNG state gives the weights)."""
    return model_presets()[cfg.model](img_size=cfg.img_size, norm_pix_loss=cfg.norm_pix_loss,
                                      **cfg.model_overrides())


def check_run(cfg: PretrainConfig) -> None:
    """``SettingError`` for settings that are valid in themselves but cannot run here: a device this machine does
    not have, a ``data`` path that does not exist, an ``output`` that is a file, the DALI loader without DALI."""
    if cfg.device is not None:
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise SettingError(f"device must be a name torch knows, such as cpu, cuda or cuda:1, got {cfg.device!r}",
                               ("device",)) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SettingError(f"device must be cpu on this machine (torch sees no CUDA GPU), got {cfg.device!r}",
                               ("device",))
    if cfg.data is not None and not Path(cfg.data).exists():
        raise SettingError(f"data must be an image folder or a text file listing image paths, got {cfg.data!r}, "
                           "which does not exist", ("data",))
    if cfg.heldout is not None and not Path(cfg.heldout).exists():
        raise SettingError(f"heldout must be an image folder or a text file listing image paths, got "
                           f"{cfg.heldout!r}, which does not exist", ("heldout",))
    if Path(cfg.output).exists() and not Path(cfg.output).is_dir():
        raise SettingError(f"output must be a folder, got {cfg.output!r}, which is a file", ("output",))
    if cfg.loader == "dali" and not dali_available():
        raise SettingError("loader must be torch or auto here: NVIDIA DALI is not installed (pip install "
                           "nvidia-dali-cuda130, or fastmae[dali]), got 'dali'", ("loader",))
    check_same_objective(cfg)


# What a resumed run must share with the run that wrote its checkpoints: the model and what it learns to do. Other
# settings (steps, epochs, workers, logging, the loader, the device, the fast path) may change between runs.
OBJECTIVE_KEYS = ("model", "img_size", "mask_ratio", "mask_strategy", "norm_pix_loss", "decoder_depth",
                  "decoder_embed_dim", "decoder_num_heads")


def check_same_objective(cfg: PretrainConfig) -> None:
    """``SettingError`` when ``cfg.output`` holds checkpoints of a run whose ``config.json`` differs from ``cfg`` in
    an ``OBJECTIVE_KEYS`` setting: resuming would silently continue another experiment (another mask strategy, say)
    and overwrite its ``config.json``. Nothing is checked without checkpoints or without a readable ``config.json``
    (a folder written before the file existed)."""
    out = Path(cfg.output)
    saved = saved_run_config(out) if list_checkpoints(out / "checkpoints") else None
    if saved is None:
        return
    asked = dataclasses.asdict(cfg)
    changed = [key for key in OBJECTIVE_KEYS if key in saved and saved[key] != asked[key]]
    if changed:
        pairs = ", ".join(f"{key} {saved[key]!r} (asked: {asked[key]!r})" for key in changed)
        raise SettingError(f"output {str(out)!r} holds checkpoints of another run: it was made with {pairs}; resume "
                           "it with its settings, or choose another output folder", tuple(changed))


@dataclass
class StepResult:
    """What one optimiser step left: its mean loss over the accumulated passes and whether it was skipped (device
    scalars, not synced), the global gradient norm (a device scalar, or None when not computed) and its lr."""

    loss: torch.Tensor
    skipped: torch.Tensor
    grad_norm: torch.Tensor | None
    lr: float


class Trainer:
    """One rank's pretraining run: built from the config (data, model, optimiser, loss scaler, non-finite guard),
    then ``fit()``: resume from the newest checkpoint, ``train_step()`` after ``train_step()``, ``save()`` at
    intervals, the figure at the end. ``step`` counts the optimiser steps done, resumed ones included."""

    def __init__(self, cfg: PretrainConfig, ranks: Ranks, hooks: TrainHooks, progress: bool) -> None:
        self.cfg, self.ranks, self.hooks, self.progress = cfg, ranks, hooks, progress
        self.device = ranks.device
        self.out = Path(cfg.output)
        self.checkpoints = self.out / "checkpoints"
        self.precision = cfg.precision or ("bf16" if self.device.type == "cuda" else "fp32")
        self.param_dtype = DTYPES[self.precision]
        self.fsdp = cfg.parallel == "fsdp" and ranks.distributed  # fsdp with fp16 is refused by PretrainConfig
        self.fast = choose_fast_path(cfg, self.device, ranks.world_size, self.precision,
                                     type(hooks).on_loss is not TrainHooks.on_loss)
        self.step = 0
        self.heldout_loss = self.heldout_baseline = float("nan")  # the last scored, NaN before
        self._build_data()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self._build_model()
        self._build_optimizer()
        torch.manual_seed(cfg.seed + ranks.rank)  # each rank its own stream from here on

    def _build_data(self) -> None:
        """The loader of this rank's shard, and the run's length and learning rate, which depend on its size."""
        cfg, ranks = self.cfg, self.ranks
        if ranks.is_main and cfg.data is None:  # rank 0 writes the demo files
            demo_dataset(crops_per_photo=DEMO_CROPS_PER_PHOTO, split="train")
        barrier(ranks)
        self.data_root = (Path(cfg.data) if cfg.data is not None
                          else demo_dataset(crops_per_photo=DEMO_CROPS_PER_PHOTO, split="train"))
        heldout = (cfg.heldout if cfg.heldout is not None
                   else demo_dataset(crops_per_photo=DEMO_CROPS_PER_PHOTO, split="heldout") if cfg.data is None
                   else None)
        try:
            self.heldout_files = list_images(heldout) if heldout is not None else []
        except ValueError as exc:
            raise SettingError(f"{exc} (heldout {str(heldout)!r})", ("heldout",)) from exc
        try:
            self.loader = pretrain_loader(self.data_root, cfg.batch_size, cfg.img_size, device=self.device,
                                          dtype=self.param_dtype if self.fsdp else torch.float32, seed=cfg.seed,
                                          rank=ranks.rank, world_size=ranks.world_size, num_workers=cfg.num_workers,
                                          backend=self._loader_backend(), on_bad_file=cfg.on_bad_file,
                                          max_skip_fraction=cfg.max_skip_fraction, check=cfg.bad_file_check)
        except BadImageError:
            raise
        except ValueError as exc:  # data that is no image list, or fewer images than one batch per rank
            raise SettingError(f"{exc} (data {str(self.data_root)!r}, batch_size {cfg.batch_size})",
                               ("data", "batch_size")) from exc
        steps_per_epoch = len(self.loader) // cfg.accum
        if steps_per_epoch < 1:
            raise SettingError(f"batch_size x accum must fit one step into each rank's share of the "
                               f"{self.loader.num_images} images of {str(self.data_root)!r} ({ranks.world_size} "
                               f"rank(s)), got {cfg.batch_size} x {cfg.accum}", ("batch_size", "accum"))
        self.total_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
        self.images_per_step = cfg.batch_size * cfg.accum * ranks.world_size
        self.base_lr = cfg.blr * self.images_per_step / 256
        self.warmup_steps = int(cfg.warmup_fraction * self.total_steps)

    def _loader_backend(self) -> str:
        """``cfg.loader``, except that the demo on a CPU takes the torch loader for ``auto``: its 128 px crops
        decode in no time on DataLoader workers, while DALI's CPU pipeline, sharing two cores with the model,
        measured 5-10x slower per step (docs/demo-recipe.md)."""
        if self.cfg.loader == "auto" and self.cfg.data is None and self.device.type == "cpu":
            return "torch"
        return self.cfg.loader

    def _build_model(self) -> None:
        """The model (float8 Linears with precision fp8, bf16 parameters with param_dtype bf16), the passes of a
        batch (``micro_batch``), and ``train_model``: the model wrapped for DDP / FSDP, maybe compiled."""
        cfg = self.cfg
        self.model = new_model(cfg).to(self.device)
        self.num_patches = self.model.patch_embed.num_patches
        self.len_keep = int(self.num_patches * (1 - cfg.mask_ratio))
        self.heldout = (HeldOut(self.heldout_files, cfg.img_size, self.model.patch_embed.grid_size, cfg.mask_ratio,
                                self.device, self.param_dtype if self.fsdp else torch.float32, cfg.mask_strategy)
                        if self.heldout_files else None)
        if self.precision == "fp8":
            convert_to_fp8(self.model, cfg.fp8_recipe)
        self.masters = MasterWeights(self.model) if self.fast.param_dtype == "bf16" else None
        if cfg.activation_checkpointing:
            add_activation_checkpointing(self.model)
        self.amp = torch.autocast(self.device.type, dtype=self.param_dtype, enabled=self.precision != "fp32",
                                  cache_enabled=False if self.fast.cuda_graph else None)  # no cast cache in a graph
        self.memory_plan = self._plan_memory() if cfg.micro_batch == "auto" else None
        self.micro_batch = self.memory_plan.micro_batch if self.memory_plan is not None else cfg.batch_size
        self.passes = cfg.batch_size // self.micro_batch  # forward/backward passes per batch
        self.train_model = wrap_model(self.model, self.ranks, cfg.parallel, self.param_dtype, self.fast.compile)

    def _plan_memory(self) -> MemoryPlan:
        """``micro_batch auto``: the passes each batch is split into, measured on the device before compiling
        (``fastmae.train.memory``); a resumed run keeps its recorded choice while it fits."""
        cfg = self.cfg
        if self.fsdp:
            raise SettingError("micro_batch auto measures the unsharded model: it cannot plan for parallel fsdp; "
                               "unset micro_batch or use parallel ddp", ("micro_batch", "parallel"))
        usable = usable_memory(self.device)
        if usable is None:
            raise SettingError(f"micro_batch auto measures GPU memory: it needs a CUDA device, the device is "
                               f"{self.device.type}", ("micro_batch",))
        keep = recorded_micro_batch(self.out, cfg.batch_size) if list_checkpoints(self.checkpoints) else None
        peak_of = functools.partial(measure_pass_peak, self.model, self.amp, cfg.img_size, cfg.mask_ratio, self.device)
        plan, error = None, None
        try:
            plan = plan_micro_batch(cfg.batch_size, usable, peak_of, adamw_state_bytes(self.model), keep)
        except SettingError as exc:
            error = exc
        return agree_micro_batch(plan, error, self.ranks)

    def _build_optimizer(self) -> None:
        """AdamW (fused and capturable for a CUDA graph; over the fp32 masters with bf16 parameters), the fp16 loss
        scaler (disabled otherwise), the non-finite guard, and with a CUDA graph the ``graphed`` step."""
        cfg = self.cfg
        groups = self.masters.param_groups(cfg.weight_decay) if self.masters is not None else None
        self.graphed = None
        if self.fast.cuda_graph:  # the learning rate is a device tensor the captured step reads
            self.optimizer, lr = capturable_adamw(groups or param_groups(self.model, cfg.weight_decay), self.base_lr,
                                                  PAPER_BETAS, self.device)
            self.graphed = GraphedStep(self._graph_body, lr, self._zero_grads, self.device)
        else:
            self.optimizer = build_optimizer(self.model, lr=self.base_lr, weight_decay=cfg.weight_decay, groups=groups)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.guard = NonFiniteGuard(self.ranks, cfg.max_nonfinite)

    def resume(self) -> Path | None:
        """Load the newest loadable checkpoint of the output folder into the run (``step`` included); its path,
        or None when there is none."""
        newest = list_checkpoints(self.checkpoints)[-1:]
        if self.fsdp and newest and newest[0].is_file():
            raise SettingError(f"parallel must be ddp to resume {str(newest[0])!r}, a one-file checkpoint (one "
                               "process or DDP), got fsdp", ("parallel",))
        resumed = load_latest_checkpoint(self.checkpoints, self._load, self.ranks)
        return None if resumed is None else resumed[0]

    def _load(self, path: Path, state: dict) -> None:
        """Apply the checkpoint ``path`` (its training state ``state``) to the model, optimiser and the rest."""
        if path.is_dir():
            load_sharded(path, self.model, self.optimizer)
        else:
            self.model.load_state_dict(state["model"])
            if saved_by_other_adamw(state["optimizer"], self.optimizer) and self.ranks.is_main:
                print(f"fastmae pretrain: {path.name} was saved by the other AdamW (apex's FusedAdam / torch's "
                      f"AdamW); its moments and step counts are carried over", flush=True)
            self.optimizer.load_state_dict(adapt_optimizer_state(state["optimizer"], self.optimizer))
        self.step = restore_training_state(state, self.scaler, self.loader, self.ranks)
        self.guard.skipped.fill_(state["skipped_steps"])

    def train_step(self) -> StepResult:
        """One optimiser step: ``cfg.accum`` batches, each in ``passes`` forward/backward passes, clipping, the
        non-finite check, the update (skipped when the check fails); ``step`` goes up by one. Eagerly, or replayed
        from one CUDA graph (``graphed``; captured at the first call, ``fastmae.train.cuda_graph``). What it returns
        is on the device, unsynced: a benchmark can time a built ``Trainer``'s calls of this method."""
        cfg, step = self.cfg, self.step + 1  # step: the number of the step being made
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.base_lr, cfg.min_lr)
        self.hooks.before_step(step)
        if self.graphed is not None:  # the graph skipped the update on the test the guard makes here
            step_loss, grad_norm, _ = self.graphed(self._batches(), lr)
            skipped = self.guard.check(step, step_loss, grad_norm)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            step_loss, grad_norm = self._passes(self._batches(), step)
            # fp16: inf/NaN gradients are the loss scaler's business; only a non-finite loss counts as bad
            skipped = self.guard.check(step, step_loss, None if self.scaler.is_enabled() else grad_norm)
            update(self.optimizer, self.scaler, skipped, self.masters)
            self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        return StepResult(step_loss, skipped, grad_norm, lr)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The step's ``cfg.accum`` batches, read one at a time, each with its masking noise."""
        cfg, ranks = self.cfg, self.ranks
        for micro in range(cfg.accum):
            imgs = next(self.loader)  # (B, 3, S, S)
            noise = mask_noise(cfg.seed, self.step * cfg.accum + micro, imgs.shape[0],
                               self.model.patch_embed.grid_size, self.len_keep, ranks.rank, ranks.world_size,
                               self.device, cfg.mask_strategy)  # (B, L)
            yield imgs, noise

    def _passes(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward of every pass of ``batches`` (``imgs (B, 3, S, S)``, ``noise (B, L)``; each batch in
        ``passes`` row slices of ``micro_batch``), then the gradient norm and clipping: the step's mean loss and the
        norm (None when neither needed: fp16 without clipping)."""
        cfg = self.cfg
        passes = cfg.accum * self.passes
        step_loss = torch.zeros((), device=self.device)
        for micro, (imgs, noise) in enumerate(batches):
            slices = zip(imgs.split(self.micro_batch), noise.split(self.micro_batch))  # (b, 3, S, S), (b, L)
            for part, (part_imgs, part_noise) in enumerate(slices):
                with gradient_sync(self.train_model, micro == cfg.accum - 1 and part == self.passes - 1):
                    with self.amp:
                        loss, _, _ = self.train_model(part_imgs, mask_ratio=cfg.mask_ratio, noise=part_noise)
                    loss = self.hooks.on_loss(loss, step)
                    self.scaler.scale(loss / passes).backward()
                step_loss += loss.detach().float() / passes
        grad_norm = None
        if self.scaler.is_enabled() and cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
        if not self.scaler.is_enabled() or cfg.clip_grad is not None:
            grad_norm = total_grad_norm(self.params)
            if cfg.clip_grad is not None:
                torch.nn.utils.clip_grads_with_norm_(self.params, cfg.clip_grad, grad_norm, foreach=True)
        return step_loss, grad_norm

    def _graph_body(self, batches: list[tuple[torch.Tensor, torch.Tensor]],
                    no_update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step ``graphed`` captures (one process, no loss scaler): the passes, the non-finite test, the update
        skipped on the device when it fails or ``no_update`` is set, gradients cleared; the loss, the norm and the
        skip flag."""
        loss, grad_norm = self._passes(batches, self.step + 1)
        skip = nonfinite_flag(loss, grad_norm) | no_update
        update(self.optimizer, self.scaler, skip, self.masters)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, skip

    def _zero_grads(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)

    def save(self) -> None:
        """Checkpoint the current step (collective): one file from rank 0, or every rank's shards under FSDP."""
        cfg, ranks = self.cfg, self.ranks
        state = training_state(self.step, self.scaler, self.loader, self.guard.skipped_total(), ranks)
        before_commit = functools.partial(self.hooks.before_commit, self.step)
        if self.fsdp:
            save_sharded(self.checkpoints, self.step, self.model, self.optimizer, state, ranks, before_commit)
            if ranks.is_main:
                prune_checkpoints(self.checkpoints, cfg.keep_last)
        else:
            if ranks.is_main:
                save_checkpoint(self.checkpoints, self.step, {"model": self.model.state_dict(),
                                                              "optimizer": self.optimizer.state_dict(), **state},
                                keep_last=cfg.keep_last, before_commit=before_commit)
            barrier(ranks)
        self.hooks.after_save(self.step)

    def fit(self, watch: PreemptionWatch) -> PretrainSummary:
        """Resume, train to ``total_steps`` (logging and saving at intervals) or until ``watch`` agrees on a
        preemption (then save and stop), and draw the figure. A run already at ``total_steps`` changes nothing."""
        cfg, ranks = self.cfg, self.ranks
        resumed = self.resume()
        if self.step >= self.total_steps:
            return self._already_complete()
        self._write_config()
        self._announce(resumed)
        log = RunLog(self.out, ranks, self.step, self.total_steps, self.images_per_step, self.progress)
        status = "complete"
        self.model.train()
        try:
            while self.step < self.total_steps:
                try:
                    result = self.train_step()
                except torch.OutOfMemoryError as exc:
                    raise SettingError(out_of_memory_message(cfg.batch_size, self.passes, self.device),
                                       ("batch_size", "micro_batch", "accum")) from exc
                log.add_step(result.loss, result.skipped)
                preempted = watch.agreed()
                last = self.step == self.total_steps
                if self.step % cfg.log_every == 0 or last or preempted:
                    self.guard.raise_if_exhausted()
                    extra = {"skipped_steps": self.guard.skipped_total()}
                    if result.grad_norm is not None:
                        extra["grad_norm"] = float(result.grad_norm)
                    extra.update(self.score_heldout(log))
                    log.write(self.step, result.lr, extra)
                if self.step % cfg.save_every == 0 or last or preempted:
                    self.guard.raise_if_exhausted()
                    self.save()
                    self.plot_losses()
                    log.pause_clock()
                if preempted:
                    status = "preempted"
                    if watch.signal_name is not None:
                        print(f"fastmae pretrain (rank {ranks.rank}): {watch.signal_name} received", flush=True)
                    if ranks.is_main:
                        print(f"fastmae pretrain: preempted: saved step {self.step} and stopped; the same command "
                              "resumes", flush=True)
                    break
        finally:
            log.close()
        outputs = ["config.json", "metrics.jsonl", "tensorboard/", "checkpoints/", "loss.png"]
        if status == "complete":
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.masters is not None):
                _save_figure(cfg, self.model, ranks, self.fsdp, self.loader.files, self.heldout, self.step, self.out)
            outputs.append("reconstruction.png")
        return PretrainSummary(self.step, log.first_loss, log.final_loss, log.img_per_s, self.out, status,
                               self.guard.skipped_total(), self.heldout_loss, self.heldout_baseline, tuple(outputs))

    def score_heldout(self, log: RunLog) -> dict[str, float]:
        """The held-out loss and its flat-patch baseline, for the metrics row (none without held-out images);
        the time it takes is not counted as training time."""
        if self.heldout is None:
            return {}
        start = time.perf_counter()
        with self.amp:
            self.heldout_loss = self.heldout.score(self.model)  # every rank: under FSDP the forward is collective
        self.heldout_baseline = self.heldout.baseline
        log.exclude_time(time.perf_counter() - start)
        return {"heldout_loss": self.heldout_loss, "heldout_baseline": self.heldout_baseline}

    def plot_losses(self) -> None:
        """Rank 0 redraws ``loss.png`` from ``metrics.jsonl``."""
        if self.ranks.is_main:
            save_loss_plot(self.out / "metrics.jsonl", self.out / "loss.png",
                           title=f"{self.cfg.model}, {self.cfg.img_size} px, step {self.step} of {self.total_steps}")

    def _write_config(self) -> None:
        """Rank 0 creates the output folder and writes ``config.json``: the effective configuration."""
        if not self.ranks.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.out / "config.json", {
            **dataclasses.asdict(self.cfg), "data": str(self.data_root), "device": str(self.device),
            "precision": self.precision, "world_size": self.ranks.world_size,
            "effective_batch_size": self.images_per_step, "total_steps": self.total_steps, "lr": self.base_lr,
            "compile": self.fast.compile, "cuda_graph": self.fast.cuda_graph, "param_dtype": self.fast.param_dtype,
            "micro_batch_size": self.micro_batch})

    def _announce(self, resumed: Path | None) -> None:
        """Rank 0 prints the data, the setup and where the run resumes."""
        if not self.ranks.is_main:
            return
        ranks = self.ranks
        print(f"fastmae pretrain: data: {self.loader.describe()}", flush=True)
        choice = CAPTURABLE_ADAMW if self.graphed is not None else choose_optimizer(self.device)
        sync_note = (f"; host sync per step for the non-finite check with {choice.name}"
                     if skip_syncs_host(self.optimizer, self.scaler) else "")
        print(f"fastmae pretrain: {ranks.world_size} rank(s) "
              f"({self.cfg.parallel if ranks.distributed else 'one process'}) on {self.device.type}, "
              f"{self.precision}, optimizer {choice}{sync_note}", flush=True)
        print(f"fastmae pretrain: {self.fast.describe()}", flush=True)
        if self.memory_plan is not None:
            print(f"fastmae pretrain: {self.memory_plan.describe()}", flush=True)
        if resumed is not None:
            print(f"fastmae pretrain: resuming from {resumed} (step {self.step})", flush=True)

    def _already_complete(self) -> PretrainSummary:
        """The summary of a run whose checkpoint is already at (or past) ``total_steps``: rank 0 says so and how to
        extend it; nothing is written."""
        if self.ranks.is_main:
            where = (f"at step {self.step} of {self.total_steps}" if self.step == self.total_steps
                     else f"at step {self.step}, past the {self.total_steps} steps asked for")
            print(f"fastmae pretrain: {self.out} is already complete: its newest checkpoint is {where}; nothing to do. "
                  f"To train longer, run again with the same --output and a larger --steps or --epochs: it continues "
                  f"from step {self.step}.", flush=True)
        nan = float("nan")
        return PretrainSummary(self.step, nan, nan, 0.0, self.out, "already complete", self.guard.skipped_total())


def _save_figure(cfg: PretrainConfig, model: MaskedAutoencoderViT, ranks: Ranks, fsdp: bool, files: list[Path],
                 heldout: HeldOut | None, step: int, out: Path) -> None:
    """``reconstruction.png``, drawn by rank 0 (FSDP: from the gathered full weights): held-out images with their
    fixed masks (one per class folder, up to nine, when there are six or more folders; else six spread over the
    list), or without held-out images six of the (good) training ``files``."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not ranks.is_main:
            return
        model = new_model(cfg)
        model.load_state_dict(full)
        model.to(ranks.device)
    elif not ranks.is_main:
        return
    title = f"{cfg.model}, {cfg.img_size} px, step {step}, mask {cfg.mask_ratio}"
    if heldout is not None:
        rows = _figure_rows(heldout.files)
        save_reconstruction_figure(model, heldout.imgs[rows].float(), out / "reconstruction.png", cfg.mask_ratio,
                                   title=title + ", held-out images", step=step, heldout=True,
                                   noise=heldout.noise[rows], labels=[_label(heldout.files[i]) for i in rows])
        return
    shown = ImageFiles([files[i * len(files) // 6] for i in range(min(6, len(files)))], eval_transform(cfg.img_size))
    sample = torch.stack([shown[i] for i in range(len(shown))])  # (6, 3, S, S)
    noise = None  # random masks: the figure's own seeded draw
    if cfg.mask_strategy != "random":  # the masks the run trains with
        grid = model.patch_embed.grid_size
        noise = mask_noise_for(cfg.mask_strategy, len(sample), grid, int(grid[0] * grid[1] * (1 - cfg.mask_ratio)),
                               device=ranks.device)  # (6, L)
    save_reconstruction_figure(model, sample.to(ranks.device), out / "reconstruction.png", cfg.mask_ratio,
                               title=title + ", training images", step=step, heldout=False, noise=noise)


def _figure_rows(files: list[Path]) -> list[int]:
    """The rows of the figure: the first file of each folder (up to nine) when there are six folders or more,
    else six spread over ``files``."""
    firsts: dict[Path, int] = {}
    for i, path in enumerate(files):
        firsts.setdefault(path.parent, i)
    if len(firsts) >= 6:
        return list(firsts.values())[:9]
    return [i * len(files) // 6 for i in range(min(6, len(files)))]


def _label(path: Path) -> str:
    """A row's label: the folder and file name."""
    return f"{path.parent.name}/{path.name}"
