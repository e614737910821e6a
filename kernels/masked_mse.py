"""masked_mse in Triton: the MAE loss read straight from ``pred`` and ``imgs``, only removed patches.

Fused: the target patch gather from ``imgs (N, C, H, W)`` (no patchified copy), the per-patch
mean / unbiased variance normalisation (``norm_pix``), the squared error, the mean over ``P``, the
mask weighting and the sum over patches -- one pass over the removed patches.

Grid: one program per ``ROWS`` consecutive patches of the flattened ``(N*L)`` patch list; it holds a
``(ROWS, BLOCK_P)`` fp32 tile (``BLOCK_P = next_pow2(P)``, ``ROWS * BLOCK_P = 4096`` on a GPU: 16 values
per thread per tensor at 8 warps, so P = 768 or 588 gives 4 rows; 16384 under the interpreter, which
pays ~8 ms of Python per program whatever its size), element ``j`` in ``pred``'s ``nhwpqc``
order: ``j = (i*p + q)*C + c`` -> ``imgs[n, c, r*p + i, col*p + q]``. Loads of kept patches
(``mask == 0``) are masked off, so they cost no memory traffic. The forward writes one
``(loss, mask)`` partial sum per program; a one-program kernel adds the partials in a fixed order
and divides (no atomics: the loss is bit-identical run to run). It also returns ``sum(mask)`` (fp32)
for the backward.

Gradient: ``d loss / d pred = 2 * (pred - t) / P * mask[n, l] / sum(mask) * grad_out``. Bytes with
``f`` the removed fraction, ``e_p`` / ``e_i`` / ``e_m`` the element sizes of pred / imgs / mask:

    forward                  f*N*L*P*(e_p + e_i) + N*L*e_m
    backward, recompute:     f*N*L*P*(e_p + e_i) + N*L*e_m + N*L*P*e_p   (read again, write the gradient)
    forward writes the grad: + N*L*P*e_p in the forward, backward 2*N*L*P*e_p (read it, scale by grad_out)

Recomputing moves fewer bytes when ``f*(e_p + e_i) < 2*e_p``: at f = 0.75, 8 vs 9 bytes per pred
element with bf16 pred and imgs (the training pipeline), 16 vs 18 in fp32; only bf16 pred with fp32
imgs is 5% worse (11 vs 10.5). It also writes nothing when no backward follows and keeps no extra
``(N, L, P)`` buffer alive, so the backward recomputes. Kept rows get ``0 * coefficient`` (zero, NaN
like the reference when ``sum(mask) == 0``).

The loss dtype is the promotion of pred, imgs and mask (their common dtype, else fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._common import interpreter_on
from fastmae.kernels.aot import AotKernel

MAX_BLOCK_P = 4096  # a whole patch per tile row, in registers
GPU_TILE = 4096  # elements of the (ROWS, BLOCK_P) tile on a GPU
INTERPRETER_TILE = 16384  # under the interpreter: fewer, larger programs
_NUM_WARPS = 8
_SUM_BLOCK = 1024


@triton.jit
def _patch_diff(pred_ptr, imgs_ptr, mask_ptr, num_rows, num_patches, grid_w, eps,
                s_pred_n, s_pred_l, s_pred_p, s_img_n, s_img_c, s_img_h, s_img_w, s_mask_n, s_mask_l,
                PATCH: tl.constexpr, CHANNELS: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr,
                NORM_PIX: tl.constexpr):
    """``(pred - target)`` of this program's rows, (ROWS, BLOCK_P) fp32 (0 on kept rows and padding), the mask
    weights (ROWS,), the rows' flat patch indices ``n*L + l`` (ROWS,) and which of them exist."""
    eps = tl.cast(eps, tl.float32)  # fp32 math even when the float arrives typed fp64
    P: tl.constexpr = PATCH * PATCH * CHANNELS
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,) flat patch index n*L + l
    in_range = row < num_rows
    n = (row // num_patches).to(tl.int64)
    l = row % num_patches
    m = tl.load(mask_ptr + n * s_mask_n + l * s_mask_l, mask=in_range, other=0.0).to(tl.float32)  # (ROWS,)
    j = tl.arange(0, BLOCK_P)  # (BLOCK_P,) element of the patch vector, nhwpqc order
    c = j % CHANNELS
    i = j // CHANNELS // PATCH
    q = j // CHANNELS % PATCH
    live = (m != 0.0)[:, None] & (j < P)[None, :]  # (ROWS, BLOCK_P): removed patches only
    pred_row = n * s_pred_n + l * s_pred_l  # (ROWS,)
    x = tl.load(pred_ptr + pred_row[:, None] + (j * s_pred_p)[None, :], mask=live, other=0.0).to(tl.float32)
    img_row = n * s_img_n + (l // grid_w) * PATCH * s_img_h + (l % grid_w) * PATCH * s_img_w  # (ROWS,)
    img_elem = c * s_img_c + i * s_img_h + q * s_img_w  # (BLOCK_P,)
    t = tl.load(imgs_ptr + img_row[:, None] + img_elem[None, :], mask=live, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(t, axis=1) / P  # (ROWS,)
        d = tl.where(live, t - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / (P - 1)  # (ROWS,) unbiased
        t = d / tl.sqrt_rn(var + eps)[:, None]
    return x - t, m, row, in_range


# The forward and backward kernels share these arguments (besides their own pointers), all passed on to
# _patch_diff:
#   pred_ptr (N, L, P), imgs_ptr (N, C, H, W), mask_ptr (N, L): any strides, given after the sizes
#   num_rows N*L, num_patches L, grid_w W // PATCH (patches per image row), eps (norm_pix's, cast to fp32)
#   s_pred_*, s_img_*, s_mask_*: pred.stride(), imgs.stride(), mask.stride()
#   PATCH p, CHANNELS C (P = p*p*C), BLOCK_P = next_pow2(P), ROWS patches per program, NORM_PIX
@triton.jit
def _masked_mse_fwd_kernel(pred_ptr, imgs_ptr, mask_ptr, partial_ptr, num_rows, num_patches, grid_w, eps,
                           s_pred_n, s_pred_l, s_pred_p, s_img_n, s_img_c, s_img_h, s_img_w, s_mask_n, s_mask_l,
                           PATCH: tl.constexpr, CHANNELS: tl.constexpr, BLOCK_P: tl.constexpr,
                           ROWS: tl.constexpr, NORM_PIX: tl.constexpr):
    """partial[0, pid] = sum over its rows of mask * mse, partial[1, pid] = sum of mask; partial (2, G)."""
    diff, m, _, _ = _patch_diff(pred_ptr, imgs_ptr, mask_ptr, num_rows, num_patches, grid_w, eps,
                                s_pred_n, s_pred_l, s_pred_p, s_img_n, s_img_c, s_img_h, s_img_w,
                                s_mask_n, s_mask_l, PATCH, CHANNELS, BLOCK_P, ROWS, NORM_PIX)
    mse = tl.sum(diff * diff, axis=1) / (PATCH * PATCH * CHANNELS)  # (ROWS,)
    pid = tl.program_id(0)
    tl.store(partial_ptr + pid, tl.sum(m * mse, axis=0))
    tl.store(partial_ptr + tl.num_programs(0) + pid, tl.sum(m, axis=0))


@triton.jit
def _masked_mse_sum_kernel(partial_ptr, loss_ptr, mask_sum_ptr, num_parts, BLOCK: tl.constexpr):
    """One program: loss = sum(partial[0]) / sum(partial[1]) in a fixed order; also stores sum(mask)."""
    offs = tl.arange(0, BLOCK)
    acc_loss = tl.zeros([BLOCK], dtype=tl.float32)
    acc_mask = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_parts, BLOCK):
        ok = start + offs < num_parts
        acc_loss += tl.load(partial_ptr + start + offs, mask=ok, other=0.0)
        acc_mask += tl.load(partial_ptr + num_parts + start + offs, mask=ok, other=0.0)
    mask_sum = tl.sum(acc_mask, axis=0)
    tl.store(loss_ptr, (tl.sum(acc_loss, axis=0) / mask_sum).to(loss_ptr.dtype.element_ty))
    tl.store(mask_sum_ptr, mask_sum)


@triton.jit
def _masked_mse_bwd_kernel(grad_loss_ptr, mask_sum_ptr, pred_ptr, imgs_ptr, mask_ptr, grad_ptr,
                           num_rows, num_patches, grid_w, eps,
                           s_pred_n, s_pred_l, s_pred_p, s_img_n, s_img_c, s_img_h, s_img_w, s_mask_n, s_mask_l,
                           PATCH: tl.constexpr, CHANNELS: tl.constexpr, BLOCK_P: tl.constexpr,
                           ROWS: tl.constexpr, NORM_PIX: tl.constexpr):
    """grad (N*L, P) contiguous = 2 * (pred - t) / P * mask / sum(mask) * grad_loss, every row written."""
    P: tl.constexpr = PATCH * PATCH * CHANNELS
    diff, m, row, in_range = _patch_diff(pred_ptr, imgs_ptr, mask_ptr, num_rows, num_patches, grid_w, eps,
                                         s_pred_n, s_pred_l, s_pred_p, s_img_n, s_img_c, s_img_h, s_img_w,
                                         s_mask_n, s_mask_l, PATCH, CHANNELS, BLOCK_P, ROWS, NORM_PIX)
    scale = tl.load(grad_loss_ptr).to(tl.float32) * 2.0 / (P * tl.load(mask_sum_ptr))
    grad = diff * (m * scale)[:, None]  # (ROWS, BLOCK_P)
    j = tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    out = grad_ptr + row.to(tl.int64)[:, None] * P + j[None, :]
    tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=in_range[:, None] & (j < P)[None, :])


def _tile(p: int, channels: int, tile: int) -> tuple[int, int]:
    """(BLOCK_P, ROWS) for a patch of ``P = p*p*C`` values and a tile of ``tile`` elements."""
    block_p = triton.next_power_of_2(p * p * channels)
    return block_p, max(1, tile // block_p)


def _launch_tile(p: int, channels: int) -> tuple[int, int]:
    return _tile(p, channels, INTERPRETER_TILE if interpreter_on() else GPU_TILE)


def _launch_args(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                 eps: float) -> tuple[int, tuple]:
    """(number of programs, the shared runtime arguments after the pointers)."""
    n, channels, _, ww = imgs.shape  # (N, C, H, W)
    num_patches = pred.shape[1]  # pred (N, L, P)
    _, rows = _launch_tile(patch_size, channels)
    num_rows = n * num_patches
    args = (num_rows, num_patches, ww // patch_size, eps, *pred.stride(), *imgs.stride(), *mask.stride())
    return triton.cdiv(num_rows, rows), args


def _constexprs(imgs: torch.Tensor, patch_size: int, norm_pix: bool) -> dict[str, object]:
    block_p, rows = _launch_tile(patch_size, imgs.shape[1])
    return dict(PATCH=patch_size, CHANNELS=imgs.shape[1], BLOCK_P=block_p, ROWS=rows, NORM_PIX=norm_pix)


def loss_dtype(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor) -> torch.dtype:
    """The promotion of three dtypes among fp32/bf16/fp16: their common dtype, else fp32."""
    dtypes = {pred.dtype, imgs.dtype, mask.dtype}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def masked_mse(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool,
               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastmae::masked_mse``: ``pred (N, L, P)``, ``imgs (N, C, H, W)``, ``mask (N, L)`` (any strides)
    -> ``(loss ()`` in the promotion of the three dtypes, ``sum(mask) ()`` fp32)."""
    programs, args = _launch_args(pred, imgs, mask, patch_size, eps)
    partial = torch.empty((2, programs), dtype=torch.float32, device=pred.device)  # (2, G)
    loss = torch.empty((), dtype=loss_dtype(pred, imgs, mask), device=pred.device)
    mask_sum = torch.empty((), dtype=torch.float32, device=pred.device)
    if programs > 0:
        _masked_mse_fwd_kernel[(programs,)](
            pred, imgs, mask, partial, *args, **_constexprs(imgs, patch_size, norm_pix), num_warps=_NUM_WARPS)
    _masked_mse_sum_kernel[(1,)](partial, loss, mask_sum, programs, BLOCK=_SUM_BLOCK)
    return loss, mask_sum


def masked_mse_backward(grad_loss: torch.Tensor, mask_sum: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor,
                        mask: torch.Tensor, patch_size: int, norm_pix: bool, eps: float) -> torch.Tensor:
    """``fastmae::masked_mse_backward``: ``grad_loss ()``, ``mask_sum ()`` fp32 -> gradient wrt ``pred``,
    ``(N, L, P)`` contiguous, pred's dtype."""
    programs, args = _launch_args(pred, imgs, mask, patch_size, eps)
    grad = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)  # (N, L, P)
    if programs > 0:
        _masked_mse_bwd_kernel[(programs,)](
            grad_loss, mask_sum, pred, imgs, mask, grad, *args, **_constexprs(imgs, patch_size, norm_pix),
            num_warps=_NUM_WARPS)
    return grad


_FWD_TYPES = {"mask_ptr": "*fp32", "partial_ptr": "*fp32", "eps": "fp32"}
_BWD_TYPES = {"grad_loss_ptr": "*fp32", "mask_sum_ptr": "*fp32", "mask_ptr": "*fp32", "eps": "fp32"}


def _aot(patch: int, norm_pix: bool) -> list[AotKernel]:
    block_p, rows = _tile(patch, 3, GPU_TILE)
    consts = dict(PATCH=patch, CHANNELS=3, BLOCK_P=block_p, ROWS=rows, NORM_PIX=norm_pix)
    label = f"p{patch}{'_norm' if norm_pix else ''}"
    return [AotKernel(fn=_masked_mse_fwd_kernel, overrides=_FWD_TYPES, constexprs=consts, num_warps=_NUM_WARPS,
                      label=label),
            AotKernel(fn=_masked_mse_bwd_kernel, overrides=_BWD_TYPES, constexprs=consts, num_warps=_NUM_WARPS,
                      label=label)]


AOT_KERNELS = [
    *(k for patch in (16, 14) for norm_pix in (True, False) for k in _aot(patch, norm_pix)),
    AotKernel(fn=_masked_mse_sum_kernel, overrides={"partial_ptr": "*fp32", "mask_sum_ptr": "*fp32"},
              constexprs={"BLOCK": _SUM_BLOCK}, num_warps=4, label="sum"),
]
