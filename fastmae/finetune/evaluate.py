"""Top-1/top-5 accuracy of a classifier on a validation set, during training and as ``fastmae eval``.

Design: each rank scores its shard of the images (``fastmae.data.eval_loader``: rank ``r`` takes images ``r,
r + W, ...``, none twice, none padded), summing correct top-1 and top-5 predictions, the cross-entropy and the
count on the device; one all-reduce after the pass gives every rank the totals (never a collective per batch:
ranks may hold different numbers of batches). The validation folders are matched to the classifier's classes
(those of its training set, recorded in the checkpoint) by name: a validation class the classifier never saw
is an error naming it. With fewer than 5 classes, "top-5" is top-k over all of them (``EvalResult.k``).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fastmae.data.bad_files import BadImageError
from fastmae.data.eval import EvalLoader, eval_loader
from fastmae.finetune.classifier import build_classifier, meta_from_weights
from fastmae.finetune.config import EvalConfig, eval_crop_fraction
from fastmae.interop.checkpoints import read_sharded_model
from fastmae.train.checkpoint import COMMIT_MARKER, EXTRA_STATE, list_checkpoints
from fastmae.train.config import SettingError
from fastmae.train.distributed import Ranks, close_ranks, init_ranks
from fastmae.train.pretrain import DTYPES


@dataclass(frozen=True)
class EvalResult:
    """Accuracies in percent, the mean cross-entropy, the number of images scored (all ranks) and the ``k`` of
    top-k (5, or the number of classes when fewer)."""

    acc1: float
    acc5: float
    loss: float
    images: int
    k: int

    def line(self) -> str:
        return (f"top-1 {self.acc1:.3f}%, top-{self.k} {self.acc5:.3f}%, loss {self.loss:.4f} on {self.images} "
                f"images")


def class_index_map(classes: list[str], val_classes: list[str], key: str) -> torch.Tensor:
    """``(len(val_classes),)`` int64: the index in ``classes`` (the classifier's) of each validation class.
    ``SettingError`` naming setting ``key`` and the validation classes that ``classes`` lacks."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in val_classes if name not in index]
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:10]) + (f" and {len(unknown) - 10} more"
                                                                 if len(unknown) > 10 else "")
        raise SettingError(f"{key} must hold only classes the classifier was trained on ({len(classes)} classes, "
                           f"e.g. {', '.join(repr(c) for c in classes[:3])}), got {len(unknown)} unknown: {shown}",
                           (key,))
    return torch.tensor([index[name] for name in val_classes], dtype=torch.int64)


