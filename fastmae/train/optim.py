"""The paper's optimiser and schedule: AdamW (0.9, 0.95), no decay on biases, norms and tokens,
lr = blr x effective batch / 256, linear warmup then per-iteration cosine decay.

AdamW is apex's FusedAdam (AdamW mode) on CUDA when apex imports, else torch's fused AdamW on CUDA and
its ``foreach`` AdamW elsewhere: :func:`choose_optimizer` says which and why."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices, and undecayed biases, norm weights and cls/mask tokens.

    The official script (timm's ``add_weight_decay``) decays the 3-D cls and mask tokens; fastmae
    exempts them, as its pretraining recipe specifies. The fixed pos tables are buffers, never trained.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "mask_token"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


APEX_FUSED_ADAM = "apex.optimizers.FusedAdam(adam_w_mode=True)"
TORCH_FUSED_ADAMW = "torch.optim.AdamW(fused=True)"
TORCH_FOREACH_ADAMW = "torch.optim.AdamW(foreach=True)"


@dataclass(frozen=True)
class OptimizerChoice:
    """Which AdamW implementation :func:`build_optimizer` uses, and why."""

    name: str  # APEX_FUSED_ADAM, TORCH_FUSED_ADAMW or TORCH_FOREACH_ADAMW
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def _apex_fused_adam_why_not() -> str | None:
    """None when ``apex.optimizers.FusedAdam`` imports with its CUDA extension (``amp_C``), else why not."""
    try:
        importlib.import_module("apex.optimizers")
        importlib.import_module("amp_C")  # FusedAdam's multi-tensor kernels, built with apex's --cuda_ext
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "apex":
            return "apex is not installed"
        return f"NVIDIA apex's FusedAdam does not import: {exc}"
    return None


def choose_optimizer(device: torch.device) -> OptimizerChoice:
    """apex's FusedAdam (AdamW mode) for CUDA parameters when apex imports; else torch's AdamW, fused on CUDA
    and ``foreach`` elsewhere."""
    if device.type != "cuda":
        return OptimizerChoice(TORCH_FOREACH_ADAMW, f"the parameters are on {device.type}, not CUDA")
    apex_why_not = _apex_fused_adam_why_not()
    if apex_why_not is None:
        return OptimizerChoice(APEX_FUSED_ADAM, "apex imports and the parameters are on CUDA")
    return OptimizerChoice(TORCH_FUSED_ADAMW, f"the parameters are on CUDA; {apex_why_not}")


def _apex_adamw_class() -> type[torch.optim.Optimizer]:
    """apex's FusedAdam with ``torch.optim.Optimizer``'s ``zero_grad(set_to_none=True)`` signature (apex's
    own takes no argument), so training loops call either optimizer the same way."""
    from apex.optimizers import FusedAdam

    class ApexFusedAdamW(FusedAdam):
        def zero_grad(self, set_to_none: bool = True) -> None:
            torch.optim.Optimizer.zero_grad(self, set_to_none=set_to_none)

    return ApexFusedAdamW


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.95),
                    groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (default :func:`param_groups`), the implementation picked by :func:`choose_optimizer`."""
    device = next(model.parameters()).device
    groups = groups if groups is not None else param_groups(model, weight_decay)
    name = choose_optimizer(device).name
    if name == APEX_FUSED_ADAM:
        return _apex_adamw_class()(groups, lr=lr, betas=betas, adam_w_mode=True)
    fused = name == TORCH_FUSED_ADAMW
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, foreach=not fused)


def _apex_form(groups: list[dict]) -> bool:
    """Whether optimizer param groups are apex FusedAdam's: it keeps ``bias_correction`` in every group."""
    return any("bias_correction" in group for group in groups)


def saved_by_other_adamw(saved: dict, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``saved`` (a ``state_dict()``) comes from apex's FusedAdam and ``optimizer`` is torch's AdamW, or
    the other way round."""
    return _apex_form(saved["param_groups"]) != _apex_form(optimizer.param_groups)


# How torch's AdamW runs a step, not the recipe: taken from this run's optimizer, never from the checkpoint
# (a checkpoint of a CPU run says foreach; resumed on CUDA the fused step must run, which the non-finite skip
# relies on).
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def adapt_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """``saved``, a ``state_dict()`` of apex's FusedAdam or of torch's AdamW, in the form ``optimizer`` loads:
    a one-file checkpoint resumes on a machine with or without apex, on CPU or CUDA (same run, same groups).

    The moments carry over unchanged. Between the two kinds the step count moves between apex's one per group
    (``group["step"]``) and torch's one per parameter (``state[i]["step"]``), and group settings take the saved
    value of every key ``optimizer`` has and its own value for the rest (apex's ``bias_correction``; torch's
    ``fused``, ``foreach``). Between two torch AdamWs only the implementation keys (``fused``, ``foreach``,
    ``capturable``, ``differentiable``) become ``optimizer``'s. ``saved`` is not modified. ValueError when the
    groups do not match or one group's parameters have different step counts (apex cannot hold that)."""
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, this "
                         f"run's {len(optimizer.param_groups)}: not the same model and recipe")
    if not saved_by_other_adamw(saved, optimizer):
        groups = [{**old, **{key: current[key] for key in _IMPLEMENTATION_KEYS if key in current}}
                  for old, current in zip(saved["param_groups"], optimizer.param_groups)]
        return {"state": saved["state"], "param_groups": groups}
    to_apex = _apex_form(optimizer.param_groups)
    state = {index: dict(values) for index, values in saved["state"].items()}
    groups = []
    for old, current in zip(saved["param_groups"], optimizer.param_groups):
        group = {key: old.get(key, value) for key, value in current.items() if key not in ("params", "step")}
        group.update({key: current[key] for key in _IMPLEMENTATION_KEYS if key in current})
        group["params"] = list(old["params"])
        mine = [state[index] for index in old["params"] if index in state]
        if to_apex:
            counts = sorted({float(values.pop("step")) for values in mine if "step" in values})
            if len(counts) > 1:
                raise ValueError(f"parameters of one group have different step counts {counts}; apex's FusedAdam "
                                 "keeps one count per group")
            if counts:
                group["step"] = int(counts[0])
        elif "step" in old:
            for values in mine:
                values["step"] = torch.tensor(float(old["step"]), dtype=torch.float32)
        groups.append(group)
    return {"state": state, "param_groups": groups}


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 to ``base_lr`` over ``warmup_steps``, then half-cosine to ``min_lr``."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
