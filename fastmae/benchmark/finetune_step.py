"""One fine-tuning step per implementation, for ``fastmae bench --task finetune``.

Design note. Every row runs the same step, the official ``main_finetune.py`` recipe at one batch of synthetic
images with fixed random labels; only the model differs, so a ratio between rows is the models' speed:

- timm's ``Mixup`` (mixup 0.8, cutmix 1.0, switch 0.5, label smoothing 0.1, 1000 classes) on the batch, drawn from
  numpy's generator seeded once at build (the draws differ from step to step, as in training);
- the classifier: global pooling with ``fc_norm``, drop path 0.1 / 0.2 / 0.3 for B / L / H (``FINETUNE_BY_SIZE``);
- ``SoftTargetCrossEntropy`` on the fp32 logits, backward;
- the gradient norm (the official loss scaler computes it every step; no clipping, as the recipe);
- AdamW (0.9, 0.999), weight decay 0.05, over the layer-wise lr-decay groups (0.65 for B, 0.75 for L / H, the
  groups of ``fastmae.finetune.lr_decay.param_groups_lrd``), lr = blr x N / 256 scaled per group; grads set to
  None.

On CUDA under bf16 autocast with torch's fused AdamW; elsewhere fp32 with the foreach AdamW. No host sync.

Implementations (``FINETUNE_IMPLS``):

- ``fastmae-finetune``: ``fastmae.vit.VisionTransformer`` (fastmae's ops, dispatch's backends), eager: the model
  and step ``fastmae finetune`` runs;
- ``fastmae-finetune-compile``: the same under ``torch.compile`` (``fastmae finetune --compile``);
- ``timm``: timm's ``VisionTransformer`` of the same architecture (its fused attention is
  ``F.scaled_dot_product_attention``), eager;
- ``timm-compile``: timm's model under ``torch.compile``: the baseline a user would reach for.

Rows are ``TrainStep``s (``fastmae.benchmark.train_step``); ``run(imgs)`` takes ``(N, 3, S, S)`` images and
returns the step's loss.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn

from fastmae.benchmark.train_step import StepUnavailable, TrainStep
from fastmae.finetune.config import FINETUNE_BY_SIZE, FINETUNE_COMMON, size_of
from fastmae.finetune.lr_decay import apply_lr, param_groups_lrd
from fastmae.train.optim import build_optimizer
from fastmae.train.pretrain import total_grad_norm

NUM_CLASSES = 1000  # ImageNet-1k, the paper's fine-tuning set
ADAMW_BETAS = (0.9, 0.999)
MIXUP = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5, "mode": "batch",
         "label_smoothing": 0.1}


@dataclass(frozen=True)
class FinetuneVariant:
    model: str  # "fastmae" | "timm"
    compile: bool = False


FINETUNE_IMPLS: dict[str, FinetuneVariant] = {
    "fastmae-finetune": FinetuneVariant("fastmae"),
    "fastmae-finetune-compile": FinetuneVariant("fastmae", compile=True),
    "timm": FinetuneVariant("timm"),
    "timm-compile": FinetuneVariant("timm", compile=True),
}
FINETUNE_BASELINES = ("timm", "timm-compile")


def check_vit_name(model_name: str) -> None:
    """Raise ``ValueError`` naming the ViT presets when ``model_name`` is not one of them."""
    from fastmae.vit import VIT_PRESETS

    if model_name not in VIT_PRESETS:
        raise ValueError(f"unknown fine-tuning model {model_name!r}; expected a ViT preset, one of "
                         f"{sorted(VIT_PRESETS)}")


def finetune_unavailable_reason(impl: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot run here (timm missing: it is an install requirement, so only a broken install), or
    ``None``."""
    if impl not in FINETUNE_IMPLS:
        raise ValueError(f"unknown fine-tuning impl {impl!r}; expected one of {sorted(FINETUNE_IMPLS)}")
    if importlib.util.find_spec("timm") is None:
        return f"{impl}: timm is not installed (pip install timm): the step uses its Mixup and loss"
    return None


def recipe(model_name: str) -> dict[str, float]:
    """The official recipe's drop path, layer decay, blr and weight decay for the size of ``model_name``."""
    by_size = FINETUNE_BY_SIZE[size_of(model_name)]
    return {"drop_path": by_size["drop_path"], "layer_decay": by_size["layer_decay"], "blr": by_size["blr"],
            "weight_decay": FINETUNE_COMMON["weight_decay"]}


def fastmae_classifier(model_name: str, img_size: int, drop_path: float) -> nn.Module:
    """fastmae's ViT preset ``model_name`` as the recipe fine-tunes it (global pool, ``NUM_CLASSES`` classes)."""
    from fastmae.finetune.classifier import build_classifier

    return build_classifier(model_name, img_size, NUM_CLASSES, global_pool=True, drop_path=drop_path)


