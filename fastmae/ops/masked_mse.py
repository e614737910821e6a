"""masked_mse: the MAE loss -- mean over removed patches of the per-patch MSE, optional per-patch norm."""

from __future__ import annotations

import torch

from fastmae.extension import extension_backend_available
from fastmae.kernels._common import kernel_module_available, triton_why_not
from fastmae.ops._checks import check_same_device, check_tensor
from fastmae.ops.dispatch import Backend, Op
from fastmae.patchify import patchify


def masked_mse_reference(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, eps: float = 1e-6
) -> torch.Tensor:
    """The spec. ``pred (N, L, P)``, ``imgs (N, C, H, W)``, ``mask (N, L)`` (1 = removed) -> scalar.

    With ``norm_pix`` the target patch is ``(t - mean) / sqrt(var + eps)`` with the *unbiased*
    variance over the patch's ``P`` values. As in the official code the result is
    ``sum(per_patch_mse * mask) / sum(mask)``: NaN when no patch is removed.
    """
    target = patchify(imgs, patch_size)  # (N, L, P)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)  # (N, L, 1)
        var = target.var(dim=-1, keepdim=True)  # (N, L, 1), unbiased
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (N, L)
    return (per_patch * mask).sum() / mask.sum()


def _triton(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, eps: float = 1e-6
) -> torch.Tensor:
    from fastmae.kernels.masked_mse import masked_mse_triton

    return masked_mse_triton(pred, imgs, mask, patch_size, norm_pix, eps)


def _triton_supports(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, eps: float = 1e-6
) -> str | None:
    from fastmae.kernels.masked_mse import MAX_BLOCK_P

    reason = triton_why_not(pred, imgs, mask)
    if reason is not None:
        return reason
    if not mask.is_floating_point():
        return f"the Triton masked_mse takes a floating-point mask, got {mask.dtype}"
    if torch.is_grad_enabled() and (imgs.requires_grad or mask.requires_grad):
        return "the Triton masked_mse gives no gradient for imgs or mask (requires_grad is set on one)"
    if pred.shape[-1] > MAX_BLOCK_P:
        return f"the Triton masked_mse holds a patch in registers: P = {pred.shape[-1]} > {MAX_BLOCK_P}"
    return None


# ---- cuda: the fastmae._C extension (csrc/masked_mse.cu; csrc/masked_mse_cpu.cpp on CPU tensors) ----

_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CUDA_MAX_P = 4096  # csrc/masked_mse.cu holds a patch in registers: 8 warps x 16 values per thread
_INT32_SPAN = 2**31  # offsets within a patch of imgs are 32-bit


