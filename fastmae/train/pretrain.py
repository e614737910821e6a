"""MAE pretraining in one process or under ``torchrun`` (DDP or FSDP2): ``fastmae pretrain``.

The output folder holds ``config.json`` (the effective configuration), ``metrics.jsonl`` (one object per logged
step: step, loss, lr, img_per_s, skipped_steps, grad_norm), TensorBoard events in ``tensorboard/``,
``checkpoints/`` and ``reconstruction.png``. Running the same command again resumes from the newest complete
checkpoint: model, optimiser, loss scaler, step, loader position and every rank's RNG state, and the masks
are a function of (seed, step) (``fastmae.train.masks``), so an fp32 run with ``deterministic`` resumes
bit-exactly.

Stops: ``PretrainSummary.status == "preempted"`` after SIGTERM/SIGUSR1 (``fastmae.train.preemption``; the CLI
exits with 75), ``NonFiniteError`` after too many consecutive non-finite steps (``fastmae.train.nonfinite``;
the CLI exits with 3).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fastmae.data.demo import demo_dataset
from fastmae.data.eval_transform import ImageFiles, eval_transform
from fastmae.data.loader import pretrain_loader
from fastmae.model import PRESETS, MaskedAutoencoderViT
from fastmae.train.checkpoint import (list_checkpoints, load_latest_checkpoint, prune_checkpoints, save_checkpoint,
                                      write_atomic)
from fastmae.train.config import PRECISIONS, PretrainConfig
from fastmae.train.distributed import (Ranks, add_activation_checkpointing, barrier, close_ranks, gradient_sync,
                                       init_ranks, wrap_model)
from fastmae.train.faults import maybe_pause, maybe_signal, poison_loss
from fastmae.train.figure import save_reconstruction_figure
from fastmae.train.masks import mask_noise
from fastmae.train.nonfinite import NonFiniteError, NonFiniteGuard, optimizer_step, skip_syncs_host
from fastmae.train.optim import (adapt_optimizer_state, build_optimizer, choose_optimizer, lr_at,
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
    folder; ``status``: "complete", or "preempted" after SIGTERM/SIGUSR1 and its checkpoint; ``skipped_steps``:
    non-finite steps skipped since the run began (a resumed run's count included).
    """

    steps: int
    first_loss: float
    final_loss: float
    img_per_s: float
    output: Path
    status: str = "complete"  # or "preempted"
    skipped_steps: int = 0


