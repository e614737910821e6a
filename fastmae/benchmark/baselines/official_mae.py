"""The official MAE (facebookresearch/mae ``models_mae.py`` with timm's ``Block``) as plain PyTorch.

This is the benchmark's independent baseline: it computes MAE the way the official code does and
uses nothing from the rest of ``fastmae`` (it imports only torch). Every patch is embedded with a
Conv2d, the sin-cos table is added, then a random subset is kept with ``argsort`` + ``gather``; the
decoder appends mask tokens and undoes the shuffle with a second ``gather``; the loss normalises each
target patch by its own mean and unbiased variance and averages the per-patch MSE over the removed
patches. Attention is the explicit ``softmax(q @ k^T * scale) @ v`` of timm's ``Attention``
(``attn_impl="explicit"``), or ``F.scaled_dot_product_attention`` (``attn_impl="sdpa"``) for the
modernised baseline.

``state_dict`` keys and shapes are the official ones, which are also fastmae's, so either model's
weights load into the other with ``strict=True``. As in the official code, the sin-cos tables are
frozen parameters (``requires_grad=False``), not buffers; that changes no key.

Shapes: N batch, C channels, (H, W) image, p patch, (h, w) = (H/p, W/p) grid, L = h*w patches,
K = len_keep kept patches, D / Dd encoder / decoder width, S tokens, Dh head dim, P = p*p*C.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTN_IMPLS = ("explicit", "sdpa")


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """``(1 + grid_h*grid_w, dim)`` float32 table, cls row zeros, computed in float64.

    Channels ``[0, dim/2)`` encode the column index, ``[dim/2, dim)`` the row index; each half is
    ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_k = 1 / 10000**(k / (dim/4))``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos embedding width must be a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")  # (gh, gw) each

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (L,) -> (L, dim/2)
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)  # (L, dim/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)  # (L, dim)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0).float()  # (1+L, dim)


class PatchEmbed(nn.Module):
    """timm's ``PatchEmbed``: a Conv2d with kernel = stride = p over the whole image."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, L, D)``."""
        return self.proj(imgs).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, D, L) -> (N, L, D)


