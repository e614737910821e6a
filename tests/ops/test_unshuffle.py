import pytest
import torch

from fastmae import ops
from fastmae.ops.unshuffle import unshuffle_reference
from numerics import assert_rel_close


@pytest.mark.parametrize("n,num_patches,len_keep,dd", [(1, 196, 49, 32), (3, 256, 64, 16), (5, 24, 6, 8)])
def test_reference_places_every_token(n: int, num_patches: int, len_keep: int, dd: int) -> None:
    g = torch.Generator().manual_seed(num_patches)
    noise = torch.rand(n, num_patches, generator=g)
    ids_keep, ids_restore, mask = ops.random_masking(noise, len_keep)
    x = torch.randn(n, 1 + len_keep, dd, generator=g, requires_grad=True)
    mask_token = torch.randn(1, 1, dd, generator=g, requires_grad=True)
    pos = torch.randn(1, num_patches + 1, dd, generator=g)
    out = unshuffle_reference(x, ids_restore, mask_token, pos)
    assert out.shape == (n, num_patches + 1, dd)
    body = out[:, 1:] - pos[:, 1:]  # (N, L, Dd) without pos
    assert torch.allclose(out[:, 0], x[:, 0] + pos[0, 0])  # cls first, pos row 0 added
    for i in range(n):
        assert torch.allclose(body[i, ids_keep[i]], x[i, 1:], atol=1e-6)  # visible tokens at their patches
        removed = mask[i].bool()
        assert torch.allclose(body[i, removed], mask_token[0].expand(int(removed.sum()), dd), atol=1e-6)
    # gradients: each visible row gets its own output row's gradient, the mask token the sum over removed rows
    upstream = torch.randn_like(out)
    gx, gm = torch.autograd.grad(out, (x, mask_token), upstream)
    assert torch.allclose(gx[:, 0], upstream[:, 0])
    assert torch.allclose(gx[:, 1:], upstream[:, 1:].gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, dd)))
    assert_rel_close(gm.reshape(dd), (upstream[:, 1:] * mask.unsqueeze(-1)).sum((0, 1)), 1e-6, "mask token grad")


def test_public_validates() -> None:
    ids_restore = torch.arange(4).expand(2, 4)
    x, tok, pos = torch.randn(2, 3, 8), torch.randn(1, 1, 8), torch.randn(1, 5, 8)
    assert ops.unshuffle(x, ids_restore, tok, pos).shape == (2, 5, 8)
    with pytest.raises(ValueError, match="cls plus 1..L=4 kept tokens"):
        ops.unshuffle(torch.randn(2, 6, 8), ids_restore, tok, pos)
    with pytest.raises(ValueError, match=r"mask_token must have shape \(1, 1, 8\)"):
        ops.unshuffle(x, ids_restore, torch.randn(1, 1, 4), pos)
    with pytest.raises(ValueError, match=r"ids_restore must have shape \(2, \*\)"):
        ops.unshuffle(x, ids_restore[:1], tok, pos)
