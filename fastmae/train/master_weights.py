"""bf16 matmul weights with fp32 master weights, for training under bf16 autocast.

Under autocast every fp32 Linear/Conv weight (and bias) is cast to bf16 at each use, every step (about 500 casts a
ViT-L step, forward and backward). With ``MasterWeights`` those parameters *are* bf16, so autocast has nothing to
cast, and the optimiser updates fp32 master copies: after the backward each bf16 gradient is widened into its
master's ``.grad``, the optimiser steps the masters, and the masters are rounded back into the bf16 parameters.
What autocast runs in fp32 keeps fp32 parameters, trained directly: LayerNorm weights and biases, the cls and
mask tokens (the residual stream stays fp32, as under autocast).

The model's ``state_dict()`` still holds fp32 values (the masters), so checkpoints look as without it, and
``load_state_dict`` of an fp32 state dict fills the masters exactly (the bf16 parameters get their rounding).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from fastmae.train.optim import param_groups


class MasterWeights:
    """Cast the trainable weights and biases of ``model``'s Linear and Conv layers to ``dtype`` in place and keep
    fp32 masters of them.

    Use: ``masters = MasterWeights(model)``; build the optimiser on ``masters.param_groups(weight_decay)``; each
    step the forward under autocast, ``loss.backward()``, then ``masters.step(optimizer)`` (which also clears
    every gradient), or step ``masters.bind(optimizer)`` as the optimiser.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"MasterWeights keeps bf16 or fp16 parameters, got {dtype}")
        self.model, self.dtype = model, dtype
        matmul = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        named = [(f"{m_name}.{n}" if m_name else n, p) for m_name, module in model.named_modules()
                 if isinstance(module, matmul) for n, p in module.named_parameters(recurse=False)
                 if p.requires_grad and p.dtype == torch.float32]
        if not named:
            raise ValueError("MasterWeights needs a model with trainable fp32 Linear or Conv parameters, got none")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.masters = [nn.Parameter(p.detach().float().clone()) for p in self.params]  # fp32
        self._master_of = {id(p): m for p, m in zip(self.params, self.masters)}
        with torch.no_grad():
            for p in self.params:
                p.data = p.data.to(dtype)
        model._register_state_dict_hook(self._export_masters)
        model._register_load_state_dict_pre_hook(self._import_masters)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """:func:`fastmae.train.optim.param_groups` of the model, each bf16 parameter replaced by its master."""
        groups = param_groups(self.model, weight_decay)
        return [{**g, "params": [self._master_of.get(id(p), p) for p in g["params"]]} for g in groups]

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Widen the bf16 parameters' gradients into the masters', step ``optimizer`` (built on
        :meth:`param_groups`), round the masters back into the parameters; every gradient is cleared after."""
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
        optimizer.step()
        torch._foreach_copy_(self.params, self.masters)
        optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    def bind(self, optimizer: torch.optim.Optimizer) -> MasterOptimizer:
        """``optimizer`` (built on :meth:`param_groups`) as an object a training loop steps like any optimiser."""
        return MasterOptimizer(self, optimizer)

    def _named_masters(self, prefix: str) -> Iterator[tuple[str, nn.Parameter]]:
        return ((prefix + n, m) for n, m in zip(self.names, self.masters))

    def _export_masters(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for key, master in self._named_masters(prefix):
            if key in state_dict:
                state_dict[key] = master.detach().clone()  # fp32, not the bf16 parameter

    @torch.no_grad()
    def _import_masters(self, state_dict: dict, prefix: str, *args: object) -> None:
        for key, master in self._named_masters(prefix):
            if key in state_dict:
                master.copy_(state_dict[key])


class MasterOptimizer:
    """An optimiser over the masters, stepped like the model's own: ``step()`` is :meth:`MasterWeights.step`,
    ``zero_grad()`` clears the parameters' and the masters' gradients."""

    def __init__(self, masters: MasterWeights, optimizer: torch.optim.Optimizer) -> None:
        self.masters, self.optimizer = masters, optimizer

    def step(self) -> None:
        self.masters.step(self.optimizer)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.masters.params:
            p.grad = None