class Attention(nn.Module):
    """timm's ``Attention``: fused ``qkv`` Linear, explicit or SDPA attention, output ``proj``."""

    def __init__(self, dim: int, num_heads: int, attn_impl: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, S, D)`` -> ``(N, S, D)``."""
        n, s, d = x.shape
        qkv = self.qkv(x).reshape(n, s, 3, self.num_heads, d // self.num_heads)  # (N, S, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, S, Dh)
        if self.attn_impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)  # (N, H, S, Dh)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale  # (N, H, S, S)
            out = attn.softmax(dim=-1) @ v  # (N, H, S, Dh)
        return self.proj(out.transpose(1, 2).reshape(n, s, d))  # (N, S, H, Dh) -> (N, S, D)


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``, exact (erf) GELU."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (N, S, D) -> (N, S, hidden) -> (N, S, D)


class Block(nn.Module):
    """timm's pre-LN ``Block``: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_layer: Callable[[int], nn.Module],
                 attn_impl: str) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, attn_impl)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoderViT(nn.Module):
    """The official MAE: the constructor arguments of ``models_mae.py`` plus ``attn_impl``."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, norm_pix_loss: bool = False,
                 attn_impl: str = "explicit") -> None:
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        for width, heads in ((embed_dim, num_heads), (decoder_embed_dim, decoder_num_heads)):
            if width % heads:
                raise ValueError(f"width {width} must be divisible by its number of heads {heads}")
        block = partial(Block, mlp_ratio=mlp_ratio, norm_layer=norm_layer, attn_impl=attn_impl)
        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([block(decoder_embed_dim, decoder_num_heads)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation, in the official order."""
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], grid, grid).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, grid).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # as a Linear on the flattened patch
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, L, p*p*C)``, element order ``nhwpqc`` (channel fastest)."""
        p, h, c = self.patch_embed.patch_size, self.patch_embed.grid_size, self.patch_embed.in_chans
        x = imgs.reshape(imgs.shape[0], c, h, p, h, p)  # (N, C, h, p, w, q)
        x = torch.einsum("nchpwq->nhwpqc", x)  # (N, h, w, p, q, C)
        return x.reshape(imgs.shape[0], h * h, p * p * c)  # (N, L, P)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the ``len_keep`` tokens with the smallest noise.

        ``x (N, L, D)`` -> ``x_masked (N, K, D)``, ``mask (N, L)`` (1 = removed, patch order),
        ``ids_restore (N, L)``.
        """
        n, num_patches, d = x.shape
        len_keep = int(num_patches * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, num_patches, device=x.device)  # (N, L)
        elif tuple(noise.shape) != (n, num_patches):
            raise ValueError(f"noise must have shape (N, L) = {(n, num_patches)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)  # (N, L): ascending, the first len_keep are kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, L)
        ids_keep = ids_shuffle[:, :len_keep]  # (N, K)
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))  # (N, K, D)
        mask = torch.ones(n, num_patches, device=x.device)
        mask[:, :len_keep] = 0  # shuffled order
        mask = torch.gather(mask, 1, ids_restore)  # (N, L) patch order
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, C, H, W)`` -> ``latent (N, 1+K, D)``, ``mask (N, L)``, ``ids_restore (N, L)``."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # (N, L, D)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # (N, K, D)
        cls_tokens = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)  # (N, 1, D)
        x = torch.cat((cls_tokens, x), dim=1)  # (N, 1+K, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``latent (N, 1+K, D)`` -> ``pred (N, L, P)``."""
        x = self.decoder_embed(x)  # (N, 1+K, Dd)
        n, num_patches, dd = x.shape[0], ids_restore.shape[1], x.shape[2]
        mask_tokens = self.mask_token.repeat(n, num_patches + 1 - x.shape[1], 1)  # (N, L-K, Dd)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (N, L, Dd) shuffled order, no cls
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, dd))  # (N, L, Dd) patch order
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed  # (N, 1+L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (N, 1+L, P)
        return x[:, 1:, :]  # (N, L, P): cls dropped

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over removed patches of the per-patch MSE; with ``norm_pix_loss`` the target patch is
        normalised by its own mean and unbiased variance."""
        target = self.patchify(imgs)  # (N, L, P)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)  # (N, L, 1)
            var = target.var(dim=-1, keepdim=True)  # (N, L, 1), unbiased
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # (N, L)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``imgs (N, C, H, W)`` -> ``loss``, ``pred (N, L, P)``, ``mask (N, L)``; ``noise (N, L)`` fixes the mask."""
        pe = self.patch_embed
        if imgs.ndim != 4 or tuple(imgs.shape[1:]) != (pe.in_chans, pe.img_size, pe.img_size):
            raise ValueError(f"imgs must be (N, {pe.in_chans}, {pe.img_size}, {pe.img_size}), "
                             f"got {tuple(imgs.shape)}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # (N, L, P)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


_LN_EPS6 = partial(nn.LayerNorm, eps=1e-6)

# The factory presets (fastmae's names; the short names are the official ones).
PRESETS: dict[str, dict[str, Any]] = {
    "mae_vit_tiny_patch16_dec128d2b": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                                           decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "mae_vit_small_patch16_dec256d4b": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                                            decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "mae_vit_base_patch16_dec512d8b": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                           decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "mae_vit_large_patch16_dec512d8b": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                            decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "mae_vit_huge_patch14_dec512d8b": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                                           decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}
PRESETS.update({long_name.rsplit("_dec", 1)[0]: cfg for long_name, cfg in list(PRESETS.items())})


def preset_config(name: str) -> dict[str, Any]:
    """The architecture of preset ``name`` (widths, depths, heads, patch size; ``mlp_ratio`` 4)."""
    if name not in PRESETS:
        raise ValueError(f"unknown MAE preset {name!r}; expected one of {sorted(PRESETS)}")
    return dict(PRESETS[name], mlp_ratio=4.0)


def mae_from_preset(name: str, **kwargs: Any) -> MaskedAutoencoderViT:
    """The official factory ``name`` (LayerNorm eps 1e-6); ``kwargs`` go to the constructor,
    e.g. ``img_size``, ``norm_pix_loss``, ``attn_impl``."""
    return MaskedAutoencoderViT(**preset_config(name), norm_layer=_LN_EPS6, **kwargs)
