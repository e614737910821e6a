"""An independent implementation of the official MAE fine-tuning ViT (facebookresearch/mae ``models_vit.py`` on
timm's ``VisionTransformer``), written from the formulas, importing nothing from fastmae: the reference the
tests hold ``fastmae.vit.VisionTransformer`` to.

Plain torch, explicit math: softmax attention with scale ``Dh**-0.5``, ``F.layer_norm``, the exact (erf) GELU,
pre-LN blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``; pooling as the official ``forward_features``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ln(x: torch.Tensor, params: dict[str, torch.Tensor], name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), params[f"{name}.weight"], params[f"{name}.bias"], eps)


def _linear(x: torch.Tensor, params: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return x @ params[f"{name}.weight"].t() + params[f"{name}.bias"]


def _attention(x: torch.Tensor, params: dict[str, torch.Tensor], name: str, num_heads: int) -> torch.Tensor:
    """``x (N, S, D)`` -> ``(N, S, D)``: q, k, v from one Linear, laid out ``(3, heads, head_dim)``."""
    n, s, d = x.shape
    head_dim = d // num_heads
    qkv = _linear(x, params, f"{name}.qkv").reshape(n, s, 3, num_heads, head_dim)
    q, k, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)  # (N, H, S, Dh)
    weights = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1)  # (N, H, S, S)
    out = (weights @ v).transpose(1, 2).reshape(n, s, d)  # (N, H, S, Dh) -> (N, S, D)
    return _linear(out, params, f"{name}.proj")


def spec_vit_tokens(params: dict[str, torch.Tensor], imgs: torch.Tensor, patch_size: int, num_heads: int,
                    ln_eps: float = 1e-6) -> torch.Tensor:
    """``imgs (N, C, H, W)`` -> the tokens after the blocks ``(N, 1+L, D)`` (no final norm)."""
    n = imgs.shape[0]
    patches = F.conv2d(imgs, params["patch_embed.proj.weight"], params["patch_embed.proj.bias"], stride=patch_size)
    x = patches.flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, L, D)
    x = torch.cat([params["cls_token"].expand(n, -1, -1), x], dim=1) + params["pos_embed"]  # (N, 1+L, D)
    depth = len({k.split(".")[1] for k in params if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}"
        x = x + _attention(_ln(x, params, f"{b}.norm1", ln_eps), params, f"{b}.attn", num_heads)
        hidden = _linear(_ln(x, params, f"{b}.norm2", ln_eps), params, f"{b}.mlp.fc1")
        x = x + _linear(0.5 * hidden * (1 + torch.erf(hidden / 2**0.5)), params, f"{b}.mlp.fc2")
    return x


def spec_vit_forward(params: dict[str, torch.Tensor], imgs: torch.Tensor, patch_size: int, num_heads: int,
                     global_pool: bool, ln_eps: float = 1e-6) -> torch.Tensor:
    """``imgs (N, C, H, W)`` -> logits ``(N, K)``: ``head(fc_norm(mean of patch tokens))`` with global pooling,
    else ``head(norm(tokens)[:, 0])``."""
    x = spec_vit_tokens(params, imgs, patch_size, num_heads, ln_eps)
    if global_pool:
        features = _ln(x[:, 1:].mean(dim=1), params, "fc_norm", ln_eps)  # (N, D)
    else:
        features = _ln(x, params, "norm", ln_eps)[:, 0]  # (N, D)
    return _linear(features, params, "head")


def official_interpolate_pos_embed(saved: torch.Tensor, num_patches: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """The official ``util/pos_embed.py`` rule: square grids, extra tokens kept, patch rows resized bicubically
    (``align_corners=False``) from ``sqrt(L0)``^2 to ``sqrt(num_patches)``^2."""
    dim = saved.shape[-1]
    orig = int((saved.shape[-2] - num_extra_tokens) ** 0.5)
    new = int(num_patches**0.5)
    if orig == new:
        return saved
    grid = saved[:, num_extra_tokens:].reshape(-1, orig, orig, dim).permute(0, 3, 1, 2)  # (1, D, orig, orig)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)  # (1, D, new, new)
    return torch.cat([saved[:, :num_extra_tokens], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
