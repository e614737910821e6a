import pytest
import torch
import torch.nn.functional as F

from fastmae import ops
from fastmae.ops.layer_norm import layer_norm_reference
from numerics import assert_rel_close


@pytest.mark.parametrize("shape", [(3, 50, 768), (1, 197, 512), (5, 65, 80)])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_reference_matches_functional(shape: tuple[int, ...], eps: float) -> None:
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(*shape, generator=g) * 3 + 1
    w, b = torch.randn(shape[-1], generator=g), torch.randn(shape[-1], generator=g)
    assert_rel_close(layer_norm_reference(x, w, b, eps), F.layer_norm(x, shape[-1:], w, b, eps), 1e-6, "LN")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("residual", [False, True])
def test_backends_match_with_grads(backend: str, residual: bool) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 65, 96, generator=g, requires_grad=True)
    r = torch.randn(3, 65, 96, generator=g, requires_grad=True) if residual else None
    w = torch.randn(96, generator=g, requires_grad=True)
    b = torch.randn(96, generator=g, requires_grad=True)
    got = ops.layer_norm(x, w, b, 1e-6, r, backend=backend)
    total = x + r if residual else x
    want = F.layer_norm(total, (96,), w, b, 1e-6)
    if residual:
        got, got_sum = got
        assert torch.equal(got_sum, total)
    assert_rel_close(got, want, 1e-6, "forward")
    inputs = [x, w, b] + ([r] if residual else [])
    upstream = torch.randn_like(want)
    for a, e, name in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream),
                          ["x", "weight", "bias", "residual"]):
        assert_rel_close(a, e, 1e-5, name)


def test_public_validates() -> None:
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.layer_norm(torch.randn(2, 8), torch.ones(7), torch.zeros(8))
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 8\)"):
        ops.layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8), residual=torch.randn(2, 7))
