"""The MAE model: the official ``MaskedAutoencoderViT``, computed through :mod:`fastmae.ops`.

Constructor arguments, factory names, method names, ``state_dict`` keys and initialisation are
those of the official implementation (facebookresearch/mae ``models_mae.py``), so official
checkpoints load with ``strict=True`` and the same seed gives the same initial weights. The
computation differs only in where it is cheaper and equal by the spec (``shared/DESIGN.md``):
the encoder embeds only the kept patches, and every MAE-specific step is an op with fast backends.

Shapes: N batch, C channels, (H, W) image, p patch, (h, w) = (H/p, W/p) grid, L = h*w patches,
K = len_keep kept patches, D / Dd encoder / decoder width, P = p*p*C.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn

from fastmae import ops
from fastmae.patchify import patchify, unpatchify
from fastmae.pos_embed import grid_for, interpolate_pos_embed, sincos_2d


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, tuple | list) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise TypeError(f"img_size must be an int or a pair (H, W) of ints, got {size!r}")


def apply_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None):  # noqa: ANN201
    """``norm(x)`` (``norm(x + residual), x + residual`` with a residual) through ``ops.layer_norm``
    when ``norm`` is a plain affine ``nn.LayerNorm``; any other norm layer is called as a module."""
    if type(norm) is nn.LayerNorm and norm.elementwise_affine and norm.bias is not None:
        return ops.layer_norm(x, norm.weight, norm.bias, norm.eps, residual)
    if residual is None:
        return norm(x)
    total = x + residual
    return norm(total), total


class PatchEmbed(nn.Module):
    """Image to patch tokens with a Conv2d (kernel = stride = p), stored as ``proj``; the attributes
    are timm's (``img_size``, ``patch_size`` as ``(p, p)`` pairs, ``grid_size``, ``num_patches``)."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        if not isinstance(patch_size, int) or patch_size < 1:
            raise TypeError(f"patch_size must be a positive int, got {patch_size!r}")
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {patch_size}")
        self.patch_size = (patch_size, patch_size)
        self.in_chans = in_chans
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, L, D)``: every patch (the MAE encoder uses ``patch_embed_visible``)."""
        return self.proj(imgs).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, L, D)


def check_imgs(imgs: object, patch_embed: PatchEmbed, device: torch.device) -> torch.Tensor:
    """``imgs`` as a model with ``patch_embed`` on ``device`` takes them: a floating-point ``(N, C, H, W)`` tensor
    of the model's channels and img_size, on its device, in its weights' dtype (any under autocast), N >= 1;
    else a ``ValueError``/``TypeError`` naming what was expected and what was given."""
    if not isinstance(imgs, torch.Tensor):
        raise TypeError(f"imgs must be a torch.Tensor (N, C, H, W), got {type(imgs).__name__}")
    c, (hh, ww), p = patch_embed.in_chans, patch_embed.img_size, patch_embed.patch_size[0]
    if imgs.ndim != 4:
        raise ValueError(f"imgs must be (N, C={c}, H={hh}, W={ww}), got shape {tuple(imgs.shape)}")
    if not imgs.is_floating_point():
        raise TypeError(f"imgs must be a floating-point tensor (normalised pixels), got {imgs.dtype}")
    if imgs.shape[1] != c:
        raise ValueError(f"imgs must have C={c} channels, got shape {tuple(imgs.shape)}")
    if imgs.shape[2] % p or imgs.shape[3] % p:
        raise ValueError(f"image height and width must be divisible by the patch size {p}, got "
                         f"{tuple(imgs.shape[2:])}")
    if tuple(imgs.shape[2:]) != (hh, ww):
        raise ValueError(f"this model was built for img_size (H, W) = {(hh, ww)}, got {tuple(imgs.shape[2:])}; "
                         "build it with that img_size (weights for another grid load with interpolation)")
    if imgs.device != device:
        raise ValueError(f"imgs are on {imgs.device} but the model is on {device}")
    weight_dtype = patch_embed.proj.weight.dtype
    if imgs.dtype != weight_dtype and not torch.is_autocast_enabled(imgs.device.type):
        raise TypeError(f"imgs are {imgs.dtype} but the model's weights are {weight_dtype}; convert one, or "
                        "run under torch.autocast")
    if imgs.shape[0] == 0:
        raise ValueError("imgs is an empty batch (N = 0)")
    return imgs


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` Linear (with bias) and an output ``proj``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, S, D)`` -> ``(N, S, D)``."""
        qkv = self.qkv(x)  # (N, S, 3*D), packed (3, H, Dh) in the last dimension
        return self.proj(ops.attention(qkv, self.num_heads))  # (N, S, D)


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` with the exact (erf) GELU; fc1 and the GELU are one ``ops.linear_gelu``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, S, D)`` -> ``(N, S, D)``."""
        hidden = ops.linear_gelu(x, self.fc1.weight, self.fc1.bias)  # (N, S, D) -> (N, S, 4D)
        return self.fc2(hidden)  # (N, S, 4D) -> (N, S, D)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth, timm's ``drop_path``: in training, each sample's ``x (N, ...)`` is zeroed with
    probability ``rate`` and the kept ones are scaled by ``1 / (1 - rate)``; identity in eval or at rate 0.
    The per-sample mask is drawn as timm draws it (``bernoulli_`` on an ``(N, 1, ..., 1)`` tensor)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (N, 1, ..., 1)
    return x * mask.div_(keep)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    ``drop_path`` (fine-tuning; 0 in pretraining) drops each branch's output per sample in training, as timm's
    ``DropPath`` does, before its residual add."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, drop_path: float = 0.0) -> None:
        super().__init__()
        if not isinstance(drop_path, numbers.Real) or not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be a number in [0, 1), got {drop_path!r}")
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = float(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, S, D)`` -> ``(N, S, D)``; the second residual add is fused into norm2."""
        attn_out = self.attn(apply_norm(self.norm1, x))
        if self.drop_path:
            attn_out = drop_path(attn_out, self.drop_path, self.training)
        normed, x = apply_norm(self.norm2, attn_out, residual=x)  # x <- x + attn_out
        mlp_out = self.mlp(normed)
        if self.drop_path:
            mlp_out = drop_path(mlp_out, self.drop_path, self.training)
        return x + mlp_out

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}" if self.drop_path else ""


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a ViT backbone, the official model's interface and numbers."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 norm_pix_loss: bool = False) -> None:
        super().__init__()
        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", torch.zeros(1, num_patches + 1, embed_dim))  # fixed sin-cos
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", torch.zeros(1, num_patches + 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
             for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    # ----------------------------------------------------------------- initialisation and loading
    def initialize_weights(self) -> None:
        """The official initialisation, in the official order (so a seed gives the same weights)."""
        gh, gw = self.patch_embed.grid_size
        self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], gh, gw).unsqueeze(0))
        self.decoder_pos_embed.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], gh, gw).unsqueeze(0))
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN202
        """Interpolate sin-cos tables saved for another patch grid to this model's grid.

        The saved grid is taken to be square or of this model's aspect ratio; a table with the same
        number of tokens as this model's but another grid shape cannot be told apart and loads as is.
        """
        for name in ("pos_embed", "decoder_pos_embed"):
            key = prefix + name
            saved, own = state_dict.get(key), getattr(self, name)
            if saved is not None and saved.ndim == 3 and saved.shape[1] != own.shape[1]:
                old_grid = grid_for(saved.shape[1] - 1, aspect=self.patch_embed.grid_size)
                state_dict[key] = interpolate_pos_embed(saved, self.patch_embed.grid_size, old_grid)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------ input checks
    def _check_imgs(self, imgs: object) -> torch.Tensor:
        return check_imgs(imgs, self.patch_embed, self.cls_token.device)

    @staticmethod
    def _len_keep(mask_ratio: float, num_patches: int) -> int:
        """``int(L * (1 - mask_ratio))`` as the official code; 0 (mask_ratio 1, or close to it) is allowed there
        too: the encoder then sees the cls token alone."""
        if not isinstance(mask_ratio, numbers.Real) or not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be a number in [0, 1], got {mask_ratio!r}")
        return int(num_patches * (1 - mask_ratio))

    @staticmethod
    def _noise(noise: torch.Tensor | None, n: int, num_patches: int, device: torch.device) -> torch.Tensor:
        if noise is None:
            return torch.rand(n, num_patches, device=device)  # (N, L)
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor (N, L), got {getattr(noise, 'dtype', type(noise))}")
        if tuple(noise.shape) != (n, num_patches):
            raise ValueError(f"noise must have shape (N, L) = {(n, num_patches)}, got {tuple(noise.shape)}")
        if noise.device != device:
            raise ValueError(f"noise is on {noise.device} but the tokens are on {device}")
        return noise

    # ------------------------------------------------------------------------ official methods
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``imgs (N, C, H, W)`` -> ``(N, L, p*p*C)``, element order ``nhwpqc``."""
        return patchify(imgs, self.patch_embed.patch_size[0])

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, p*p*C)`` -> ``imgs (N, C, H, W)``."""
        return unpatchify(x, self.patch_embed.patch_size[0], self.patch_embed.grid_size, self.patch_embed.in_chans)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):  # noqa: ANN201
        """Official signature: ``x (N, L, D)`` -> ``(x_masked (N, K, D), mask (N, L), ids_restore (N, L))``."""
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise ValueError(f"x must be a (N, L, D) tensor of tokens, got {getattr(x, 'shape', type(x))}")
        n, num_patches, d = x.shape
        len_keep = self._len_keep(mask_ratio, num_patches)
        noise = self._noise(noise, n, num_patches, x.device)  # (N, L)
        ids_keep, ids_restore, mask = ops.random_masking(noise, len_keep)
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (N, K, D)
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):  # noqa: ANN201
        """``imgs (N, C, H, W)`` -> ``(latent (N, 1+K, D), mask (N, L), ids_restore (N, L))``."""
        imgs = self._check_imgs(imgs)
        num_patches = self.patch_embed.num_patches
        len_keep = self._len_keep(mask_ratio, num_patches)
        noise = self._noise(noise, imgs.shape[0], num_patches, imgs.device)
        ids_keep, ids_restore, mask = ops.random_masking(noise, len_keep)
        proj = self.patch_embed.proj
        x = ops.patch_embed_visible(imgs, ids_keep, proj.weight, proj.bias, self.pos_embed)  # (N, K, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (N, 1, D)
        x = torch.cat([cls, x], dim=1)  # (N, 1+K, D)
        for blk in self.blocks:
            x = blk(x)
        return apply_norm(self.norm, x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``latent (N, 1+K, D)`` -> ``pred (N, L, p*p*C)``."""
        x = self.decoder_embed(x)  # (N, 1+K, Dd)
        x = ops.unshuffle(x, ids_restore, self.mask_token, self.decoder_pos_embed)  # (N, L+1, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(apply_norm(self.decoder_norm, x))  # (N, L+1, P)
        return x[:, 1:, :]  # (N, L, P): cls dropped

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over removed patches of the per-patch MSE (target normalised per patch with norm_pix_loss)."""
        return ops.masked_mse(pred, imgs, mask, self.patch_embed.patch_size[0], self.norm_pix_loss)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):  # noqa: ANN201
        """``imgs (N, C, H, W)`` -> ``(loss, pred (N, L, p*p*C), mask (N, L))``.

        ``noise (N, L)`` fixes the masking (the ``len_keep`` smallest are kept); uniform if omitted.
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # (N, L, P)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


MAE = MaskedAutoencoderViT

_LN_EPS6 = partial(nn.LayerNorm, eps=1e-6)


def _decoder(kwargs: dict, embed_dim: int, depth: int, num_heads: int) -> dict:
    """A preset's keyword arguments: its decoder (``decoder_embed_dim``, ``decoder_depth``, ``decoder_num_heads``)
    unless ``kwargs`` gives its own (the paper's decoder ablations, Table 1a/b, on a preset's encoder), and the
    rest of ``kwargs``."""
    return {"decoder_embed_dim": embed_dim, "decoder_depth": depth, "decoder_num_heads": num_heads, **kwargs}


def mae_vit_tiny_patch16_dec128d2b(**kwargs) -> MaskedAutoencoderViT:  # noqa: ANN003
    """ViT-Ti/16 encoder (192 wide, 12 blocks, 3 heads), 128-wide 2-block decoder: tests and CPU demos."""
    return MaskedAutoencoderViT(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4,
                                norm_layer=_LN_EPS6, **_decoder(kwargs, 128, 2, 4))


def mae_vit_small_patch16_dec256d4b(**kwargs) -> MaskedAutoencoderViT:  # noqa: ANN003
    """ViT-S/16 encoder (384 wide, 12 blocks, 6 heads), 256-wide 4-block decoder."""
    return MaskedAutoencoderViT(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
                                norm_layer=_LN_EPS6, **_decoder(kwargs, 256, 4, 8))


def mae_vit_base_patch16_dec512d8b(**kwargs) -> MaskedAutoencoderViT:  # noqa: ANN003
    """The paper's ViT-B/16 MAE: 768 wide, 12 blocks, 12 heads; 512-wide 8-block decoder."""
    return MaskedAutoencoderViT(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
                                norm_layer=_LN_EPS6, **_decoder(kwargs, 512, 8, 16))


def mae_vit_large_patch16_dec512d8b(**kwargs) -> MaskedAutoencoderViT:  # noqa: ANN003
    """The paper's ViT-L/16 MAE: 1024 wide, 24 blocks, 16 heads; 512-wide 8-block decoder."""
    return MaskedAutoencoderViT(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4,
                                norm_layer=_LN_EPS6, **_decoder(kwargs, 512, 8, 16))


def mae_vit_huge_patch14_dec512d8b(**kwargs) -> MaskedAutoencoderViT:  # noqa: ANN003
    """The paper's ViT-H/14 MAE: 1280 wide, 32 blocks, 16 heads; 512-wide 8-block decoder."""
    return MaskedAutoencoderViT(patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4,
                                norm_layer=_LN_EPS6, **_decoder(kwargs, 512, 8, 16))


def mae_vit_demo_patch8_dec128d2b(**kwargs) -> MaskedAutoencoderViT:  # noqa: ANN003
    """Demo-only (not an official preset): 8 px patches, a 128-wide 4-block encoder (4 heads), a 128-wide 2-block
    decoder: the CPU demo's model, chosen by measurement (docs/demo-recipe.md)."""
    return MaskedAutoencoderViT(patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4,
                                norm_layer=_LN_EPS6, **_decoder(kwargs, 128, 2, 4))


# the official short names
mae_vit_tiny_patch16 = mae_vit_tiny_patch16_dec128d2b
mae_vit_small_patch16 = mae_vit_small_patch16_dec256d4b
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b

PRESETS: dict[str, Callable[..., MaskedAutoencoderViT]] = {
    f.__name__: f
    for f in (mae_vit_tiny_patch16_dec128d2b, mae_vit_small_patch16_dec256d4b, mae_vit_base_patch16_dec512d8b,
              mae_vit_large_patch16_dec512d8b, mae_vit_huge_patch14_dec512d8b)
}
PRESETS.update({"mae_vit_tiny_patch16": mae_vit_tiny_patch16, "mae_vit_small_patch16": mae_vit_small_patch16,
                "mae_vit_base_patch16": mae_vit_base_patch16, "mae_vit_large_patch16": mae_vit_large_patch16,
                "mae_vit_huge_patch14": mae_vit_huge_patch14})
