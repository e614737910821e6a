import pytest
import torch

from fastmae import ops
from fastmae.ops.attention import attention_reference
from numerics import assert_rel_close


def _per_head_loop(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """One head at a time in float64, the textbook formula."""
    n, s, width = qkv.shape
    dh = width // (3 * num_heads)
    q, k, v = qkv.double().split(width // 3, dim=-1)  # 3 x (N, S, H*Dh)
    outs = []
    for h in range(num_heads):
        sl = slice(h * dh, (h + 1) * dh)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / dh**0.5  # (N, S, S)
        outs.append(torch.softmax(scores, dim=-1) @ v[..., sl])  # (N, S, Dh)
    return torch.cat(outs, dim=-1)  # (N, S, H*Dh)


SHAPES = [(1, 50, 4, 64), (3, 65, 2, 80), (2, 197, 2, 32), (1, 257, 1, 64), (5, 17, 3, 32)]


@pytest.mark.parametrize("n,s,h,dh", SHAPES)
def test_reference_matches_textbook(n: int, s: int, h: int, dh: int) -> None:
    qkv = torch.randn(n, s, 3 * h * dh, generator=torch.Generator().manual_seed(s))
    assert_rel_close(attention_reference(qkv, h), _per_head_loop(qkv, h), 1e-6, "reference")


@pytest.mark.parametrize("n,s,h,dh", SHAPES)
def test_torch_backend_matches_reference_with_grads(n: int, s: int, h: int, dh: int) -> None:
    qkv = torch.randn(n, s, 3 * h * dh, generator=torch.Generator().manual_seed(s + 1), requires_grad=True)
    got = ops.attention(qkv, h, backend="torch")
    want = ops.attention(qkv, h, backend="reference")
    assert got.shape == (n, s, h * dh)
    assert_rel_close(got, want, 1e-5, "forward")
    upstream = torch.randn_like(want)
    (g_got,) = torch.autograd.grad(got, qkv, upstream)
    (g_want,) = torch.autograd.grad(want, qkv, upstream)
    assert_rel_close(g_got, g_want, 1e-5, "d qkv")


def test_public_validates() -> None:
    with pytest.raises(ValueError, match="3 \\* num_heads \\* head_dim"):
        ops.attention(torch.randn(2, 5, 40), 3)
    with pytest.raises(ValueError, match="3 dimensions"):
        ops.attention(torch.randn(5, 48), 2)
