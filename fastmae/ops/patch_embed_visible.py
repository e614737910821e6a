"""patch_embed_visible: embed only the kept patches, read straight from the image, plus their pos rows."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastmae.ops._cases import masking, randn
from fastmae.ops._checks import check_same_device, check_tensor
from fastmae.ops._kernels import FLOAT_DTYPES, autocast_enabled, kernel, triton_available, triton_devices
from fastmae.ops.dispatch import Backend, Case, Op


def patch_embed_visible_reference(
    imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """The spec. ``imgs (N, C, H, W)``, ``ids_keep (N, K)``, ``weight (D, C, p, p)`` (the Conv2d's),
    ``bias (D,)``, ``pos_embed (1, L+1, D)`` -> ``(N, K, D)``.

    Equal to the official ``conv(imgs) + pos_embed[:, 1:]`` followed by the gather of the kept
    tokens, computed only for the kept patches.
    """
    n, c, hh, ww = imgs.shape
    d, p = weight.shape[0], weight.shape[-1]
    h, w = hh // p, ww // p
    patches = imgs.reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5)  # (N, h, w, C, p, q)
    patches = patches.reshape(n, h * w, c * p * p)  # (N, L, C*p*p), the conv weight's (c, p, q) order
    kept = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, c * p * p))  # (N, K, C*p*p)
    tokens = F.linear(kept, weight.reshape(d, c * p * p), bias)  # (N, K, D)
    return tokens + pos_embed[0, 1:][ids_keep]  # (N, K, D) + (N, K, D)


# ---- the kernels' op: one schema, fake and autograd (the triton backend's kernels) ----

@torch.library.custom_op("fastmae::patch_embed_visible", mutates_args=())
def patch_embed_visible_op(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           pos_embed: torch.Tensor, backend: str) -> torch.Tensor:
    """``imgs (N, C, H, W)``, ``ids_keep (N, K)``, ``weight (D, C, p, p)``, ``bias (D,)``, ``pos_embed (1, L+1, D)``
    -> ``(N, K, D)`` in the promotion of imgs's and pos_embed's dtypes; imgs, weight and bias share one dtype."""
    return kernel(backend, "patch_embed_visible", "patch_embed_visible")(imgs, ids_keep, weight, bias, pos_embed)


@patch_embed_visible_op.register_fake
def _(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor,
      backend: str) -> torch.Tensor:
    shape = (imgs.shape[0], ids_keep.shape[1], weight.shape[0])  # (N, K, D)
    return imgs.new_empty(shape, dtype=torch.promote_types(imgs.dtype, pos_embed.dtype))


@torch.library.custom_op("fastmae::patch_embed_visible_backward", mutates_args=())
def patch_embed_visible_backward_op(grad_out: torch.Tensor, imgs: torch.Tensor, ids_keep: torch.Tensor,
                                    weight: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_out (N, K, D)`` (any strides) -> ``grad_weight (D, C, p, p)``, ``grad_bias (D,)`` in weight's dtype."""
    return kernel(backend, "patch_embed_visible", "patch_embed_visible_backward")(grad_out, imgs, ids_keep, weight)


@patch_embed_visible_backward_op.register_fake
def _(grad_out: torch.Tensor, imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(weight), weight.new_empty(weight.shape[:1])


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    imgs, ids_keep, weight, _, _, backend = inputs
    ctx.save_for_backward(imgs, ids_keep, weight)
    ctx.backend = backend


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
    """Gradients for weight and bias; imgs and pos_embed are refused when they require grad (``no_grad``)."""
    imgs, ids_keep, weight = ctx.saved_tensors
    grad_weight, grad_bias = patch_embed_visible_backward_op(grad_out, imgs, ids_keep, weight, ctx.backend)
    return None, None, grad_weight, grad_bias, None, None


patch_embed_visible_op.register_autograd(_backward, setup_context=_setup_context)


def _patch_embed_visible_kernels(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 pos_embed: torch.Tensor, *, backend: str) -> torch.Tensor:
    """As the reference on ``backend``'s kernels; under autocast imgs, weight and bias are cast to the autocast
    dtype first, as autocast casts F.linear's inputs (pos_embed is not one of them)."""
    if autocast_enabled(imgs.device.type):
        dtype = torch.get_autocast_dtype(imgs.device.type)
        imgs, weight, bias = imgs.to(dtype), weight.to(dtype), bias.to(dtype)
    return patch_embed_visible_op(imgs, ids_keep, weight, bias, pos_embed, backend)


def _same_dtype_outside_autocast(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor, pos_embed: torch.Tensor) -> str | None:
    if not autocast_enabled(imgs.device.type) and not imgs.dtype == weight.dtype == bias.dtype:
        return (f"imgs, weight and bias must share a dtype outside autocast (as for F.linear), got "
                f"{imgs.dtype}, {weight.dtype}, {bias.dtype}")
    return None


def _case(p: int, hh: int, ww: int, width: int, keep_fraction: float = 0.25) -> Callable[..., tuple]:
    """``(imgs (N, 3, H, W), ids_keep (N, K), weight (D, 3, p, p), bias (D,), pos_embed (1, L+1, D))``; the pos
    table fp32, as the model's buffer."""

    def make(device: torch.device, dtype: torch.dtype, batch: int) -> tuple:
        num_patches = (hh // p) * (ww // p)
        ids_keep, _, _ = masking(batch, num_patches, int(num_patches * keep_fraction), seed=2, device=device)
        return (randn(batch, 3, hh, ww, seed=1, device=device, dtype=dtype), ids_keep,
                randn(width, 3, p, p, seed=3, device=device, dtype=dtype) / (3 * p * p) ** 0.5,
                randn(width, seed=4, device=device, dtype=dtype),
                randn(1, num_patches + 1, width, seed=5, device=device))

    return make


def _min_bytes(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               pos_embed: torch.Tensor) -> int:
    """The kept patches' pixels, the weight, the ids and the kept rows of the pos table in, the tokens out."""
    n, k = ids_keep.shape
    d, patch_len = weight.shape[0], weight[0].numel()
    return (n * k * patch_len * imgs.element_size() + weight.numel() * weight.element_size() + n * k * 8
            + n * k * d * (pos_embed.element_size() + torch.promote_types(imgs.dtype, pos_embed.dtype).itemsize))


PATCH_EMBED_VISIBLE_CASES = (Case("p16-64x64-D48", _case(16, 64, 64, 48), batch=3, grad=("weight", "bias")),
                            Case("p14-56x84-D40", _case(14, 56, 84, 40), batch=2, grad=("weight", "bias")),
                            Case("p16-D128-all-kept", _case(16, 32, 32, 128, keep_fraction=1.0), batch=1,
                                 grad=("weight", "bias")))

PATCH_EMBED_VISIBLE = Op(
    "patch_embed_visible",
    [
        Backend("triton", functools.partial(_patch_embed_visible_kernels, backend="triton"),
                available=triton_available("patch_embed_visible"), supports=_same_dtype_outside_autocast,
                devices=triton_devices(), dtypes=FLOAT_DTYPES, no_grad=("imgs", "pos_embed"), auto_devices=("cuda",)),
        Backend("reference", patch_embed_visible_reference),
    ],
    cases=PATCH_EMBED_VISIBLE_CASES, benchmark=Case("vit-b", _case(16, 224, 224, 768)), min_bytes=_min_bytes,
    kernel_op=patch_embed_visible_op,
)


def patch_embed_visible(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_embed: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``(N, C, H, W)`` images and ``ids_keep (N, K)`` -> kept patch tokens ``(N, K, D)`` with pos added."""
    check_tensor("imgs", imgs, ndim=4, floating=True)
    check_tensor("weight", weight, ndim=4, floating=True)
    d, c, p, q = weight.shape
    n, _, hh, ww = imgs.shape
    if p != q or imgs.shape[1] != c or hh % p or ww % p:
        raise ValueError(
            f"imgs (N, C={c}, H, W) with H and W multiples of the patch size {p} expected for a weight of "
            f"shape {tuple(weight.shape)}, got imgs {tuple(imgs.shape)}"
        )
    num_patches = (hh // p) * (ww // p)
    check_tensor("ids_keep", ids_keep, ndim=2, integer=True, shape=(n, None))
    check_tensor("bias", bias, shape=(d,))
    check_tensor("pos_embed", pos_embed, ndim=3, shape=(1, num_patches + 1, d))
    check_same_device(imgs=imgs, ids_keep=ids_keep, weight=weight, pos_embed=pos_embed)
    return PATCH_EMBED_VISIBLE(imgs, ids_keep, weight, bias, pos_embed, backend=backend)