def _write_json_atomic(path: Path, obj: object) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _total_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The global gradient norm, a device scalar (under FSDP the shards' norms are combined across ranks)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def pretrain(cfg: PretrainConfig, progress: bool = True) -> PretrainSummary:
    """Train ``cfg.model`` with the MAE objective; resumes from ``cfg.output`` when it holds a checkpoint."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    ranks = init_ranks(cfg.device)
    watch = PreemptionWatch(ranks)
    try:
        return _pretrain(cfg, ranks, watch, progress)
    except NonFiniteError:
        barrier(ranks)  # every rank stops at the same step: leave together, so that none is killed mid-exit
        raise
    finally:
        close_ranks(ranks)
        watch.close()  # after the last collective: a signal until then still stops the run cleanly
        torch.use_deterministic_algorithms(deterministic)


def _pretrain(cfg: PretrainConfig, ranks: Ranks, watch: PreemptionWatch, progress: bool) -> PretrainSummary:
    out = Path(cfg.output)
    device = ranks.device
    precision = cfg.precision or ("bf16" if device.type == "cuda" else "fp32")
    fsdp = cfg.parallel == "fsdp" and ranks.distributed  # fsdp with fp16 is refused by PretrainConfig
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        data_root = Path(cfg.data) if cfg.data is not None else demo_dataset()  # rank 0 writes the demo files
    barrier(ranks)
    data_root = Path(cfg.data) if cfg.data is not None else demo_dataset()
    param_dtype = PRECISIONS[precision]
    loader = pretrain_loader(data_root, cfg.batch_size, cfg.img_size, device=device,
                             dtype=param_dtype if fsdp else torch.float32, seed=cfg.seed, rank=ranks.rank,
                             world_size=ranks.world_size, num_workers=cfg.num_workers, backend=cfg.loader,
                             on_bad_file=cfg.on_bad_file, max_skip_fraction=cfg.max_skip_fraction,
                             check=cfg.bad_file_check)
    if ranks.is_main:
        print(f"fastmae pretrain: data: {loader.describe()}", flush=True)
    steps_per_epoch = len(loader) // cfg.accum
    if steps_per_epoch < 1:
        raise ValueError(f"{loader.num_images} images cannot fill one step of {cfg.accum} x {cfg.batch_size} images "
                         f"on each of {ranks.world_size} ranks")
    total_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    images_per_step = cfg.batch_size * cfg.accum * ranks.world_size
    base_lr = cfg.blr * images_per_step / 256
    warmup_steps = int(cfg.warmup_fraction * total_steps)
    if ranks.is_main:
        _write_json_atomic(out / "config.json", {
            **dataclasses.asdict(cfg), "data": str(data_root), "device": str(device), "precision": precision,
            "world_size": ranks.world_size, "effective_batch_size": images_per_step, "total_steps": total_steps,
            "lr": base_lr})

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = PRESETS[cfg.model](img_size=cfg.img_size, norm_pix_loss=cfg.norm_pix_loss).to(device)
    num_patches = model.patch_embed.num_patches
    len_keep = int(num_patches * (1 - cfg.mask_ratio))
    if cfg.activation_checkpointing:
        add_activation_checkpointing(model)
    train_model = wrap_model(model, ranks, cfg.parallel, param_dtype, cfg.compile)
    optimizer = build_optimizer(model, lr=base_lr, weight_decay=cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    guard = NonFiniteGuard(ranks, cfg.max_nonfinite)
    torch.manual_seed(cfg.seed + ranks.rank)  # each rank its own stream from here on
    if ranks.is_main:
        choice = choose_optimizer(device)
        sync_note = (f"; host sync per step for the non-finite check with {choice.name}"
                     if skip_syncs_host(optimizer, scaler) else "")
        print(f"fastmae pretrain: {ranks.world_size} rank(s) ({cfg.parallel if ranks.distributed else 'one process'})"
              f" on {device.type}, {precision}, optimizer {choice}{sync_note}", flush=True)

    checkpoints = out / "checkpoints"
    newest = list_checkpoints(checkpoints)[-1:]
    if fsdp and newest and newest[0].is_file():
        raise ValueError(f"{newest[0]} is a one-file checkpoint (one process or DDP); resume it with parallel='ddp'")
    step = 0

    def resume(path: Path, state: dict) -> None:
        nonlocal step
        if path.is_dir():
            load_sharded(path, model, optimizer)
        else:
            model.load_state_dict(state["model"])
            if saved_by_other_adamw(state["optimizer"], optimizer) and ranks.is_main:
                print(f"fastmae pretrain: {path.name} was saved by the other AdamW (apex's FusedAdam / torch's "
                      f"AdamW); its moments and step counts are carried over", flush=True)
            optimizer.load_state_dict(adapt_optimizer_state(state["optimizer"], optimizer))
        step = restore_training_state(state, scaler, loader, ranks)
        guard.skipped.fill_(state["skipped_steps"])

    resumed = load_latest_checkpoint(checkpoints, resume, ranks)
    if resumed is not None and ranks.is_main:
        print(f"fastmae pretrain: resuming from {resumed[0]} (step {step})", flush=True)

    log = RunLog(out, ranks, step, total_steps, images_per_step, progress)

    def save() -> None:
        state = training_state(step, scaler, loader, guard.skipped_total(), ranks)
        if fsdp:
            save_sharded(checkpoints, step, model, optimizer, state, ranks)
            if ranks.is_main:
                prune_checkpoints(checkpoints, cfg.keep_last)
        else:
            if ranks.is_main:
                save_checkpoint(checkpoints, step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                    **state}, keep_last=cfg.keep_last)
            barrier(ranks)
        maybe_pause("pause_after_save", step, ranks.rank)
        log.pause_clock()

    amp = torch.autocast(device.type, dtype=param_dtype, enabled=precision != "fp32")
    status = "complete"
    model.train()
    try:
        while step < total_steps:
            lr = lr_at(step, total_steps, warmup_steps, base_lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            maybe_signal(step + 1, ranks.rank)
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.accum):
                imgs = next(loader)  # (B, 3, S, S)
                noise = mask_noise(cfg.seed, step * cfg.accum + micro, imgs.shape[0], num_patches, len_keep,
                                   ranks.rank, ranks.world_size, device)  # (B, L)
                with gradient_sync(train_model, micro == cfg.accum - 1):
                    with amp:
                        loss, _, _ = train_model(imgs, mask_ratio=cfg.mask_ratio, noise=noise)
                    loss = poison_loss(loss, step + 1, ranks.rank)
                    scaler.scale(loss / cfg.accum).backward()
                step_loss += loss.detach().float() / cfg.accum
            grad_norm = None
            if scaler.is_enabled() and cfg.clip_grad is not None:
                scaler.unscale_(optimizer)
            if not scaler.is_enabled() or cfg.clip_grad is not None:
                grad_norm = _total_norm(params)
                if cfg.clip_grad is not None:
                    torch.nn.utils.clip_grads_with_norm_(params, cfg.clip_grad, grad_norm, foreach=True)
            # fp16: inf/NaN gradients are the loss scaler's business; only a non-finite loss counts as bad
            skip = guard.check(step + 1, step_loss, None if scaler.is_enabled() else grad_norm)
            optimizer_step(optimizer, scaler, skip)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            log.add_step(step_loss, skip)
            preempted = watch.agreed()
            if step % cfg.log_every == 0 or step == total_steps or preempted:
                guard.raise_if_exhausted()
                extra = {"skipped_steps": guard.skipped_total()}
                if grad_norm is not None:
                    extra["grad_norm"] = float(grad_norm)
                log.write(step, lr, extra)
            if step % cfg.save_every == 0 or step == total_steps or preempted:
                guard.raise_if_exhausted()
                save()
            if preempted:
                status = "preempted"
                if watch.signal_name is not None:
                    print(f"fastmae pretrain (rank {ranks.rank}): {watch.signal_name} received", flush=True)
                if ranks.is_main:
                    print(f"fastmae pretrain: preempted: saved step {step} and stopped; the same command resumes",
                          flush=True)
                break
    finally:
        log.close()

    if status == "complete":
        _save_figure(cfg, model, ranks, fsdp, loader.files, step, out)
    return PretrainSummary(step, log.first_loss, log.final_loss, log.img_per_s, out, status, guard.skipped_total())


def _save_figure(cfg: PretrainConfig, model: MaskedAutoencoderViT, ranks: Ranks, fsdp: bool, files: list[Path],
                 step: int, out: Path) -> None:
    """``reconstruction.png`` of six of the (good) training ``files``, drawn by rank 0 (FSDP: from the gathered
    full weights)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not ranks.is_main:
            return
        model = PRESETS[cfg.model](img_size=cfg.img_size, norm_pix_loss=cfg.norm_pix_loss)
        model.load_state_dict(full)
        model.to(ranks.device)
    elif not ranks.is_main:
        return
    shown = ImageFiles([files[i * len(files) // 6] for i in range(min(6, len(files)))], eval_transform(cfg.img_size))
    sample = torch.stack([shown[i] for i in range(len(shown))])  # (6, 3, S, S)
    save_reconstruction_figure(model, sample.to(ranks.device), out / "reconstruction.png", cfg.mask_ratio,
                               title=f"{cfg.model}, step {step}, mask {cfg.mask_ratio}")