@torch.no_grad()
def evaluate(model: nn.Module, loader: EvalLoader, label_map: torch.Tensor, ranks: Ranks,
             amp: contextlib.AbstractContextManager, lockstep_img_size: int | None = None) -> EvalResult:
    """Score ``model`` (in eval mode; the caller restores its mode) on this rank's pass of ``loader`` and reduce
    over the ranks (a collective when distributed). ``label_map``: ``class_index_map``'s. ``lockstep_img_size``
    (for an FSDP model, whose every forward is a collective): the image size of the blank ``(1, 3, S, S)`` batches
    a rank with fewer batches than another forwards (and discards) so that all make the same number of forwards."""
    model.eval()
    label_map = label_map.to(ranks.device)
    blank_forwards = 0
    if lockstep_img_size is not None and ranks.distributed:
        most = torch.tensor([len(loader)], device=ranks.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        blank_forwards = int(most.item()) - len(loader)
    totals = torch.zeros(4, dtype=torch.float64, device=ranks.device)  # correct top-1, top-k, loss sum, images
    k = 0
    for images, labels in loader:  # (N, 3, S, S), (N,) in the validation folder's indices
        targets = label_map[labels]  # (N,) the classifier's indices
        with amp:
            logits = model(images)  # (N, C)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (N, k)
        hits = top == targets[:, None]  # (N, k)
        totals[0] += hits[:, 0].sum()
        totals[1] += hits.any(dim=1).sum()
        totals[2] += F.cross_entropy(logits, targets, reduction="sum")
        totals[3] += len(targets)
    for _ in range(blank_forwards):
        with amp:
            model(torch.zeros(1, 3, lockstep_img_size, lockstep_img_size, device=ranks.device))
    if ranks.distributed:
        dist.all_reduce(totals)
        k_all = torch.tensor([k], device=ranks.device)
        dist.all_reduce(k_all, op=dist.ReduceOp.MAX)  # a rank without images has k = 0
        k = int(k_all.item())
    correct1, correct5, loss_sum, count = totals.tolist()
    if count == 0:
        raise ValueError("the validation set holds no images")
    return EvalResult(100 * correct1 / count, 100 * correct5 / count, loss_sum / count, int(count), k)


def newest_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a file or a sharded checkpoint folder (``ckpt-<step>/`` with its commit marker);
    for another folder, the newest complete checkpoint in it or in its ``checkpoints/`` (a run folder).
    ``SettingError`` (naming CHECKPOINT) otherwise."""
    path = Path(path)
    if path.is_file() or (path / COMMIT_MARKER).is_file():
        return path
    if path.is_dir():
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if found:
            return found[-1]
        raise SettingError(f"CHECKPOINT must be a checkpoint file or a run folder holding one, got {str(path)!r}, a "
                           "folder without complete checkpoints (ckpt-<step>.pt, or sharded ckpt-<step>/)", ())
    raise SettingError(f"CHECKPOINT must be a checkpoint file or a run folder, got {str(path)!r}, which does not "
                       "exist", ())


def load_classifier(path: Path, model_name: str | None) -> tuple[nn.Module, dict]:
    """The classifier of checkpoint ``path`` and its metadata (``classifier_meta``): a fastmae ``finetune`` /
    ``linprobe`` checkpoint records both; plain weights (``{"model": state_dict}`` or a state dict, e.g. the
    official fine-tuned ViTs) need ``model_name``. A sharded folder (``parallel fsdp``) is gathered in this process
    (its ``extra.pt`` holds the metadata). ``SettingError`` naming CHECKPOINT or ``model``."""
    try:
        if path.is_dir():
            state = {**torch.load(path / EXTRA_STATE, map_location="cpu", weights_only=True),
                     "model": read_sharded_model(path)}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, damaged, or pickled objects weights_only refuses
        raise SettingError(f"CHECKPOINT must be a torch checkpoint file of weights, got {str(path)!r}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", ()) from None
    if not isinstance(state, dict):
        raise SettingError(f"CHECKPOINT must hold a dict of weights, got {type(state).__name__} in {str(path)!r}",
                           ())
    weights = state.get("model", state)
    if "classifier" in state:
        meta = state["classifier"]
        if model_name is not None and model_name != meta["model"]:
            raise SettingError(f"model must be unset or {meta['model']} (recorded in the checkpoint {str(path)!r}), "
                               f"got {model_name!r}", ("model",))
    elif model_name is None:
        raise SettingError(f"model must name the ViT preset of {str(path)!r}, which holds weights without fastmae's "
                           "classifier record (not from fastmae finetune / linprobe)", ("model",))
    else:
        try:
            meta = meta_from_weights(weights, model_name)
        except ValueError as exc:
            raise SettingError(f"CHECKPOINT {str(path)!r}: {exc}", ()) from None
    model = build_classifier(meta["model"], meta["img_size"], meta["num_classes"], meta["global_pool"],
                             linprobe_head=meta["linprobe_head"])
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:  # another architecture: missing / unexpected keys, other shapes
        detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise SettingError(f"CHECKPOINT {str(path)!r} does not fit {meta['model']}: {detail}", ("model",)) from None
    return model, meta


def check_eval_paths(cfg: EvalConfig) -> None:
    """``SettingError`` for a ``data`` that does not exist or a device this machine lacks."""
    from fastmae.finetune.trainer import check_device

    check_device(cfg.device)
    if not Path(cfg.data).exists():
        raise SettingError(f"data must be an ImageFolder tree of validation images, got {cfg.data!r}, which does "
                           "not exist", ("data",))


def run_eval(cfg: EvalConfig) -> tuple[EvalResult, Path]:
    """``fastmae eval``: the accuracy of the checkpoint ``cfg.checkpoint`` on ``cfg.data`` (every rank under
    torchrun scores its shard) and the checkpoint file scored."""
    check_eval_paths(cfg)
    path = newest_checkpoint(cfg.checkpoint)
    ranks = init_ranks(cfg.device)
    try:
        model, meta = load_classifier(path, cfg.model)
        model.to(ranks.device)
        img_size = meta["img_size"]
        crop = cfg.crop_fraction if cfg.crop_fraction is not None else eval_crop_fraction(img_size)
        try:
            loader = eval_loader(cfg.data, cfg.batch_size, img_size, crop, backend=cfg.loader, device=ranks.device,
                                 rank=ranks.rank, world_size=ranks.world_size, on_bad_file=cfg.on_bad_file,
                                 num_workers=cfg.num_workers, max_skip_fraction=cfg.max_skip_fraction,
                                 check=cfg.bad_file_check)
        except BadImageError:
            raise
        except ValueError as exc:
            raise SettingError(f"{exc} (data {cfg.data!r})", ("data",)) from None
        classes = meta["classes"] or loader.classes  # plain weights: the folders in order, as ImageFolder
        if len(classes) > meta["num_classes"]:
            raise SettingError(f"data must have at most {meta['num_classes']} classes (the classifier's outputs), "
                               f"got {len(classes)}", ("data",))
        label_map = class_index_map(classes, loader.classes, "data")
        precision = cfg.precision or ("bf16" if ranks.device.type == "cuda" else "fp32")
        amp = torch.autocast(ranks.device.type, dtype=DTYPES[precision], enabled=precision != "fp32")
        start = time.perf_counter()
        result = evaluate(model, loader, label_map, ranks, amp)
        if ranks.is_main:
            print(f"fastmae eval: {path}: {meta['model']}, {img_size} px, {len(loader.classes)} classes, "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        return result, path
    finally:
        close_ranks(ranks)