def _ext_loss_dtype(pred: torch.dtype, imgs: torch.dtype, mask: torch.dtype) -> torch.dtype:
    """The promotion of three dtypes among fp32/bf16/fp16: their common dtype, else fp32 (plain Python:
    no ``torch.promote_types`` node in a traced graph)."""
    dtypes = {pred, imgs, mask}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _fake_check_devices(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise RuntimeError(f"{op}: all tensors must be on one device, got {devices}")


def _fake_masked_mse(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``pred (N, L, P)``, ``imgs (N, C, H, W)``, ``mask (N, L)`` -> (loss (), promoted dtype; sum(mask) (), fp32)."""
    _fake_check_devices("fastmae::masked_mse", pred=pred, imgs=imgs, mask=mask)
    loss = pred.new_empty((), dtype=_ext_loss_dtype(pred.dtype, imgs.dtype, mask.dtype))
    return loss, pred.new_empty((), dtype=torch.float32)


def _fake_masked_mse_backward(grad_loss: torch.Tensor, mask_sum: torch.Tensor, pred: torch.Tensor,
                              imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool,
                              eps: float) -> torch.Tensor:
    """-> ``grad_pred (N, L, P)`` contiguous, pred's dtype."""
    _fake_check_devices("fastmae::masked_mse_backward", grad_loss=grad_loss, mask_sum=mask_sum, pred=pred, imgs=imgs,
                        mask=mask)
    return pred.new_empty(pred.shape)


def _cuda_setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple,
                        output: tuple[torch.Tensor, torch.Tensor]) -> None:
    pred, imgs, mask, patch_size, norm_pix, eps = inputs
    ctx.save_for_backward(pred, imgs, mask, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.patch_size, ctx.norm_pix, ctx.eps = patch_size, norm_pix, eps


def _cuda_backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor, _grad_mask_sum: None) -> tuple:
    """Gradient wrt ``pred`` only (recomputed from pred and imgs); ``mask_sum`` is not differentiable."""
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError("fastmae::masked_mse gives no gradient for imgs or mask; they must not require grad")
    if grad_loss is None:  # grads are not materialised: nothing flowed into the loss
        return None, None, None, None, None, None
    pred, imgs, mask, mask_sum = ctx.saved_tensors
    grad = torch.ops.fastmae.masked_mse_backward(grad_loss, mask_sum, pred, imgs, mask, ctx.patch_size, ctx.norm_pix,
                                                 ctx.eps)
    return grad, None, None, None, None, None


def _register_cuda() -> None:
    """Fake implementations of both schemas and the autograd of fastmae::masked_mse."""
    torch.library.register_fake("fastmae::masked_mse", _fake_masked_mse)
    torch.library.register_fake("fastmae::masked_mse_backward", _fake_masked_mse_backward)
    torch.library.register_autograd("fastmae::masked_mse", _cuda_backward, setup_context=_cuda_setup_context)


def _cuda_supports(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, eps: float = 1e-6
) -> str | None:
    """cpu (the C++ implementation), cuda or meta tensors on one device; fp32/bf16/fp16; no gradient asked
    for imgs or mask; on cuda (and meta) the kernels' limits: P <= 4096, a patch of imgs within 2^31 elements."""
    devices = {t.device for t in (pred, imgs, mask)}
    if len(devices) > 1:
        return f"the cuda masked_mse takes tensors on one device, got {sorted(str(d) for d in devices)}"
    device = pred.device.type
    if device not in ("cpu", "cuda", "meta"):
        return f"the cuda masked_mse runs on cpu, cuda and meta tensors, got {device}"
    for name, t in (("pred", pred), ("imgs", imgs), ("mask", mask)):
        if t.dtype not in _CUDA_DTYPES:
            return f"the cuda masked_mse takes float32/bfloat16/float16 tensors, got {name} {t.dtype}"
    if torch.is_grad_enabled() and (imgs.requires_grad or mask.requires_grad):
        return "the cuda masked_mse gives no gradient for imgs or mask (requires_grad is set on one)"
    if device != "cpu":  # the CUDA kernels' limits (the CPU implementation has none)
        p_len = pred.shape[-1]
        if p_len > _CUDA_MAX_P:
            return f"the CUDA masked_mse holds a patch in registers: P = {p_len} > {_CUDA_MAX_P}"
        img_span = (imgs.shape[1] - 1) * imgs.stride(1) + (patch_size - 1) * (imgs.stride(2) + imgs.stride(3))
        if img_span >= _INT32_SPAN:
            return f"the CUDA masked_mse indexes within a patch in 32 bits: a patch spans {img_span} >= 2^31 elements"
    return None


def _cuda(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, eps: float = 1e-6
) -> torch.Tensor:
    """As the reference; the loss dtype is the promotion of the three dtypes, and fp32 under CUDA autocast
    (where the reference's ``pow`` runs in fp32): an fp32 mask ``(N, L)`` makes the op's promotion fp32."""
    if pred.device.type == "cuda" and torch.is_autocast_enabled("cuda") and mask.dtype != torch.float32:
        mask = mask.float()
    loss, _ = torch.ops.fastmae.masked_mse(pred, imgs, mask, patch_size, norm_pix, eps)
    return loss


MASKED_MSE = Op(
    "masked_mse",
    [  # priority: the cuda kernel measured faster than the triton one on an H200 (bench/results/)
        Backend("cuda", _cuda, available=extension_backend_available(_register_cuda), supports=_cuda_supports,
                auto_devices=("cuda",)),
        Backend("triton", _triton, available=kernel_module_available("masked_mse"), supports=_triton_supports,
                auto_devices=("cuda",)),
        Backend("reference", masked_mse_reference),
    ],
)


def masked_mse(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Scalar MAE loss over the removed patches; see the reference."""
    check_tensor("imgs", imgs, ndim=4, floating=True)
    n, c, hh, ww = imgs.shape
    if not isinstance(patch_size, int) or patch_size < 1 or hh % patch_size or ww % patch_size:
        raise ValueError(f"patch_size must be a positive int dividing H={hh} and W={ww}, got {patch_size!r}")
    num_patches = (hh // patch_size) * (ww // patch_size)
    check_tensor("pred", pred, ndim=3, floating=True, shape=(n, num_patches, patch_size * patch_size * c))
    check_tensor("mask", mask, ndim=2, shape=(n, num_patches))
    check_same_device(pred=pred, imgs=imgs, mask=mask)
    return MASKED_MSE(pred, imgs, mask, patch_size, bool(norm_pix), float(eps), backend=backend)
