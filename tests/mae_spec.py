"""Independent, purely functional reference of the MAE forward pass and loss.

Written only from the algorithm spec in DESIGN.md ("The algorithm"), in plain torch, operating on a
state dict with the official facebookresearch/mae key names. It is deliberately simple and slow: it
exists to check the package's model, so it imports nothing from ``fastmae``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos positional table
# --------------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """1-D sin-cos encoding of ``positions`` (M,) float64 -> (M, dim) as [sin | cos]."""
    assert dim % 2 == 0
    i = torch.arange(dim // 2, dtype=torch.float64)
    omega = 1.0 / 10000.0 ** (i / (dim / 2))  # dim here is half the full width => i / (D/4)
    angles = positions[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (M, dim)


def spec_sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """(1 + grid_h*grid_w, dim) float32, cls row zeros; first half of channels encodes the column
    index, second half the row; inside each half [sin, cos], omega = 1/10000**(i/(dim/4));
    computed in float64."""
    assert dim % 4 == 0, "sin-cos pos embed needs dim divisible by 4"
    rows = torch.arange(grid_h, dtype=torch.float64)
    cols = torch.arange(grid_w, dtype=torch.float64)
    # Row-major patch order: token k sits at row k // grid_w, column k % grid_w.
    row_of_token = rows[:, None].expand(grid_h, grid_w).reshape(-1)  # (L,)
    col_of_token = cols[None, :].expand(grid_h, grid_w).reshape(-1)  # (L,)
    table = torch.cat(
        [_sincos_1d(dim // 2, col_of_token), _sincos_1d(dim // 2, row_of_token)], dim=1
    )  # (L, dim)
    cls_row = torch.zeros(1, dim, dtype=torch.float64)
    return torch.cat([cls_row, table], dim=0).to(torch.float32)  # (1 + L, dim)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def spec_patchify(imgs: Tensor, p: int) -> Tensor:
    """(N, C, H, W) -> (N, L, p*p*C) with element order n,h,w,p,q,c (channel fastest)."""
    n, c, height, width = imgs.shape
    assert height % p == 0 and width % p == 0
    h, w = height // p, width // p
    x = imgs.reshape(n, c, h, p, w, p)  # (N, C, h, p, w, q)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (N, h, w, p, q, C)
    return x.reshape(n, h * w, p * p * c)  # (N, L, p*p*C)


def _count_blocks(params: dict[str, Tensor], prefix: str) -> int:
    """Number of blocks ``{prefix}.{i}.*`` present in the state dict."""
    indices = {
        int(key[len(prefix) + 1 :].split(".", 1)[0])
        for key in params
        if key.startswith(prefix + ".")
    }
    assert indices == set(range(len(indices))), f"non-contiguous {prefix} indices: {indices}"
    return len(indices)


def _layer_norm(x: Tensor, params: dict[str, Tensor], name: str, eps: float) -> Tensor:
    weight = params[f"{name}.weight"]
    return F.layer_norm(x, (weight.shape[0],), weight, params[f"{name}.bias"], eps)


def _linear(x: Tensor, params: dict[str, Tensor], name: str) -> Tensor:
    return F.linear(x, params[f"{name}.weight"], params[f"{name}.bias"])


def _attention(x: Tensor, params: dict[str, Tensor], name: str, num_heads: int) -> Tensor:
    """Multi-head self-attention written as explicit math. x: (N, S, D) -> (N, S, D)."""
    n, s, d = x.shape
    head_dim = d // num_heads
    assert head_dim * num_heads == d
    qkv = _linear(x, params, f"{name}.qkv")  # (N, S, 3D)
    qkv = qkv.reshape(n, s, 3, num_heads, head_dim)  # (N, S, 3, H, Dh)
    qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, N, H, S, Dh)
    q, k, v = qkv[0], qkv[1], qkv[2]  # each (N, H, S, Dh)
    scores = (q @ k.transpose(-2, -1)) * head_dim**-0.5  # (N, H, S, S)
    weights = scores.softmax(dim=-1)
    out = weights @ v  # (N, H, S, Dh)
    out = out.transpose(1, 2).reshape(n, s, d)  # (N, S, D)
    return _linear(out, params, f"{name}.proj")


def _block(x: Tensor, params: dict[str, Tensor], name: str, num_heads: int, eps: float) -> Tensor:
    """Pre-LN ViT block. x: (N, S, D) -> (N, S, D)."""
    attn_in = _layer_norm(x, params, f"{name}.norm1", eps)
    x = x + _attention(attn_in, params, f"{name}.attn", num_heads)
    hidden = _linear(_layer_norm(x, params, f"{name}.norm2", eps), params, f"{name}.mlp.fc1")
    hidden = F.gelu(hidden, approximate="none")  # exact erf GELU
    return x + _linear(hidden, params, f"{name}.mlp.fc2")


def _gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """x: (N, L, D), ids: (N, K) -> x[n, ids[n, k], :] as (N, K, D)."""
    return torch.gather(x, 1, ids[:, :, None].expand(-1, -1, x.shape[-1]))


# --------------------------------------------------------------------------------------------------
# Forward and loss
# --------------------------------------------------------------------------------------------------


def spec_mae_forward(
    params: dict[str, Tensor],
    imgs: Tensor,
    noise: Tensor,
    *,
    patch_size: int,
    num_heads: int,
    decoder_num_heads: int,
    mask_ratio: float,
    norm_pix_loss: bool,
    ln_eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """returns (loss scalar, pred (N, L, p*p*C), mask (N, L) float 1=removed)"""
    p = patch_size
    n, c, height, width = imgs.shape
    h, w = height // p, width // p
    num_patches = h * w
    assert noise.shape == (n, num_patches), f"noise must be (N, L)=({n}, {num_patches})"

    # ---- encoder input: patch embedding + pos embed (before masking) ----
    x = F.conv2d(imgs, params["patch_embed.proj.weight"], params["patch_embed.proj.bias"], stride=p)
    # (N, D, h, w)
    dim = x.shape[1]
    x = x.flatten(2).transpose(1, 2)  # (N, L, D), row-major patch order
    pos_embed = params["pos_embed"]  # (1, L+1, D)
    x = x + pos_embed[:, 1:, :]

    # ---- random masking driven by noise ----
    len_keep = int(num_patches * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # (N, L): ascending noise, smallest are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, L)
    ids_keep = ids_shuffle[:, :len_keep]  # (N, K)
    x = _gather_tokens(x, ids_keep)  # (N, K, D)
    mask = torch.ones(n, num_patches, dtype=imgs.dtype, device=imgs.device)
    mask[:, :len_keep] = 0  # in shuffled order
    mask = torch.gather(mask, 1, ids_restore)  # (N, L) in patch order, 1 = removed

    # ---- prepend cls ----
    cls = params["cls_token"] + pos_embed[:, :1, :]  # (1, 1, D)
    x = torch.cat([cls.expand(n, -1, -1), x], dim=1)  # (N, 1+K, D)

    # ---- encoder ----
    for i in range(_count_blocks(params, "blocks")):
        x = _block(x, params, f"blocks.{i}", num_heads, ln_eps)
    x = _layer_norm(x, params, "norm", ln_eps)  # (N, 1+K, D)
    assert x.shape[-1] == dim

    # ---- decoder ----
    x = _linear(x, params, "decoder_embed")  # (N, 1+K, Dd)
    dec_dim = x.shape[-1]
    num_masked = num_patches - len_keep
    mask_tokens = params["mask_token"].expand(n, num_masked, dec_dim)  # (N, L-K, Dd)
    tokens = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (N, L, Dd), shuffled order
    tokens = _gather_tokens(tokens, ids_restore)  # (N, L, Dd), patch order
    x = torch.cat([x[:, :1, :], tokens], dim=1)  # (N, 1+L, Dd)
    x = x + params["decoder_pos_embed"]  # (1, 1+L, Dd) broadcast to every token

    for i in range(_count_blocks(params, "decoder_blocks")):
        x = _block(x, params, f"decoder_blocks.{i}", decoder_num_heads, ln_eps)
    x = _layer_norm(x, params, "decoder_norm", ln_eps)
    x = _linear(x, params, "decoder_pred")  # (N, 1+L, p*p*C)
    pred = x[:, 1:, :]  # (N, L, p*p*C)

    # ---- loss ----
    target = spec_patchify(imgs, p)  # (N, L, p*p*C)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)  # (N, L, 1)
        var = target.var(dim=-1, unbiased=True, keepdim=True)  # (N, L, 1)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (N, L)
    loss = (per_patch * mask).sum() / mask.sum()
    return loss, pred, mask
