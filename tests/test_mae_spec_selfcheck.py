"""Self-checks of the independent MAE reference in tests/mae_spec.py (no fastmae imports)."""

from __future__ import annotations

import math
import statistics

import torch

from mae_spec import spec_mae_forward, spec_sincos_pos_embed

# Tiny config: 16x12 image (H x W), patch 4 -> grid 4 rows x 3 columns, L = 12.
C, H, W, P = 3, 16, 12, 4
GRID_H, GRID_W = H // P, W // P
L = GRID_H * GRID_W
D, DEPTH, HEADS = 32, 2, 4
DD, DDEPTH, DHEADS = 16, 1, 2
EPS = 1e-6


def _block_params(prefix: str, dim: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    def rnd(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    return {
        f"{prefix}.norm1.weight": 1 + rnd(dim),
        f"{prefix}.norm1.bias": rnd(dim),
        f"{prefix}.attn.qkv.weight": rnd(3 * dim, dim),
        f"{prefix}.attn.qkv.bias": rnd(3 * dim),
        f"{prefix}.attn.proj.weight": rnd(dim, dim),
        f"{prefix}.attn.proj.bias": rnd(dim),
        f"{prefix}.norm2.weight": 1 + rnd(dim),
        f"{prefix}.norm2.bias": rnd(dim),
        f"{prefix}.mlp.fc1.weight": rnd(4 * dim, dim),
        f"{prefix}.mlp.fc1.bias": rnd(4 * dim),
        f"{prefix}.mlp.fc2.weight": rnd(dim, 4 * dim),
        f"{prefix}.mlp.fc2.bias": rnd(dim),
    }


def _make_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    params: dict[str, torch.Tensor] = {
        "cls_token": rnd(1, 1, D, scale=0.02),
        "pos_embed": spec_sincos_pos_embed(D, GRID_H, GRID_W)[None],
        "patch_embed.proj.weight": rnd(D, C, P, P),
        "patch_embed.proj.bias": rnd(D),
        "norm.weight": 1 + rnd(D),
        "norm.bias": rnd(D),
        "mask_token": rnd(1, 1, DD, scale=0.02),
        "decoder_pos_embed": spec_sincos_pos_embed(DD, GRID_H, GRID_W)[None],
        "decoder_embed.weight": rnd(DD, D),
        "decoder_embed.bias": rnd(DD),
        "decoder_norm.weight": 1 + rnd(DD),
        "decoder_norm.bias": rnd(DD),
        "decoder_pred.weight": rnd(P * P * C, DD),
        "decoder_pred.bias": rnd(P * P * C),
    }
    for i in range(DEPTH):
        params.update(_block_params(f"blocks.{i}", D, g))
    for i in range(DDEPTH):
        params.update(_block_params(f"decoder_blocks.{i}", DD, g))
    return params


def _run(params, imgs, noise, mask_ratio=0.75, norm_pix_loss=False):
    return spec_mae_forward(
        params, imgs, noise, patch_size=P, num_heads=HEADS, decoder_num_heads=DHEADS,
        mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, ln_eps=EPS,
    )


def test_pos_embed_layout() -> None:
    dim = 16
    table = spec_sincos_pos_embed(dim, GRID_H, GRID_W)
    assert table.shape == (1 + L, dim) and table.dtype == torch.float32
    assert torch.all(table[0] == 0)
    q = dim // 4  # frequencies per [sin|cos] part of one half
    for k in range(L):
        row, col = divmod(k, GRID_W)  # row-major patch order
        t = table[1 + k].double()
        # Channel 0: sin(col * omega_0) with omega_0 = 1; channel q: cos(col).
        assert math.isclose(t[0].item(), math.sin(col), abs_tol=1e-6)
        assert math.isclose(t[q].item(), math.cos(col), abs_tol=1e-6)
        # Second half encodes the row.
        assert math.isclose(t[2 * q].item(), math.sin(row), abs_tol=1e-6)
        assert math.isclose(t[3 * q].item(), math.cos(row), abs_tol=1e-6)
        # Last sin frequency of the column half: omega = 1/10000**((q-1)/q).
        omega = 1.0 / 10000 ** ((q - 1) / q)
        assert math.isclose(t[q - 1].item(), math.sin(col * omega), abs_tol=1e-6)


def test_mask_pred_shapes_and_loss_against_loops() -> None:
    torch.manual_seed(0)
    params = _make_params()
    imgs = torch.randn(2, C, H, W)
    noise = torch.rand(2, L)
    len_keep = int(L * (1 - 0.75))

    loss, pred, mask = _run(params, imgs, noise)
    assert pred.shape == (2, L, P * P * C) and mask.shape == (2, L) and loss.dim() == 0
    assert torch.all(mask.sum(dim=1) == L - len_keep)
    kept = torch.argsort(noise, dim=1)[:, :len_keep]
    for n in range(2):
        assert set(torch.nonzero(mask[n] == 0).flatten().tolist()) == set(kept[n].tolist())

    # Gradients reach every parameter tensor.
    leaf = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    _run(leaf, imgs, noise)[0].backward()
    for name, t in leaf.items():
        assert t.grad is not None and torch.isfinite(t.grad).all(), name

    # With a zero prediction weight, pred == bias b for every patch and the loss is the mean over
    # removed patches of mean((b - target)^2); build the target with explicit loops (element
    # order h, w, p, q, c) so that a wrong patchify order changes the number.
    const = dict(params)
    bias = torch.randn(P * P * C)
    const["decoder_pred.weight"] = torch.zeros_like(params["decoder_pred.weight"])
    const["decoder_pred.bias"] = bias
    loss0, pred0, mask0 = _run(const, imgs, noise)
    assert torch.equal(pred0, bias.expand(2, L, -1)) and torch.equal(mask0, mask)
    total, total_norm, count = 0.0, 0.0, 0
    for n in range(2):
        for k in range(L):
            if mask[n, k] == 0:
                continue
            r, c = divmod(k, GRID_W)
            vals = [
                imgs[n, ch, r * P + i, c * P + j].item()
                for i in range(P) for j in range(P) for ch in range(C)
            ]
            total += sum((b - v) ** 2 for b, v in zip(bias.tolist(), vals)) / len(vals)
            # norm_pix target: per-patch mean and unbiased (sample) variance, eps 1e-6.
            mu, sd = statistics.fmean(vals), math.sqrt(statistics.variance(vals) + 1e-6)
            normed = [(v - mu) / sd for v in vals]
            total_norm += sum((b - v) ** 2 for b, v in zip(bias.tolist(), normed)) / len(vals)
            count += 1
    assert math.isclose(loss0.item(), total / count, rel_tol=1e-5)
    loss0_norm, _, _ = _run(const, imgs, noise, norm_pix_loss=True)
    assert math.isclose(loss0_norm.item(), total_norm / count, rel_tol=1e-5)


def test_masking_invariances_and_norm_pix() -> None:
    torch.manual_seed(1)
    params = _make_params(seed=1)
    imgs = torch.randn(2, C, H, W)
    noise = torch.rand(2, L)
    loss_n, pred, mask = _run(params, imgs, noise, norm_pix_loss=True)
    loss_raw, _, _ = _run(params, imgs, noise, norm_pix_loss=False)

    # Reordering noise values within the kept set and within the removed set changes ids_shuffle
    # but not the kept set; the encoder is permutation-equivariant and the decoder unshuffles with
    # ids_restore, so pred and mask must not change.
    len_keep = int(L * (1 - 0.75))
    order = torch.argsort(noise, dim=1)
    noise_p = noise.clone()
    for ids in (order[:, :len_keep], order[:, len_keep:]):
        noise_p.scatter_(1, ids, torch.gather(noise, 1, ids.roll(1, dims=1)))
    assert not torch.equal(torch.argsort(noise_p, dim=1), order)
    loss_p, pred_p, mask_p = _run(params, imgs, noise_p, norm_pix_loss=True)
    assert torch.equal(mask_p, mask)
    torch.testing.assert_close(pred_p, pred)
    torch.testing.assert_close(loss_p, loss_n)

    # Add a different constant to every pixel of each patch (per sample, per patch).
    offsets = torch.randn(2, 1, GRID_H, GRID_W) * 3
    shift = offsets.repeat_interleave(P, dim=2).repeat_interleave(P, dim=3)  # (2, 1, H, W)
    removed = mask.reshape(2, 1, GRID_H, GRID_W).repeat_interleave(P, 2).repeat_interleave(P, 3)

    # Shifting only removed patches: the encoder never sees them, so pred is unchanged; the
    # per-patch-normalised target is unchanged too, while the raw-pixel loss changes.
    imgs_r = imgs + shift * removed
    loss_n2, pred2, _ = _run(params, imgs_r, noise, norm_pix_loss=True)
    loss_raw2, _, _ = _run(params, imgs_r, noise, norm_pix_loss=False)
    torch.testing.assert_close(pred2, pred)
    torch.testing.assert_close(loss_n2, loss_n)
    assert not torch.isclose(loss_raw2, loss_raw)

    # Shifting only kept patches changes what the encoder sees, hence pred.
    _, pred3, _ = _run(params, imgs + shift * (1 - removed), noise, norm_pix_loss=True)
    assert not torch.allclose(pred3, pred, atol=1e-4)
