"""The baselines' complete pretraining steps, as ``TrainStep``s for the throughput benchmark.

- ``official``: the official recipe as its ``engine_pretrain.py`` runs it: eager, fp16 autocast with a
  GradScaler, explicit attention, ``torch.optim.AdamW`` with timm's parameter groups, and per step
  ``loss.item()`` (plus the finiteness check), the unscale and gradient norm of its
  ``NativeScalerWithGradNormCount``, and ``torch.cuda.synchronize()``. The per-iteration lr
  schedule is left out: it is a Python float assignment with no device work.
- ``modern``: the same model as a user would modernise it quickly: bf16 autocast, SDPA attention,
  ``AdamW(fused=True)``, ``torch.compile`` of the model, no host sync.
- ``modern-cudagraph``: ``modern`` with its whole step (forward, backward, fused capturable AdamW)
  captured in one CUDA graph by ``fastmae.benchmark.train_step.step_runner``, exactly as
  fastmae's ``fastmae-compile-cudagraph`` is: the strongest PyTorch baseline. CUDA only.
- ``hf``: Hugging Face ``ViTMAEForPreTraining`` with SDPA attention, the preset's architecture,
  bf16 autocast and fused AdamW.
- ``hf-compile``: ``hf`` under ``torch.compile``. It exists to be compiled, so unlike ``modern`` it
  compiles on a CPU too (slowly; the CPU defaults of ``fastmae bench`` leave it out).

Every step: forward with mask ratio 0.75 and ``norm_pix_loss``, backward, AdamW (lr 1.5e-4 * N / 256,
betas (0.9, 0.95), weight decay 0.05 on all but 1-D parameters and biases), grads set to None.

On a device other than CUDA the steps run in fp32 (no autocast, no GradScaler, the default
non-fused AdamW) and ``modern`` runs eagerly: its ``TrainStep`` then says ``compile=False``.
Compiling there would time the CPU Inductor backend, which is not what the row is for.

``unavailable_reason(impl, device)`` says, without building anything, why a baseline cannot run on
``device``: ``modern-cudagraph`` needs CUDA, ``hf`` and ``hf-compile`` need transformers. The builders
raise ``StepUnavailable`` (a ``RuntimeError``) with that reason, and ``fastmae bench`` skips the row.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from fastmae.benchmark.baselines.official_mae import mae_from_preset, preset_config
from fastmae.benchmark.train_step import (
    BASE_LR,
    BETAS,
    MASK_RATIO,
    WEIGHT_DECAY,
    StepUnavailable,
    TrainStep,
    step_runner,
)

CUDA_ONLY = ("modern-cudagraph",)  # whole-step CUDA graphs
NEEDS_TRANSFORMERS = ("hf", "hf-compile")


def official_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm's ``add_weight_decay`` as the official script calls it: no decay on 1-D parameters and
    biases (the 3-D cls and mask tokens are decayed); frozen parameters are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _adamw(model: nn.Module, batch_size: int, fused: bool, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW at lr ``1.5e-4 * batch / 256``; ``capturable`` keeps its step counters on the device (CUDA graphs)."""
    lr = BASE_LR * batch_size / 256
    extra = {"fused": True} if fused else {}
    if capturable:
        extra["capturable"] = True
    return torch.optim.AdamW(official_param_groups(model, WEIGHT_DECAY), lr=lr, betas=BETAS, **extra)


def unavailable_reason(impl: str, device: torch.device | str) -> str | None:
    """Why baseline ``impl`` cannot run on ``device``, found without building it; ``None`` when it can."""
    if impl not in BUILDERS:
        raise ValueError(f"unknown baseline {impl!r}; expected one of {sorted(BUILDERS)}")
    if impl in CUDA_ONLY and torch.device(device).type != "cuda":
        return f"{impl}: CUDA graphs need a CUDA device, got {device}"
    if impl in NEEDS_TRANSFORMERS and importlib.util.find_spec("transformers") is None:
        return f"{impl}: transformers is not installed (pip install transformers)"
    return None


def _require(impl: str, device: torch.device) -> None:
    """Raise ``StepUnavailable`` with the reason when ``impl`` cannot run on ``device``."""
    reason = unavailable_reason(impl, device)
    if reason is not None:
        raise StepUnavailable(reason)


def _check_args(model_name: str, batch_size: int, img_size: int, device: torch.device | str) -> torch.device:
    """Validate the builder arguments; returns ``device`` as a ``torch.device``."""
    cfg = preset_config(model_name)  # ValueError for an unknown name
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(img_size, int) or img_size < 1 or img_size % cfg["patch_size"]:
        raise ValueError(f"img_size must be a positive int divisible by the patch size {cfg['patch_size']} "
                         f"of {model_name}, got {img_size!r}")
    return torch.device(device)


