"""LARS against a re-implementation of the official ``util/lars.py`` on a random problem, step by step."""

from __future__ import annotations

import pytest
import torch

from fastmae.finetune.lars import LARS


def official_lars_step(params: list[torch.Tensor], state: dict[int, torch.Tensor], lr: float, weight_decay: float,
                       momentum: float = 0.9, trust_coefficient: float = 0.001) -> None:
    """One step of the official LARS (MoCo v3's), restated on plain tensors with ``.grad``."""
    with torch.no_grad():
        for p in params:
            dp = p.grad
            if dp is None:
                continue
            if p.ndim > 1:
                dp = dp.add(p, alpha=weight_decay)
                param_norm, update_norm = torch.norm(p), torch.norm(dp)
                one = torch.ones_like(param_norm)
                q = torch.where(param_norm > 0.0,
                                torch.where(update_norm > 0, trust_coefficient * param_norm / update_norm, one), one)
                dp = dp.mul(q)
            if id(p) not in state:
                state[id(p)] = torch.zeros_like(p)
            mu = state[id(p)]
            mu.mul_(momentum).add_(dp)
            p.add_(mu, alpha=-lr)


def _problem(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(10, 7, generator=g), torch.randn(10, generator=g), torch.randn(3, 4, 5, generator=g),
            torch.zeros(6, 6), torch.randn(4, 4, generator=g)]  # a matrix, a bias, a 3-D, a zero matrix, no grad


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_lars_equals_the_official_update(weight_decay: float) -> None:
    ours = [p.clone().requires_grad_() for p in _problem(0)]
    ref = [p.clone() for p in _problem(0)]
    optimizer = LARS(ours, lr=0.0, weight_decay=weight_decay)
    state: dict[int, torch.Tensor] = {}
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        lr = 0.5 * (step + 1)  # a schedule sets the group lr each step
        for group in optimizer.param_groups:
            group["lr"] = lr
        for a, b in zip(ours[:-1], ref[:-1]):  # the last parameter never gets a gradient
            grad = torch.randn(a.shape, generator=g) * (0 if step == 2 and a.ndim == 2 and a.shape[0] == 10 else 1)
            a.grad, b.grad = grad.clone(), grad.clone()  # step 2: a zero gradient (update norm 0) for the matrix
        optimizer.step()
        official_lars_step(ref, state, lr, weight_decay)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.detach(), b, atol=1e-6, rtol=0)
    assert not torch.equal(ours[3].detach(), torch.zeros(6, 6))  # the zero matrix moved (unscaled update)
    assert torch.equal(ours[4].detach(), _problem(0)[4]) and ours[4] not in optimizer.state  # no grad: untouched


def test_lars_resumes_from_its_state_dict() -> None:
    def run(steps: int, resume_at: int | None = None) -> torch.Tensor:
        w = torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(2)))
        optimizer = LARS([w], lr=0.1, weight_decay=0.01)
        g = torch.Generator().manual_seed(3)
        for step in range(steps):
            if step == resume_at:
                saved = optimizer.state_dict()
                optimizer = LARS([w], lr=0.1, weight_decay=0.01)
                optimizer.load_state_dict(saved)
            w.grad = torch.randn(5, 3, generator=g)
            optimizer.step()
        return w.detach()

    assert torch.equal(run(5), run(5, resume_at=3))


def test_bad_hyperparameters_are_refused() -> None:
    with pytest.raises(ValueError, match=r"LARS momentum must be in \[0, 1\), got 1.0"):
        LARS([torch.nn.Parameter(torch.ones(2, 2))], momentum=1.0)
