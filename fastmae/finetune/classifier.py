"""The classifier being trained or evaluated: a ``fastmae.vit.VisionTransformer`` built from a preset, loaded from a
pretrained encoder, with the linear-probe head, and frozen in part.

- Pretrained weights (``load_encoder``): ``fastmae.vit.load_pretrained`` (fastmae/official MAE checkpoints, timm
  ViT state dicts; it interpolates ``pos_embed``, drops a head of another shape and refuses other architectures);
  a head that was not loaded gets ``fastmae.vit.init_head``'s truncated-normal init (std 2e-5 for fine-tuning,
  0.01 for linear probing, as the official scripts) and a zero bias. A head that was loaded (a timm classifier
  with as many classes) is kept.
- Linear probing (``add_linprobe_head``): the head becomes ``BatchNorm1d(D, affine=False, eps=1e-6)`` then the
  linear layer, as main_linprobe.py, so its state dict keys are ``head.0.*`` (running statistics) and ``head.1.*``.
- Freezing (``freeze``): linear probing trains the head alone; partial fine-tuning (``trainable_blocks=K``, the
  paper's Figure 9) trains the last K blocks, the final norm (``norm`` or ``fc_norm``) and the head, and freezes
  the embedding (``patch_embed``, ``cls_token``, ``pos_embed``) and the blocks before. Frozen parameters get
  ``requires_grad=False`` (so the optimiser never sees them and autograd records nothing until the first trained
  block: the frozen part runs as under ``torch.no_grad``), and their modules stay in eval mode while training
  (``train_mode``): no drop path or dropout there. ``K == depth`` freezes nothing (full fine-tuning).
- ``classifier_meta`` is what a checkpoint records so that ``fastmae eval`` rebuilds the model and knows the
  classes it was trained on.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn as nn


def build_classifier(vit: str, img_size: int, num_classes: int, global_pool: bool, drop_path: float = 0.0,
                     linprobe_head: bool = False) -> nn.Module:
    """The ViT preset ``vit`` with a ``num_classes`` head (the linear-probe head with ``linprobe_head``)."""
    from fastmae.vit import VIT_PRESETS

    model = VIT_PRESETS[vit](img_size=img_size, num_classes=num_classes, global_pool=global_pool,
                             drop_path_rate=drop_path)
    if linprobe_head:
        add_linprobe_head(model)
    return model


def add_linprobe_head(model: nn.Module) -> None:
    """Put a ``BatchNorm1d(embed_dim, affine=False, eps=1e-6)`` in front of ``model.head``: features ``(N, D)``
    are standardised by batch statistics (running ones in eval mode) before the linear layer."""
    model.head = nn.Sequential(nn.BatchNorm1d(model.embed_dim, affine=False, eps=1e-6), model.head)


def load_encoder(model: nn.Module, source: str | os.PathLike, linprobe: bool) -> Any:
    """Load pretrained weights into ``model`` (before ``add_linprobe_head``) and initialise a head that was not
    loaded as the official fine-tuning / linear probing does; returns ``load_pretrained``'s ``LoadResult``.
    ValueError when the weights are not of this architecture."""
    from fastmae.vit import FINETUNE_HEAD_STD, LINPROBE_HEAD_STD, init_head, load_pretrained

    result = load_pretrained(model, source)
    if "head.weight" in result.missing_keys:
        init_head(model, LINPROBE_HEAD_STD if linprobe else FINETUNE_HEAD_STD)
    return result


def freeze(model: nn.Module, linprobe: bool, trainable_blocks: int | None) -> list[nn.Module]:
    """Set ``requires_grad`` by the freezing rule (module docstring); returns the frozen modules, which
    ``train_mode`` keeps in eval mode."""
    depth = len(model.blocks)
    if linprobe:
        trained = ("head.",)
    elif trainable_blocks is None or trainable_blocks == depth:
        return []
    else:
        first = depth - trainable_blocks  # blocks[first:] train
        trained = ("head.", "norm.", "fc_norm.", *(f"blocks.{i}." for i in range(first, depth)))
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(trained))
    if linprobe:
        return [child for name, child in model.named_children() if name != "head"]
    frozen = [child for name, child in model.named_children() if name not in ("blocks", "head", "norm", "fc_norm")]
    return frozen + list(model.blocks[:first])


def train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    """``model.train()`` with the ``frozen`` modules in eval mode (no drop path or dropout in frozen blocks)."""
    model.train()
    for module in frozen:
        module.eval()


def classifier_meta(vit: str, img_size: int, num_classes: int, global_pool: bool, linprobe_head: bool,
                    classes: list[str], command: str) -> dict[str, Any]:
    """What a checkpoint records about its classifier (plain types, for ``torch.load(weights_only=True)``)."""
    return {"model": vit, "img_size": img_size, "num_classes": num_classes, "global_pool": global_pool,
            "linprobe_head": linprobe_head, "classes": list(classes), "command": command}


def meta_from_weights(weights: dict[str, torch.Tensor], vit: str) -> dict[str, Any]:
    """The ``classifier_meta`` of a plain state dict of preset ``vit`` (official or timm fine-tuned weights):
    the head's classes, ``fc_norm`` for the global pool, ``head.1`` for the linear-probe head, the image size from
    ``pos_embed`` ``(1, 1 + (S / patch)^2, D)``; ``classes`` empty (the caller takes the validation folders')."""
    from fastmae.train.config import patch_size_of

    head = weights.get("head.1.weight", weights.get("head.weight"))
    pos_embed = weights.get("pos_embed")
    if head is None or pos_embed is None or pos_embed.ndim != 3:
        raise ValueError("the weights are not a ViT classifier's: they lack head.weight (or head.1.weight) or a "
                         "(1, tokens, dim) pos_embed")
    grid = math.isqrt(pos_embed.shape[1] - 1)
    return classifier_meta(vit, grid * patch_size_of(vit), head.shape[0], "fc_norm.weight" in weights,
                           "head.1.weight" in weights, [], "weights")