def timm_classifier(model_name: str, img_size: int, drop_path: float) -> nn.Module:
    """timm's ``VisionTransformer`` with the architecture of fastmae's preset ``model_name`` (read from a copy on
    the meta device): the same widths, heads, patch size, qkv bias, LayerNorm eps 1e-6, global average pooling
    of the patch tokens through ``fc_norm``. Its ``state_dict`` keys are fastmae's."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        ref = fastmae_classifier(model_name, img_size, 0.0)
    attn, mlp = ref.blocks[0].attn, ref.blocks[0].mlp
    return VisionTransformer(img_size=img_size, patch_size=ref.patch_embed.patch_size[0], embed_dim=ref.embed_dim,
                             depth=len(ref.blocks), num_heads=attn.num_heads,
                             mlp_ratio=mlp.fc1.out_features / ref.embed_dim, qkv_bias=True, num_classes=NUM_CLASSES,
                             global_pool="avg", fc_norm=True, drop_path_rate=drop_path,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6))


def finetune_step_runner(forward: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                         params: list[nn.Parameter], labels: torch.Tensor, device: torch.device,
                         bf16: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run(imgs) -> loss``: one step of the recipe (module docstring) on ``imgs (N, 3, S, S)`` with ``labels
    (N,)``: timm's Mixup (it mixes ``imgs`` in place), the forward under bf16 autocast when asked, soft-target
    cross-entropy, backward, the gradient norm, the AdamW step, grads set to None."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    mixup = Mixup(num_classes=NUM_CLASSES, **MIXUP)
    criterion = SoftTargetCrossEntropy()

    def run(imgs: torch.Tensor) -> torch.Tensor:
        images, targets = mixup(imgs, labels)  # (N, 3, S, S), (N, NUM_CLASSES) soft targets
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(images)  # (N, NUM_CLASSES)
        loss = criterion(logits.float(), targets)
        loss.backward()
        total_grad_norm(params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return run


def build_finetune_step(impl: str, model_name: str, batch_size: int, img_size: int, device: torch.device,
                        drop_path: float | None = None) -> TrainStep:
    """The ``impl`` row (a key of ``FINETUNE_IMPLS``) for ViT preset ``model_name``: its model initialised on
    ``device`` and the recipe's step. ``drop_path`` overrides the recipe's (the tests set 0 to compare models).
    Raises ``StepUnavailable`` when it cannot run here, ``ValueError`` for an unknown name or a batch below 2
    (mixup needs a pair)."""
    if impl not in FINETUNE_IMPLS:
        raise ValueError(f"unknown fine-tuning impl {impl!r}; expected one of {sorted(FINETUNE_IMPLS)}")
    check_vit_name(model_name)
    if not isinstance(batch_size, int) or batch_size < 2 or batch_size % 2:
        raise ValueError(f"batch_size must be an even int >= 2 (timm's Mixup pairs the batch), got {batch_size!r}")
    reason = finetune_unavailable_reason(impl, device)
    if reason is not None:
        raise StepUnavailable(reason)
    variant = FINETUNE_IMPLS[impl]
    settings = recipe(model_name)
    rate = settings["drop_path"] if drop_path is None else drop_path
    build = fastmae_classifier if variant.model == "fastmae" else timm_classifier
    with torch.device(device):  # initialise on the device: fast for ViT-H
        model = build(model_name, img_size, rate)
    model.train()
    groups = param_groups_lrd(model, settings["weight_decay"], set(model.no_weight_decay()), settings["layer_decay"])
    params = [p for group in groups for p in group["params"]]
    optimizer = build_optimizer(model, lr=settings["blr"] * batch_size / 256, weight_decay=settings["weight_decay"],
                                betas=ADAMW_BETAS, groups=groups)
    apply_lr(optimizer, settings["blr"] * batch_size / 256)  # the peak lr, scaled per layer
    np.random.seed(0)  # timm's Mixup draws from numpy's global generator
    labels = torch.randint(NUM_CLASSES, (batch_size,), device=device,
                           generator=torch.Generator(device).manual_seed(0))  # (N,)
    forward = torch.compile(model) if variant.compile else model
    bf16 = torch.device(device).type == "cuda"
    return TrainStep(impl=impl, model_name=model_name, batch_size=batch_size, dtype="bf16" if bf16 else "fp32",
                     compile=variant.compile, cuda_graph=False, model=model,
                     run=finetune_step_runner(forward, optimizer, params, labels, torch.device(device), bf16))
