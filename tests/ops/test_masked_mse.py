import pytest
import torch

from fastmae import ops
from fastmae.ops.masked_mse import masked_mse_reference
from numerics import assert_rel_close


def _loop_loss(pred, imgs, mask, p, norm_pix, eps=1e-6):  # noqa: ANN001, ANN202
    """Patch by patch, the slow obvious way."""
    n, c, hh, ww = imgs.shape
    w = ww // p
    total, count = torch.zeros((), dtype=torch.float64), 0.0
    for i in range(n):
        for k in range(mask.shape[1]):
            if mask[i, k] == 0:
                continue
            r, col = divmod(k, w)
            patch = imgs[i, :, r * p:(r + 1) * p, col * p:(col + 1) * p].permute(1, 2, 0).reshape(-1).double()
            if norm_pix:
                patch = (patch - patch.mean()) / (patch.var(unbiased=True) + eps).sqrt()
            total = total + ((pred[i, k].double() - patch) ** 2).mean()
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("n,p,hh,ww", [(1, 16, 64, 64), (3, 14, 56, 84), (2, 16, 48, 32)])
def test_reference_against_patch_loop(norm_pix: bool, n: int, p: int, hh: int, ww: int) -> None:
    g = torch.Generator().manual_seed(hh + n)
    num_patches = (hh // p) * (ww // p)
    imgs = torch.randn(n, 3, hh, ww, generator=g)
    pred = torch.randn(n, num_patches, p * p * 3, generator=g)
    _, _, mask = ops.random_masking(torch.rand(n, num_patches, generator=g), max(1, num_patches // 4))
    got = masked_mse_reference(pred, imgs, mask, p, norm_pix)
    assert_rel_close(got, _loop_loss(pred, imgs, mask, p, norm_pix), 1e-6, "loss")


def test_gradient_only_on_removed_patches() -> None:
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 4, 768, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    (grad,) = torch.autograd.grad(ops.masked_mse(pred, imgs, mask, 16, True), pred)
    assert torch.all(grad[mask == 0] == 0) and torch.all(grad[mask == 1].abs().sum(-1) > 0)


def test_public_validates() -> None:
    imgs, pred, mask = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 768), torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"pred must have shape \(2, 4, 768\)"):
        ops.masked_mse(torch.randn(2, 4, 767), imgs, mask, 16, False)
    with pytest.raises(ValueError, match="patch_size must be a positive int dividing H=32"):
        ops.masked_mse(pred, imgs, mask, 5, False)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 4\)"):
        ops.masked_mse(pred, imgs, torch.ones(2, 5), 16, False)
