"""Layer-wise learning-rate decay (ELECTRA/BEiT, as MAE's fine-tuning uses it): parameter groups whose
``lr_scale`` shrinks geometrically from the head down to the embedding.

With ``depth`` blocks there are ``depth + 2`` layers: 0 is the embedding (``cls_token``, ``pos_embed``,
``patch_embed.*``), ``i + 1`` is block ``i``, ``depth + 1`` is everything after the blocks (the final norm or
``fc_norm``, the head). Layer ``l``'s scale is ``layer_decay ** (depth + 1 - l)``: 1 for the head, ``layer_decay``
for the last block, and so on. Inside each layer parameters split into decayed (matrices) and undecayed ones
(1-D parameters, i.e. biases and norm weights, and the names in ``no_weight_decay``, i.e. the cls token and the
position embedding). Frozen parameters (``requires_grad`` False) are left out, so partial fine-tuning gets groups
only for what it trains. The schedule sets each group's ``lr`` to the scheduled lr times its ``lr_scale``
(``apply_lr``).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def layer_id(name: str, depth: int) -> int:
    """The layer of parameter ``name`` (a ``named_parameters()`` name of a ViT with ``depth`` blocks): 0 for the
    embedding, ``i + 1`` for ``blocks.i.*``, ``depth + 1`` for the rest."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".", 2)[1]) + 1
    return depth + 1


def param_groups_lrd(model: nn.Module, weight_decay: float, no_weight_decay: set[str],
                     layer_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay (module docstring) for ``model``, a ViT with ``.blocks``.

    Each group: ``params``, ``param_names`` (their names, for logs and checks), ``lr_scale``, ``weight_decay`` and
    ``name`` (``layer_<l>_decay`` / ``layer_<l>_no_decay``), in the order their first parameter appears in
    ``model.named_parameters()``.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    depth = len(model.blocks)
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = param.ndim != 1 and name not in no_weight_decay
        layer = layer_id(name, depth)
        key = f"layer_{layer}_{'decay' if decayed else 'no_decay'}"
        if key not in groups:
            groups[key] = {"name": key, "params": [], "param_names": [],
                           "lr_scale": layer_decay ** (depth + 1 - layer),
                           "weight_decay": weight_decay if decayed else 0.0}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times its ``lr_scale`` (1 when it has none), as util/lr_sched.py does."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
