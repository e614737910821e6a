"""The training state besides model and optimiser: step, loss scaler, loader position and the RNG state of
every rank, gathered to (and restored from) one plain dict that ``torch.load(weights_only=True)`` reads."""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import torch
import torch.distributed as dist

from fastmae.train.distributed import Ranks


class ResumableLoader(Protocol):
    def __len__(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _gather_rows(row: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """``row (K,)`` uint8 of every rank -> ``(world_size, K)`` on the CPU, rank order (collective)."""
    if not ranks.distributed:
        return row.unsqueeze(0)
    # NCCL moves CUDA tensors only; gloo, CPU ones
    device = ranks.device if dist.get_backend() == "nccl" else torch.device("cpu")
    rows = [torch.empty_like(row, device=device) for _ in range(ranks.world_size)]
    dist.all_gather(rows, row.to(device))
    return torch.stack(rows).cpu()  # (W, K)


def rng_state(ranks: Ranks) -> dict[str, torch.Tensor]:
    """Every rank's CPU (and CUDA) generator state: ``{"cpu": (W, K) uint8, "cuda": (W, K') uint8}``."""
    state = {"cpu": _gather_rows(torch.get_rng_state(), ranks)}
    if ranks.device.type == "cuda":
        state["cuda"] = _gather_rows(torch.cuda.get_rng_state(ranks.device), ranks)
    return state


def restore_rng_state(state: dict[str, torch.Tensor], ranks: Ranks) -> None:
    """This rank's row of a saved :func:`rng_state`; with another number of ranks, warn and keep fresh seeds."""
    saved_world = state["cpu"].shape[0]
    if saved_world != ranks.world_size:
        if ranks.is_main:
            warnings.warn(f"the checkpoint holds the RNG state of {saved_world} ranks, this run has "
                          f"{ranks.world_size}: the generators start from fresh seeds", stacklevel=2)
        return
    torch.set_rng_state(state["cpu"][ranks.rank].clone())
    if ranks.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"][ranks.rank].clone(), ranks.device)


def training_state(step: int, scaler: torch.amp.GradScaler, loader: ResumableLoader, skipped_steps: int,
                   ranks: Ranks) -> dict[str, Any]:
    """Collective (gathers the RNG states). Plain ints, strings and tensors only."""
    return {"step": step, "scaler": scaler.state_dict(), "loader": loader.state_dict(),
            "skipped_steps": skipped_steps, "world_size": ranks.world_size, "rng": rng_state(ranks)}


def loader_position(saved: dict[str, Any], loader: ResumableLoader) -> dict[str, Any]:
    """``saved`` (rank 0's loader state) as a state for this rank's ``loader``: the same epoch and the same number
    of images into it, for this rank and this number of ranks. Seed and
    dataset size stay as saved, so the loader itself refuses a state of another seed or dataset."""
    current = loader.state_dict()
    images = saved["batch"] * saved["batch_size"] * saved["world_size"]  # into the epoch, all ranks together
    per_batch = current["batch_size"] * current["world_size"]
    epoch, batch = saved["epoch"], images // per_batch
    if batch * per_batch != images:
        warnings.warn(f"the checkpoint's loader position, {images} images into epoch {epoch}, is not a whole number "
                      f"of this run's {per_batch}-image batches: resuming at batch {batch}", stacklevel=2)
    if batch >= len(loader):
        epoch, batch = epoch + 1, 0
    return {**current, "epoch": epoch, "batch": batch, "seed": saved["seed"], "num_images": saved["num_images"]}


def restore_training_state(state: dict[str, Any], scaler: torch.amp.GradScaler, loader: ResumableLoader,
                           ranks: Ranks) -> int:
    """Restore what :func:`training_state` saved (rank 0's loader state, translated for this rank); returns the
    step."""
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    loader.load_state_dict(loader_position(state["loader"], loader))
    restore_rng_state(state["rng"], ranks)
    return int(state["step"])
