"""MAE pretraining, single process (``fastmae pretrain``).

The output folder holds ``config.json`` (the effective configuration), ``metrics.jsonl`` (one
object per logged step: step, loss, lr, img_per_s), ``checkpoints/`` and ``reconstruction.png``.
Running again with the same output folder resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastmae.data.demo import demo_dataset
from fastmae.data.loader import ImageFiles, eval_transform, list_images, pretrain_loader
from fastmae.model import PRESETS
from fastmae.train.config import PRECISIONS, PretrainConfig
from fastmae.train.checkpoint import load_latest_checkpoint, save_checkpoint
from fastmae.train.figure import save_reconstruction_figure
from fastmae.train.optim import build_optimizer, lr_at

@dataclass
class PretrainSummary:
    steps: int
    first_loss: float
    final_loss: float
    img_per_s: float
    output: Path


def _total_steps(cfg: PretrainConfig, num_images: int) -> int:
    images_per_step = cfg.batch_size * cfg.accum
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * (num_images // images_per_step)))


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def pretrain(cfg: PretrainConfig, progress: bool = True) -> PretrainSummary:
    """Train ``cfg.model`` with the MAE objective; resumes from ``cfg.output`` when it holds a checkpoint."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = cfg.precision or ("bf16" if device.type == "cuda" else "fp32")
    data_root = Path(cfg.data) if cfg.data is not None else demo_dataset()
    num_images = len(list_images(data_root))
    if num_images < cfg.batch_size:
        raise ValueError(f"{num_images} images below {str(data_root)!r} cannot fill one batch of {cfg.batch_size}")
    total_steps = _total_steps(cfg, num_images)
    eff_batch = cfg.batch_size * cfg.accum
    base_lr = cfg.blr * eff_batch / 256
    warmup_steps = int(cfg.warmup_fraction * total_steps)
    _write_json_atomic(out / "config.json", {**dataclasses.asdict(cfg), "data": str(data_root),
                                             "device": str(device), "precision": precision,
                                             "total_steps": total_steps, "lr": base_lr})

    torch.manual_seed(cfg.seed)
    model = PRESETS[cfg.model](img_size=cfg.img_size, norm_pix_loss=cfg.norm_pix_loss).to(device)
    optimizer = build_optimizer(model, lr=base_lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = 0
    resumed = load_latest_checkpoint(out / "checkpoints")
    if resumed is not None:
        path, state = resumed
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        print(f"fastmae pretrain: resuming from {path} (step {step})")

    batches_per_epoch = num_images // cfg.batch_size
    consumed = step * cfg.accum  # batches an uninterrupted run would have drawn by now
    batches = pretrain_loader(data_root, cfg.batch_size, cfg.img_size, device=device, seed=cfg.seed,
                              num_workers=cfg.num_workers, start_epoch=consumed // batches_per_epoch)
    for _ in range(consumed % batches_per_epoch):  # continue with the same batches
        next(batches)

    def save() -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "step": step, "rng_cpu": torch.get_rng_state()}
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        save_checkpoint(out / "checkpoints", step, state, keep_last=cfg.keep_last)

    amp = torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")
    model.train()
    first_loss = final_loss = float("nan")
    loss_sum = torch.zeros((), device=device)
    interval_start, interval_steps = time.perf_counter(), 0
    run_images, run_seconds = 0, 0.0
    bar = tqdm(total=total_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    with open(out / "metrics.jsonl", "a") as metrics:
        while step < total_steps:
            lr = lr_at(step, total_steps, warmup_steps, base_lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for _ in range(cfg.accum):
                imgs = next(batches)
                with amp:
                    loss, _, _ = model(imgs, mask_ratio=cfg.mask_ratio)
                scaler.scale(loss / cfg.accum).backward()
                loss_sum += loss.detach() / cfg.accum
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            interval_steps += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                loss_value = loss_sum.item() / interval_steps  # the only host sync: at log intervals
                elapsed = time.perf_counter() - interval_start
                img_per_s = interval_steps * eff_batch / elapsed
                run_images += interval_steps * eff_batch
                run_seconds += elapsed
                if math.isnan(first_loss):
                    first_loss = loss_value
                final_loss = loss_value
                metrics.write(json.dumps({"step": step, "loss": loss_value, "lr": lr, "img_per_s": img_per_s}) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.0f}")
                loss_sum.zero_()
                interval_steps = 0
                interval_start = time.perf_counter()
            if step % cfg.save_every == 0 or step == total_steps:
                save()
                interval_start = time.perf_counter()  # checkpoint time is not training time
    bar.close()

    files = list_images(data_root)
    shown = ImageFiles([files[i * len(files) // 6] for i in range(min(6, len(files)))], eval_transform(cfg.img_size))
    sample = torch.stack([shown[i] for i in range(len(shown))])  # (6, 3, S, S)
    save_reconstruction_figure(model, sample.to(device), out / "reconstruction.png", cfg.mask_ratio,
                               title=f"{cfg.model}, step {step}, mask {cfg.mask_ratio}")
    return PretrainSummary(step, first_loss, final_loss, run_images / run_seconds if run_seconds else 0.0, out)