def _grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The official ``get_grad_norm_``: the 2-norm of all gradients, computed on the device."""
    norms = [torch.norm(p.grad.detach(), 2.0) for p in parameters if p.grad is not None]
    return torch.norm(torch.stack(norms), 2.0)


def build_official_step(model_name: str, batch_size: int, img_size: int, device: torch.device) -> TrainStep:
    """The official MAE and its training loop as written (fp16 + GradScaler on CUDA, fp32 elsewhere)."""
    device = _check_args(model_name, batch_size, img_size, device)
    on_cuda = device.type == "cuda"
    with device:  # initialise on the device: fast for ViT-H
        model = mae_from_preset(model_name, img_size=img_size, norm_pix_loss=True, attn_impl="explicit")
    model.train()
    optimizer = _adamw(model, batch_size, fused=False)
    scaler = torch.amp.GradScaler(device.type, enabled=on_cuda)

    def run(imgs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.float16, enabled=on_cuda):
            loss, _, _ = model(imgs, mask_ratio=MASK_RATIO)
        loss_value = loss.item()  # the engine's per-step host sync
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"official baseline: loss is {loss_value}")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        _grad_norm(model.parameters())  # logged by the official scaler; computed every step
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if on_cuda:
            torch.cuda.synchronize()
        return loss.detach()

    return TrainStep(impl="official", model_name=model_name, batch_size=batch_size,
                     dtype="fp16" if on_cuda else "fp32", compile=False, cuda_graph=False, model=model, run=run)


def _build_modern(impl: str, model_name: str, batch_size: int, img_size: int, device: torch.device,
                  cuda_graph: bool) -> TrainStep:
    """``modern`` (``cuda_graph=False``) or ``modern-cudagraph`` (its step captured in one CUDA graph)."""
    device = _check_args(model_name, batch_size, img_size, device)
    _require(impl, device)
    on_cuda = device.type == "cuda"
    with device:
        model = mae_from_preset(model_name, img_size=img_size, norm_pix_loss=True, attn_impl="sdpa")
    model.train()
    optimizer = _adamw(model, batch_size, fused=on_cuda, capturable=cuda_graph)
    forward = torch.compile(model) if on_cuda else model

    run = step_runner(forward, optimizer, batch_size, img_size, device, bf16=on_cuda, cuda_graph=cuda_graph)
    return TrainStep(impl=impl, model_name=model_name, batch_size=batch_size, dtype="bf16" if on_cuda else "fp32",
                     compile=on_cuda, cuda_graph=cuda_graph, model=model, run=run)


def _build_hf(impl: str, model_name: str, batch_size: int, img_size: int, device: torch.device,
              compiled: bool) -> TrainStep:
    """``hf`` (eager) or ``hf-compile`` (``torch.compile`` of the model, on every device)."""
    device = _check_args(model_name, batch_size, img_size, device)
    _require(impl, device)
    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except ImportError as exc:  # installed but broken, or too old to have ViTMAE
        raise StepUnavailable(f"{impl}: transformers cannot be imported ({exc})") from exc
    on_cuda = device.type == "cuda"
    cfg = preset_config(model_name)
    config = ViTMAEConfig(
        hidden_size=cfg["embed_dim"], num_hidden_layers=cfg["depth"], num_attention_heads=cfg["num_heads"],
        intermediate_size=int(cfg["embed_dim"] * cfg["mlp_ratio"]), hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6,
        image_size=img_size, patch_size=cfg["patch_size"], num_channels=3, qkv_bias=True,
        decoder_hidden_size=cfg["decoder_embed_dim"], decoder_num_hidden_layers=cfg["decoder_depth"],
        decoder_num_attention_heads=cfg["decoder_num_heads"],
        decoder_intermediate_size=int(cfg["decoder_embed_dim"] * cfg["mlp_ratio"]),
        mask_ratio=MASK_RATIO, norm_pix_loss=True,
    )
    model = ViTMAEForPreTraining._from_config(config, attn_implementation="sdpa").to(device)
    model.train()
    optimizer = _adamw(model, batch_size, fused=on_cuda)
    forward = torch.compile(model) if compiled else model

    def run(imgs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
            loss = forward(pixel_values=imgs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return TrainStep(impl=impl, model_name=model_name, batch_size=batch_size, dtype="bf16" if on_cuda else "fp32",
                     compile=compiled, cuda_graph=False, model=model, run=run)


# each builder: (model_name, batch_size, img_size, device) -> TrainStep; StepUnavailable where it cannot run
BUILDERS: dict[str, Callable[[str, int, int, torch.device], TrainStep]] = {
    "official": build_official_step,
    "modern": functools.partial(_build_modern, "modern", cuda_graph=False),  # bf16, SDPA, fused AdamW, compile
    "modern-cudagraph": functools.partial(_build_modern, "modern-cudagraph", cuda_graph=True),  # + one CUDA graph
    "hf": functools.partial(_build_hf, "hf", compiled=False),  # Hugging Face ViTMAEForPreTraining, SDPA
    "hf-compile": functools.partial(_build_hf, "hf-compile", compiled=True),  # the same under torch.compile
}
