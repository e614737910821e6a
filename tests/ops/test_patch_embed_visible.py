import pytest
import torch
import torch.nn.functional as F

from fastmae import ops
from fastmae.ops.patch_embed_visible import patch_embed_visible_reference
from numerics import assert_rel_close


def _conv_then_gather(imgs, ids_keep, weight, bias, pos_embed):  # noqa: ANN001, ANN202
    """The official order: embed every patch with the conv, add pos, then keep the visible ones."""
    x = F.conv2d(imgs, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)  # (N, L, D)
    x = x + pos_embed[:, 1:]
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@pytest.mark.parametrize("n,p,hh,ww,d", [(1, 16, 224, 224, 64), (3, 14, 224, 224, 48), (5, 16, 64, 96, 32), (2, 14, 56, 84, 40)])
def test_reference_equals_conv_then_gather_with_grads(n: int, p: int, hh: int, ww: int, d: int) -> None:
    g = torch.Generator().manual_seed(p + n)
    num_patches = (hh // p) * (ww // p)
    imgs = torch.randn(n, 3, hh, ww, generator=g)
    ids_keep = torch.argsort(torch.rand(n, num_patches, generator=g), dim=1)[:, : num_patches // 4]
    weight = torch.randn(d, 3, p, p, generator=g, requires_grad=True)
    bias = torch.randn(d, generator=g, requires_grad=True)
    pos = torch.randn(1, num_patches + 1, d, generator=g)
    got = patch_embed_visible_reference(imgs, ids_keep, weight, bias, pos)
    want = _conv_then_gather(imgs, ids_keep, weight, bias, pos)
    assert got.shape == (n, num_patches // 4, d)
    assert_rel_close(got, want, 1e-6, "forward")
    upstream = torch.randn_like(want)
    grads = torch.autograd.grad(got, (weight, bias), upstream)
    want_grads = torch.autograd.grad(want, (weight, bias), upstream)
    for a, b, name in zip(grads, want_grads, ("weight", "bias")):
        assert_rel_close(a, b, 1e-6, name)


def test_public_validates() -> None:
    imgs, w, b, pos = torch.randn(2, 3, 32, 32), torch.randn(8, 3, 16, 16), torch.randn(8), torch.randn(1, 5, 8)
    ids = torch.zeros(2, 1, dtype=torch.int64)
    assert ops.patch_embed_visible(imgs, ids, w, b, pos).shape == (2, 1, 8)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        ops.patch_embed_visible(torch.randn(2, 3, 30, 32), ids, w, b, pos)
    with pytest.raises(ValueError, match="C=3"):
        ops.patch_embed_visible(torch.randn(2, 1, 32, 32), ids, w, b, pos)
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(1, 5, 8\)"):
        ops.patch_embed_visible(imgs, ids, w, b, torch.randn(1, 4, 8))
    with pytest.raises(TypeError, match="ids_keep must be int32 or int64"):
        ops.patch_embed_visible(imgs, ids.float(), w, b, pos)
