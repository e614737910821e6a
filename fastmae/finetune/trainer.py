"""``fastmae finetune`` and ``fastmae linprobe``: train a classifier on an ImageFolder, in one process or under
``torchrun`` (DDP, or FSDP2 with ``parallel fsdp``).

Design: the loop is ``fastmae pretrain``'s, built from the same pieces of ``fastmae.train``: ranks and DDP
(``distributed``), atomic one-file checkpoints with keep-last and fallback to an older one (``checkpoint``), the
training state with loader position and every rank's RNG (``state``), SIGTERM/SIGUSR1 -> save -> exit 75
(``preemption``), the non-finite guard (``nonfinite``), ``metrics.jsonl`` + TensorBoard + progress bar
(``run_log``), fault hooks (``faults``), AdamW selection (``optim``); with ``parallel fsdp`` under torchrun,
``wrap_model``'s FSDP2 (each block, frozen ones included, then the root; parameters in the autocast dtype, gradients
reduced in fp32) and sharded checkpoint folders (``sharded``) under pretrain's rules: an FSDP run refuses to resume
a one-file checkpoint, a one-process or DDP run resumes a sharded one. What differs:

- data: ``finetune_loader`` (labels; fine-tuning: RandomResizedCrop + flip + timm RandAugment + random erasing;
  linear probing: RandomResizedCrop + flip only) and, with ``val``, ``eval_loader`` scored at the end of every
  epoch and at the last step (``evaluate``), its results in that step's ``metrics.jsonl`` row;
- model (``classifier``): a ViT preset, loaded from ``pretrained``, partly frozen (``freeze_blocks``) or with the
  linear-probe head and everything else frozen (linprobe);
- optimiser: AdamW (0.9, 0.999) over layer-wise lr-decay groups (``lr_decay``), or LARS over the head (``lars``);
- schedule: at optimiser step ``s`` (0-based) the fraction of epochs done is ``s / steps_per_epoch``, and the lr
  is util/lr_sched.py's of it (linear warmup over ``warmup_epochs``, then half-cycle cosine to ``min_lr``) times
  each group's ``lr_scale``; ``lr_at`` in units of steps computes exactly that;
- loss: fine-tuning with mixup/cutmix: timm's ``Mixup`` (label smoothing inside) and ``SoftTargetCrossEntropy``;
  without: ``LabelSmoothingCrossEntropy`` (or plain cross-entropy at smoothing 0); linear probing: cross-entropy.
  ``Mixup`` draws from numpy's global generator: each pass draws with it seeded by (seed, step, pass, rank), so
  a resumed run mixes as the uninterrupted one did.

Checkpoints also hold ``classifier`` (``classifier_meta``: preset, size, pooling, head kind and the training
classes; in a sharded folder, in its ``extra.pt``), which ``fastmae eval`` reads and a resumed run checks. Under FSDP
the optimiser is built over the sharded parameters (the lr-decay groups by their unchanged names; LARS over the
head's shards, its norms reduced across ranks by DTensor); the buffers (the linear probe's BatchNorm running
statistics, which each rank updates from its own batches) are made rank 0's before each validation and save: the
values DDP, which broadcasts rank 0's buffers at every forward, would hold; validation runs the ranks' forwards in
step (``evaluate``'s ``lockstep_img_size``). Saves happen at the end of each epoch (or every ``save_every`` steps),
at the last step and on preemption.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fastmae.data.bad_files import BadImageError
from fastmae.data.eval import eval_loader, finetune_loader
from fastmae.data.loader import dali_available
from fastmae.data.sampling import uniforms
from fastmae.data.torch_backend import seeded_rngs
from fastmae.finetune.classifier import (add_linprobe_head, build_classifier, classifier_meta, freeze, load_encoder,
                                         train_mode)
from fastmae.finetune.config import ClassifierConfig, FinetuneConfig, eval_crop_fraction
from fastmae.finetune.evaluate import EvalResult, class_index_map, evaluate
from fastmae.finetune.lars import LARS
from fastmae.finetune.lr_decay import apply_lr, param_groups_lrd
from fastmae.train.checkpoint import (list_checkpoints, load_latest_checkpoint, prune_checkpoints, save_checkpoint,
                                      write_atomic)
from fastmae.train.config import SettingError
from fastmae.train.distributed import Ranks, barrier, close_ranks, gradient_sync, init_ranks, wrap_model
from fastmae.train.faults import fault_hooks
from fastmae.train.hooks import TrainHooks
from fastmae.train.nonfinite import NonFiniteError, NonFiniteGuard, optimizer_step
from fastmae.train.optim import adapt_optimizer_state, build_optimizer, choose_optimizer, lr_at
from fastmae.train.preemption import PreemptionWatch
from fastmae.train.pretrain import DTYPES, total_grad_norm
from fastmae.train.run_log import RunLog
from fastmae.train.sharded import load_sharded, save_sharded
from fastmae.train.state import restore_training_state, training_state

MIXUP_STREAM = 5  # the uniforms() stream of the mixup seeds (fastmae.data uses 0-4)
ADAMW_BETAS = (0.9, 0.999)  # main_finetune.py: torch's AdamW defaults


@dataclass
class ClassifierSummary:
    """What :func:`train_classifier` did: as ``PretrainSummary`` (steps, first/final logged training loss,
    img/s, output folder, status "complete" / "preempted" / "already complete", skipped non-finite steps,
    the output folder's entries), and ``val``: the last validation result (None without ``val``)."""

    steps: int
    first_loss: float
    final_loss: float
    img_per_s: float
    output: Path
    status: str = "complete"
    skipped_steps: int = 0
    val: EvalResult | None = None
    outputs: tuple[str, ...] = ()


def check_device(device: str | None) -> None:
    """``SettingError`` for a device name torch does not know, or CUDA on a machine without a GPU."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise SettingError(f"device must be a name torch knows, such as cpu, cuda or cuda:1, got {device!r}",
                           ("device",)) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"device must be cpu on this machine (torch sees no CUDA GPU), got {device!r}",
                           ("device",))


def check_run(cfg: ClassifierConfig) -> None:
    """``SettingError`` for settings valid in themselves that cannot run here: an unknown device, paths that do not
    exist, an ``output`` that is a file, the DALI loader without DALI."""
    check_device(cfg.device)
    for key, what in (("data", "an ImageFolder tree of training images"),
                      ("val", "an ImageFolder tree of validation images"),
                      ("pretrained", "a checkpoint file (or a pretraining run folder)")):
        value = getattr(cfg, key)
        if value is not None and not Path(value).exists():
            raise SettingError(f"{key} must be {what}, got {value!r}, which does not exist", (key,))
    if Path(cfg.output).exists() and not Path(cfg.output).is_dir():
        raise SettingError(f"output must be a folder, got {cfg.output!r}, which is a file", ("output",))
    if cfg.loader == "dali" and not dali_available():
        raise SettingError("loader must be torch or auto here: NVIDIA DALI is not installed, got 'dali'", ("loader",))


def train_classifier(cfg: ClassifierConfig, progress: bool = True,
                     hooks: TrainHooks | None = None) -> ClassifierSummary:
    """Fine-tune (``FinetuneConfig``) or linear-probe (``LinprobeConfig``); resumes from ``cfg.output``'s newest
    checkpoint. ``hooks`` as ``fastmae.train.pretrain.pretrain``'s. ``SettingError`` before anything is written
    (and before any data is read unless the error depends on the data)."""
    check_run(cfg)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    ranks = init_ranks(cfg.device)
    watch = PreemptionWatch(ranks)
    try:
        trainer = ClassifierTrainer(cfg, ranks, hooks if hooks is not None else fault_hooks(ranks.rank), progress)
        return trainer.fit(watch)
    except NonFiniteError:
        barrier(ranks)
        raise
    finally:
        close_ranks(ranks)
        watch.close()
        torch.use_deterministic_algorithms(deterministic)


@dataclass
class StepResult:
    loss: torch.Tensor
    skipped: torch.Tensor
    grad_norm: torch.Tensor | None
    lr: float


class ClassifierTrainer:
    """One rank's fine-tuning or linear-probing run (module docstring). ``step`` counts optimiser steps done."""

    def __init__(self, cfg: ClassifierConfig, ranks: Ranks, hooks: TrainHooks, progress: bool) -> None:
        self.cfg, self.ranks, self.hooks, self.progress = cfg, ranks, hooks, progress
        self.linprobe = not isinstance(cfg, FinetuneConfig)
        self.device = ranks.device
        self.out = Path(cfg.output)
        self.checkpoints = self.out / "checkpoints"
        self.precision = cfg.precision or ("bf16" if self.device.type == "cuda" else "fp32")
        self.accum = cfg.resolved_accum(ranks.world_size)
        self.fsdp = cfg.parallel == "fsdp" and ranks.distributed  # fsdp with fp16 is refused by ClassifierConfig
        self.step = 0
        self.val_result: EvalResult | None = None
        self._build_data()
        torch.manual_seed(cfg.seed)  # the same initial head on every rank
        self._build_model()
        self._build_optimizer()
        torch.manual_seed(cfg.seed + ranks.rank)

    def _build_data(self) -> None:
        """The training loader of this rank's shard, the validation loader, the classes, the run's length and lr."""
        cfg, ranks = self.cfg, self.ranks
        common = {"backend": cfg.loader, "device": self.device, "rank": ranks.rank, "world_size": ranks.world_size,
                  "on_bad_file": cfg.on_bad_file, "num_workers": cfg.num_workers,
                  "max_skip_fraction": cfg.max_skip_fraction, "check": cfg.bad_file_check}
        augment = ({} if self.linprobe else
                   {"re_prob": cfg.reprob, "re_mode": cfg.remode, "re_count": cfg.recount})
        try:
            self.loader = finetune_loader(cfg.data, cfg.batch_size, cfg.img_size, seed=cfg.seed,
                                          rand_augment=None if self.linprobe else cfg.auto_augment, **augment,
                                          **common)
        except BadImageError:
            raise
        except ValueError as exc:  # not an ImageFolder, or fewer images than one batch per rank
            raise SettingError(f"{exc} (data {cfg.data!r}, batch_size {cfg.batch_size})",
                               ("data", "batch_size")) from exc
        self.classes = self.loader.classes
        self.num_classes = cfg.num_classes if cfg.num_classes is not None else len(self.classes)
        if self.num_classes < len(self.classes):
            raise SettingError(f"num_classes must be at least the {len(self.classes)} classes of {cfg.data!r}, got "
                               f"{cfg.num_classes}", ("num_classes",))
        self.steps_per_epoch = len(self.loader) // self.accum
        if self.steps_per_epoch < 1:
            raise SettingError(f"batch_size x accum must fit one step into each rank's share of the "
                               f"{self.loader.num_images} images of {cfg.data!r} ({ranks.world_size} rank(s)), got "
                               f"{cfg.batch_size} x {self.accum}", ("batch_size", "accum"))
        self.total_steps = (cfg.steps if cfg.steps is not None
                            else max(1, math.ceil(cfg.epochs * self.steps_per_epoch)))
        self.images_per_step = cfg.batch_size * self.accum * ranks.world_size
        self.base_lr = cfg.blr * self.images_per_step / 256
        self.warmup_steps = cfg.warmup_epochs * self.steps_per_epoch  # a float: the official warmup is in epochs
        self.val_loader = self.label_map = None
        if cfg.val is not None:
            try:
                self.val_loader = eval_loader(cfg.val, cfg.batch_size, cfg.img_size, eval_crop_fraction(cfg.img_size),
                                              **common)
            except BadImageError:
                raise
            except ValueError as exc:
                raise SettingError(f"{exc} (val {cfg.val!r})", ("val",)) from exc
            self.label_map = class_index_map(self.classes, self.val_loader.classes, "val")

    def _build_model(self) -> None:
        """The classifier, loaded from ``pretrained``, frozen by the rule, wrapped for DDP or FSDP2, maybe
        compiled."""
        cfg = self.cfg
        drop_path = 0.0 if self.linprobe else cfg.drop_path
        self.model = build_classifier(cfg.vit, cfg.img_size, self.num_classes, cfg.global_pool, drop_path)
        self.loaded = None
        if cfg.pretrained is not None:
            try:
                self.loaded = load_encoder(self.model, cfg.pretrained, self.linprobe)
            except ValueError as exc:
                raise SettingError(f"pretrained {cfg.pretrained!r} cannot initialise {cfg.vit}: {exc}",
                                   ("pretrained", "model")) from None
        if self.linprobe:
            add_linprobe_head(self.model)
        self.frozen = freeze(self.model, self.linprobe, None if self.linprobe else cfg.freeze_blocks)
        self.model.to(self.device)
        self.train_model = wrap_model(self.model, self.ranks, cfg.parallel, DTYPES[self.precision], cfg.compile)
        self.meta = classifier_meta(cfg.vit, cfg.img_size, self.num_classes, cfg.global_pool, self.linprobe,
                                    self.classes, cfg.command)

    def _build_optimizer(self) -> None:
        """LARS over the head (linear probing) or AdamW over the lr-decay groups, built over the wrapped (under
        FSDP: sharded) parameters; the loss, mixup, scaler, guard."""
        cfg = self.cfg
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.linprobe:
            self.optimizer = LARS(self.model.head.parameters(), lr=self.base_lr, weight_decay=cfg.weight_decay)
            self.optimizer_name = "LARS (trust coefficient 0.001, momentum 0.9)"
            self.criterion: nn.Module = nn.CrossEntropyLoss()
            self.mixup = None
        else:
            groups = param_groups_lrd(self.model, cfg.weight_decay, self.model.no_weight_decay(), cfg.layer_decay)
            self.optimizer = build_optimizer(self.model, lr=self.base_lr, weight_decay=cfg.weight_decay,
                                             betas=ADAMW_BETAS, groups=groups)
            self.optimizer_name = f"{choose_optimizer(self.device)}, layer decay {cfg.layer_decay}"
            self.mixup, self.criterion = self._loss(cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.guard = NonFiniteGuard(self.ranks, cfg.max_nonfinite)
        self.amp = torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32")

    def _loss(self, cfg: FinetuneConfig) -> tuple[object | None, nn.Module]:
        """timm's ``Mixup`` (or None) and the criterion, as main_finetune.py chooses them."""
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        if cfg.mixup_active:
            mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                          switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                          num_classes=self.num_classes)
            return mixup, SoftTargetCrossEntropy()
        if cfg.smoothing > 0:
            return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
        return None, nn.CrossEntropyLoss()

    def resume(self) -> Path | None:
        """Load the newest loadable checkpoint of the output folder into the run (``step`` included); its path, or
        None when there is none. ``SettingError`` when FSDP would resume a one-file checkpoint (as pretrain)."""
        newest = list_checkpoints(self.checkpoints)[-1:]
        if self.fsdp and newest and newest[0].is_file():
            raise SettingError(f"parallel must be ddp to resume {str(newest[0])!r}, a one-file checkpoint (one "
                               "process or DDP), got fsdp", ("parallel",))
        resumed = load_latest_checkpoint(self.checkpoints, self._load, self.ranks)
        return None if resumed is None else resumed[0]

    def _load(self, path: Path, state: dict) -> None:
        """Apply checkpoint ``path`` (its contents ``state``; for a sharded folder its ``extra.pt``, the shards read
        by ``load_sharded``); ValueError when it is another run's."""
        saved = state.get("classifier", {})
        if saved != self.meta:
            changed = sorted(k for k in set(saved) | set(self.meta) if saved.get(k) != self.meta.get(k))
            raise ValueError(f"{path.name} is of another classifier (differs in {', '.join(changed)}): not this run's")
        if path.is_dir():
            load_sharded(path, self.model, self.optimizer)
        else:
            self.model.load_state_dict(state["model"])
            optimizer_state = state["optimizer"]
            if not self.linprobe:
                optimizer_state = adapt_optimizer_state(optimizer_state, self.optimizer)
            self.optimizer.load_state_dict(optimizer_state)
        self.step = restore_training_state(state, self.scaler, self.loader, self.ranks)
        self.guard.skipped.fill_(state["skipped_steps"])

    def _mixed(self, images: torch.Tensor, labels: torch.Tensor, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``images (N, 3, S, S)`` and their targets: mixed with timm's ``Mixup`` (soft targets ``(N, C)``) drawing
        from seeded generators, or the labels ``(N,)`` as they are."""
        if self.mixup is None:
            return images, labels
        counter = micro * self.ranks.world_size + self.ranks.rank
        seed = int(uniforms(self.cfg.seed, self.step, [counter], 1, stream=MIXUP_STREAM)[0, 0] * 2**62)
        with seeded_rngs(seed):
            return self.mixup(images, labels)

    def train_step(self) -> StepResult:
        """One optimiser step of ``accum`` passes; ``step`` goes up by one."""
        cfg, step = self.cfg, self.step + 1
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.base_lr, cfg.min_lr)
        apply_lr(self.optimizer, lr)
        self.hooks.before_step(step)
        step_loss = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            images, labels = next(self.loader)  # (B, 3, S, S), (B,)
            images, targets = self._mixed(images, labels, micro)
            with gradient_sync(self.train_model, micro == self.accum - 1):
                with self.amp:
                    logits = self.train_model(images)  # (B, C)
                loss = self.hooks.on_loss(self.criterion(logits.float(), targets), step)
                self.scaler.scale(loss / self.accum).backward()
            step_loss += loss.detach().float() / self.accum
        grad_norm = None
        if self.scaler.is_enabled() and cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
        if not self.scaler.is_enabled() or cfg.clip_grad is not None:
            grad_norm = total_grad_norm(self.params)
            if cfg.clip_grad is not None:
                torch.nn.utils.clip_grads_with_norm_(self.params, cfg.clip_grad, grad_norm, foreach=True)
        skipped = self.guard.check(step, step_loss, None if self.scaler.is_enabled() else grad_norm)
        optimizer_step(self.optimizer, self.scaler, skipped)
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        return StepResult(step_loss, skipped, grad_norm, lr)

    def score_val(self, log: RunLog) -> dict[str, float]:
        """Validation accuracy now (collective), for the metrics row; not counted as training time."""
        start = time.perf_counter()
        self._agree_buffers()
        self.val_result = evaluate(self.model, self.val_loader, self.label_map, self.ranks, self.amp,
                                   lockstep_img_size=self.cfg.img_size if self.fsdp else None)
        train_mode(self.model, self.frozen)
        log.exclude_time(time.perf_counter() - start)
        if self.ranks.is_main:
            print(f"fastmae {self.cfg.command}: step {self.step} (epoch {self.step / self.steps_per_epoch:.2f}): "
                  f"validation {self.val_result.line()}", flush=True)
        return {"epoch": self.step / self.steps_per_epoch, "val_acc1": self.val_result.acc1,
                "val_acc5": self.val_result.acc5, "val_loss": self.val_result.loss}

    def _agree_buffers(self) -> None:
        """Under FSDP (collective): every rank's buffers become rank 0's (module docstring)."""
        if self.fsdp:
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def save(self) -> None:
        """Checkpoint the current step (collective): rank 0 writes one file, or under FSDP every rank its shards
        (``classifier`` in ``extra.pt``)."""
        state = {**training_state(self.step, self.scaler, self.loader, self.guard.skipped_total(), self.ranks),
                 "classifier": self.meta}
        before_commit = functools.partial(self.hooks.before_commit, self.step)
        if self.fsdp:
            self._agree_buffers()
            save_sharded(self.checkpoints, self.step, self.model, self.optimizer, state, self.ranks, before_commit)
            if self.ranks.is_main:
                prune_checkpoints(self.checkpoints, self.cfg.keep_last)
        else:
            if self.ranks.is_main:
                save_checkpoint(self.checkpoints, self.step,
                                {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **state},
                                keep_last=self.cfg.keep_last, before_commit=before_commit)
            barrier(self.ranks)
        self.hooks.after_save(self.step)

    def fit(self, watch: PreemptionWatch) -> ClassifierSummary:
        """Resume, train to ``total_steps`` (logging, validating and saving on schedule) or until ``watch`` agrees on
        a preemption (then save and stop). A run already at ``total_steps`` changes nothing."""
        cfg, ranks = self.cfg, self.ranks
        resumed = self.resume()
        if self.step >= self.total_steps:
            return self._already_complete()
        self._write_config()
        self._announce(resumed)
        log = RunLog(self.out, ranks, self.step, self.total_steps, self.images_per_step, self.progress)
        status = "complete"
        train_mode(self.model, self.frozen)
        try:
            while self.step < self.total_steps:
                result = self.train_step()
                log.add_step(result.loss, result.skipped)
                preempted = watch.agreed()
                last = self.step == self.total_steps
                epoch_end = self.step % self.steps_per_epoch == 0
                scores = self.score_val(log) if self.val_loader is not None and (epoch_end or last) else {}
                if self.step % cfg.log_every == 0 or last or preempted or scores:
                    self.guard.raise_if_exhausted()
                    extra = {"skipped_steps": self.guard.skipped_total(), **scores}
                    if result.grad_norm is not None:
                        extra["grad_norm"] = float(result.grad_norm)
                    log.write(self.step, result.lr, extra)
                save_due = self.step % cfg.save_every == 0 if cfg.save_every is not None else epoch_end
                if save_due or last or preempted:
                    self.guard.raise_if_exhausted()
                    self.save()
                    log.pause_clock()
                if preempted:
                    status = "preempted"
                    if watch.signal_name is not None:
                        print(f"fastmae {cfg.command} (rank {ranks.rank}): {watch.signal_name} received", flush=True)
                    if ranks.is_main:
                        print(f"fastmae {cfg.command}: preempted: saved step {self.step} and stopped; the same "
                              "command resumes", flush=True)
                    break
        finally:
            log.close()
        return ClassifierSummary(self.step, log.first_loss, log.final_loss, log.img_per_s, self.out, status,
                                 self.guard.skipped_total(), self.val_result,
                                 ("config.json", "metrics.jsonl", "tensorboard/", "checkpoints/"))

    def _write_config(self) -> None:
        """Rank 0 creates the output folder and writes ``config.json``: the effective configuration."""
        if not self.ranks.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        config = {**dataclasses.asdict(self.cfg), "command": self.cfg.command, "vit": self.cfg.vit,
                  "device": str(self.device), "precision": self.precision, "world_size": self.ranks.world_size,
                  "accum": self.accum, "effective_batch_size": self.images_per_step, "lr": self.base_lr,
                  "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                  "num_classes": self.num_classes, "classes": self.classes}
        write_atomic(self.out / "config.json", lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))

    def _announce(self, resumed: Path | None) -> None:
        """Rank 0 prints the data, the model, the optimiser and where the run resumes."""
        if not self.ranks.is_main:
            return
        cfg, name = self.cfg, f"fastmae {self.cfg.command}"
        trained = sum(p.numel() for p in self.params)
        print(f"{name}: data: {self.loader.describe()}; {len(self.classes)} classes"
              + (f"; validation: {len(self.val_loader.files)} images" if self.val_loader is not None else ""),
              flush=True)
        if self.loaded is not None:
            print(f"{name}: loaded {cfg.pretrained} into {cfg.vit}"
                  + (" (pos_embed interpolated)" if self.loaded.interpolated else "")
                  + f"; newly initialised: {', '.join(sorted(self.loaded.missing_keys)) or 'nothing'}", flush=True)
        else:
            print(f"{name}: no --pretrained: {cfg.vit} starts from a random initialisation", flush=True)
        mode = cfg.parallel if self.ranks.distributed else "one process"
        print(f"{name}: {self.ranks.world_size} rank(s) ({mode}) on {self.device.type}, {self.precision}, "
              f"{trained / 1e6:.2f} M trained parameters, effective batch {self.images_per_step} "
              f"({cfg.batch_size} x {self.accum} x {self.ranks.world_size}), lr {self.base_lr:.3g}, "
              f"{self.total_steps} steps ({self.steps_per_epoch} per epoch), optimizer {self.optimizer_name}",
              flush=True)
        if resumed is not None:
            print(f"{name}: resuming from {resumed} (step {self.step})", flush=True)

    def _already_complete(self) -> ClassifierSummary:
        if self.ranks.is_main:
            print(f"fastmae {self.cfg.command}: {self.out} is already complete: its newest checkpoint is at step "
                  f"{self.step} of {self.total_steps}; nothing to do (a larger --steps or --epochs continues it)",
                  flush=True)
        nan = float("nan")
        return ClassifierSummary(self.step, nan, nan, 0.0, self.out, "already complete", self.guard.skipped_total())
