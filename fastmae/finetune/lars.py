"""LARS (layer-wise adaptive rate scaling) as MAE's linear probing uses it (util/lars.py, from MoCo v3).

For each parameter ``p`` with gradient ``g`` in a group with ``lr``, ``weight_decay``, ``momentum`` and
``trust_coefficient``:

- a matrix or larger (``p.ndim > 1``): ``u = g + weight_decay * p``, then ``u *= trust_coefficient * |p| / |u|``
  (Frobenius norms), or ``u`` unscaled when either norm is 0;
- a vector or scalar (biases, norm weights): ``u = g``: no weight decay, no adaptation;

then ``mu = momentum * mu + u`` (``mu`` starts at 0) and ``p -= lr * mu``. Parameters without a gradient are
skipped (their momentum is not advanced).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class LARS(torch.optim.Optimizer):
    """LARS over ``params`` (module docstring); defaults as util/lars.py: ``lr`` 0 (the schedule sets it),
    ``weight_decay`` 0, ``momentum`` 0.9, ``trust_coefficient`` 0.001."""

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict], lr: float = 0.0,
                 weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient: float = 0.001) -> None:
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("trust_coefficient", trust_coefficient)):
            if not value >= 0:
                raise ValueError(f"LARS {name} must be >= 0, got {value}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "trust_coefficient": trust_coefficient})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update + group["weight_decay"] * p
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = group["trust_coefficient"] * p_norm / u_norm
                    update = update * torch.where((p_norm > 0) & (u_norm > 0), trust, torch.ones_like(trust))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss
