"""unshuffle in Triton: the decoder input in one pass, its backward in one pass plus a tiny reduction.

Fused: the mask-token fill, the gather by ``ids_restore``, the cls concat and the decoder pos add.
The reference materialises ``cat([x[:, 1:], mask_tokens])``, the gathered tensor and the cls concat
before adding pos; here every output element is read from its source and written exactly once.

Forward, grid ``(cdiv(L+1, BLOCK_R), cdiv(Dd, BLOCK_D), N)``: one program writes a ``BLOCK_R x BLOCK_D``
tile of output rows of one sample. Row 0 reads ``x[n, 0]``; row ``1+l`` reads ``ids_restore[n, l]``
and takes ``x[n, 1+ids_restore]`` when that is ``< K``, else the mask token; then adds ``pos[1+l]``.

Backward, grid ``(cdiv(L+1, ROW_ITERS*BLOCK_R), cdiv(Dd, BLOCK_D), N)``: one program walks ``ROW_ITERS``
row tiles of the upstream gradient ``g``, scatters the kept rows (and cls) to ``grad_x`` -- each row of
``grad_x`` is written once because ``ids_restore`` is a permutation of ``0..L-1`` (as
``random_masking`` makes it), so no atomics -- and sums the removed rows into one fp32 partial row
``partial[n, chunk]``. A second kernel (kernels/_column_sum.py), grid ``(cdiv(Dd, min(Dd, 32)),)``,
adds the ``N * num_chunks`` partial rows in a fixed order: the mask-token gradient is bit-identical run
to run.

Bytes moved per call (``e_x``, ``e_t``, ``e_p``, ``e_o``: element sizes of x, mask_token, pos, output;
``e_i`` of ids_restore; ``C = cdiv(L+1, ROW_ITERS*BLOCK_R)`` chunks per sample):
  forward  = N*(1+K)*Dd*e_x + N*L*e_i + N*(L+1)*Dd*e_o + (L+1)*Dd*e_p [+ Dd*e_t per program, cached]
  backward = N*(L+1)*Dd*e_o + N*L*e_i + N*(1+K)*Dd*e_x + Dd*e_t + 2*N*C*Dd*4 (partials: 4-7% at L=196)
(pos is read by every sample but stays in L2: ``(L+1)*Dd*e_p`` from DRAM.)

Choices: tiles of at most 8 rows x 256 columns (2048 elements, 16 per thread at 4 warps): each row
of a tile has its own source row, hence its own pointer, and taller tiles cost registers (16 x 128
spilled a few bytes in some sm_80/sm_90 builds; 8 x 256 uses about 53 registers forward, 96 backward, no spills).
``BLOCK_R`` and ``BLOCK_D`` follow from ``L+1`` and ``Dd`` only, so every MAE decoder (Dd 512, L 196
or 256) uses one configuration. The backward groups ``ROW_ITERS`` tiles (64 rows) per program so the
partial buffer stays a few percent of the traffic while ``N * C * cdiv(Dd, 256)`` programs
(``8 N`` at Dd 512) still fill the GPU at MAE batch sizes. Loads are cast to fp32, the sums and the
adds run in fp32, stores cast to the destination's dtype; the output dtype follows torch's
promotion of (x, mask_token) then pos, as the reference's ``cat`` and ``+`` do (bf16 tokens with fp32
mask token and pos under autocast give fp32). Inputs are made contiguous by :func:`unshuffle_triton`
(a no-op for the model's tensors); the kernels take contiguous tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._column_sum import aot_overrides as column_sum_types
from fastmae.kernels._column_sum import column_sum, column_sum_kernel
from fastmae.kernels.aot import AotKernel

TILE = 2048  # elements per (rows x columns) tile: 16 per thread at 4 warps
MAX_BLOCK_D = 256  # columns per tile
MAX_BLOCK_R = 8  # rows per tile (each row carries its own source pointer: more rows, more registers)
CHUNK_ROWS = 64  # rows per backward program (rounded up to whole tiles)
RED_BLOCK_P = 64  # partial rows per step of the mask-token reduction
RED_MAX_BLOCK_D = 32  # columns per reduction program


@triton.jit
def _unshuffle_fwd_kernel(
    x_ptr,  # (N, 1+K, Dd)
    ids_ptr,  # (N, L) int
    tok_ptr,  # (1, 1, Dd)
    pos_ptr,  # (1, L+1, Dd)
    out_ptr,  # (N, L+1, Dd)
    num_keep,  # K
    num_patches,  # L
    dd,  # Dd
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) output rows, 0 = cls
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = rows <= num_patches
    col_ok = cols < dd
    slot = tl.load(ids_ptr + n * num_patches + rows - 1, mask=row_ok & (rows > 0), other=-1)  # cls: -1
    src = slot.to(tl.int32) + 1  # (BLOCK_R,) row of x: 0 for cls, 1+slot for a kept patch
    from_x = row_ok & (src >= 0) & (src <= num_keep)
    tile_ok = row_ok[:, None] & col_ok[None, :]  # (BLOCK_R, BLOCK_D)
    xv = tl.load(x_ptr + n * (num_keep + 1) * dd + src[:, None] * dd + cols[None, :],
                 mask=from_x[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    tok = tl.load(tok_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
    pos = tl.load(pos_ptr + rows[:, None] * dd + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    val = tl.where(from_x[:, None], xv, tok[None, :]) + pos  # (BLOCK_R, BLOCK_D) fp32
    out_offs = n * (num_patches + 1) * dd + rows[:, None] * dd + cols[None, :]
    tl.store(out_ptr + out_offs, val.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _unshuffle_bwd_kernel(
    g_ptr,  # (N, L+1, Dd) upstream gradient
    ids_ptr,  # (N, L) int
    gx_ptr,  # (N, 1+K, Dd) grad wrt x
    partial_ptr,  # (N, C, Dd) fp32: per-program sums of the removed rows of g
    num_keep,  # K
    num_patches,  # L
    dd,  # Dd
    num_chunks,  # C
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROW_ITERS: tl.constexpr,
):
    chunk = tl.program_id(0)
    n = tl.program_id(2).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    col_ok = cols < dd
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for i in range(ROW_ITERS):
        rows = (chunk * ROW_ITERS + i) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) rows of g, 0 = cls
        row_ok = rows <= num_patches
        slot = tl.load(ids_ptr + n * num_patches + rows - 1, mask=row_ok & (rows > 0), other=-1)
        src = slot.to(tl.int32) + 1  # (BLOCK_R,) row of x this row came from
        to_x = row_ok & (src >= 0) & (src <= num_keep)
        to_tok = row_ok & (rows > 0) & ~to_x
        gv = tl.load(g_ptr + n * (num_patches + 1) * dd + rows[:, None] * dd + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_D)
        tl.store(gx_ptr + n * (num_keep + 1) * dd + src[:, None] * dd + cols[None, :],
                 gv.to(gx_ptr.dtype.element_ty), mask=to_x[:, None] & col_ok[None, :])
        acc += tl.where(to_tok[:, None], gv, 0.0)
    tl.store(partial_ptr + (n * num_chunks + chunk) * dd + cols, tl.sum(acc, axis=0), mask=col_ok)


def _blocks(num_rows: int, dd: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_D)`` for ``num_rows`` rows of width ``dd``: a tile of at most ``TILE`` elements."""
    block_d = min(triton.next_power_of_2(dd), MAX_BLOCK_D)
    block_r = min(triton.next_power_of_2(num_rows), max(1, TILE // block_d), MAX_BLOCK_R)
    return block_r, block_d


def unshuffle(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
              pos_embed: torch.Tensor) -> torch.Tensor:
    """``fastmae::unshuffle``: ``x (N, 1+K, Dd)``, ``ids_restore (N, L)``, ``mask_token (1, 1, Dd)``,
    ``pos_embed (1, L+1, Dd)`` -> ``(N, L+1, Dd)`` in the promotion of x's, mask_token's and pos_embed's dtypes."""
    x, ids_restore = x.contiguous(), ids_restore.contiguous()
    mask_token, pos_embed = mask_token.contiguous(), pos_embed.contiguous()
    n, s, dd = x.shape
    num_patches = ids_restore.shape[1]
    dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)
    out = torch.empty((n, num_patches + 1, dd), dtype=dtype, device=x.device)
    block_r, block_d = _blocks(num_patches + 1, dd)
    grid = (triton.cdiv(num_patches + 1, block_r), triton.cdiv(dd, block_d), n)
    _unshuffle_fwd_kernel[grid](
        x, ids_restore, mask_token, pos_embed, out, s - 1, num_patches, dd, BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def unshuffle_backward(grad: torch.Tensor, ids_restore: torch.Tensor, len_keep: int, x_dtype: torch.dtype,
                       mask_token_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastmae::unshuffle_backward``: ``grad (N, L+1, Dd)`` (any strides), ``ids_restore (N, L)`` ->
    ``grad_x (N, 1+K, Dd)`` in ``x_dtype``, ``grad_mask_token (1, 1, Dd)`` in ``mask_token_dtype``."""
    grad, ids_restore = grad.contiguous(), ids_restore.contiguous()
    n, rows, dd = grad.shape  # rows = L+1
    block_r, block_d = _blocks(rows, dd)
    row_iters = max(1, CHUNK_ROWS // block_r)
    num_chunks = triton.cdiv(rows, row_iters * block_r)  # C
    grad_x = torch.empty((n, len_keep + 1, dd), dtype=x_dtype, device=grad.device)
    partial = torch.empty((n, num_chunks, dd), dtype=torch.float32, device=grad.device)  # (N, C, Dd)
    grad_tok = torch.empty((1, 1, dd), dtype=mask_token_dtype, device=grad.device)
    _unshuffle_bwd_kernel[(num_chunks, triton.cdiv(dd, block_d), n)](
        grad, ids_restore, grad_x, partial, len_keep, rows - 1, dd, num_chunks,
        BLOCK_R=block_r, BLOCK_D=block_d, ROW_ITERS=row_iters)
    red_block_d = min(triton.next_power_of_2(dd), RED_MAX_BLOCK_D)
    column_sum(partial, grad_tok, n * num_chunks, dd, RED_BLOCK_P, red_block_d)  # (N*C, Dd) -> (Dd,)
    return grad_x, grad_tok


_IDS = {"ids_ptr": "*i64"}
_BWD_TYPES = {**_IDS, "partial_ptr": "*fp32"}
# MAE's 512-wide decoder (L+1 = 197 or 257) gives BLOCK_R=8, BLOCK_D=256, ROW_ITERS=8.
_FWD_BLOCKS = dict(zip(("BLOCK_R", "BLOCK_D"), _blocks(197, 512)))
_BWD_BLOCKS = {**_FWD_BLOCKS, "ROW_ITERS": max(1, CHUNK_ROWS // _FWD_BLOCKS["BLOCK_R"])}
_RED_BLOCKS = {"BLOCK_P": RED_BLOCK_P, "BLOCK_D": RED_MAX_BLOCK_D, "SLABS": 1}
# "autocast": bf16/fp16 tokens with the fp32 mask token and pos table -> fp32 output and upstream gradient.
AOT_KERNELS = [
    AotKernel(fn=_unshuffle_fwd_kernel, overrides=_IDS, constexprs=_FWD_BLOCKS, label="Dd512"),
    AotKernel(fn=_unshuffle_fwd_kernel, constexprs=_FWD_BLOCKS, label="Dd512-autocast",
              overrides={**_IDS, "tok_ptr": "*fp32", "pos_ptr": "*fp32", "out_ptr": "*fp32"}),
    AotKernel(fn=_unshuffle_bwd_kernel, overrides=_BWD_TYPES, constexprs=_BWD_BLOCKS, label="Dd512"),
    AotKernel(fn=_unshuffle_bwd_kernel, constexprs=_BWD_BLOCKS, label="Dd512-autocast",
              overrides={**_BWD_TYPES, "g_ptr": "*fp32"}),
    AotKernel(fn=column_sum_kernel, overrides=column_sum_types(), constexprs=_RED_BLOCKS, label="Dd512"),
    AotKernel(fn=column_sum_kernel, overrides=column_sum_types("*fp32"),
              constexprs=_RED_BLOCKS, label="Dd512-autocast"),
]
