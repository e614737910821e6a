"""layer_norm in Triton: LayerNorm over the last dimension, optionally fused with the residual add before it.

Fused: with a residual, the add ``s = x + r``, its store (the new residual stream) and the
normalisation run in one pass; the backward adds the gradient of the returned sum to the gradient
through the norm in the same pass. ``x (..., D)`` is viewed as ``R = prod(shape[:-1])`` rows.

Forward, grid ``(cdiv(R, BLOCK_R),)``: one program holds a ``(BLOCK_R, BLOCK_D)`` fp32 tile, whole
rows (``BLOCK_D = next_pow2(D)``, ``D <= MAX_D``), computes the sum (rounded to the output dtype and
read back, so the statistics are those of the returned sum, as in the reference), the mean and the
biased variance in fp32, stores ``out`` and the per-row ``mean`` and ``rstd`` (fp32) for the backward.

Backward, grid ``(G,)``: program ``p`` walks its ``rows_per_program`` rows ``BLOCK_R`` at a time,
recomputes ``xhat = (s - mean) * rstd``, writes ``ds = rstd * (dy - mean(dy) - xhat * mean(dy * xhat))
[+ grad_sum]`` with ``dy = g * w``, and accumulates ``g * xhat`` and ``g`` in fp32 registers; it stores
one partial row of each into ``partial (2, G, D)`` fp32. A second kernel (kernels/_column_sum.py, two
slabs), grid ``(cdiv(D, RED_BLOCK_D), 2)``, adds the ``G`` partial rows of each in a fixed order into
``dweight`` and ``dbias`` (no atomics: bit-identical run to run). ``x`` and ``residual`` both receive ``ds``
(cast to their dtypes).

Bytes moved (``e_x, e_r, e_o, e_w``: element sizes of x, residual, output (= the sum), weight/bias):
  forward  = R*D*(e_x + e_o) [+ R*D*(e_r + e_o) with a residual] + 8*R + 2*D*e_w
             (read x [and r]; write out [and the sum]; mean and rstd; w and b)
  backward = R*D*3*e_o [+ R*D*e_o with a gradient of the sum] + 8*R + 16*G*D + 3*D*e_w
             (read g and s [and grad_sum]; write ds; mean and rstd; partials written and read back;
             w, dw, db); when x and residual have different dtypes, one cast of ds adds R*D*(e_o + e_x).

Choices: the forward tile is ``GPU_TILE = 4096`` elements (16 fp32 values per thread per tensor at
8 warps): 4 rows at D = 768/1024, 2 at 1280, 8 at the decoder's 512. The backward holds about seven
tile-sized values (s, g, xhat, dy, ds and two accumulators), so its tile is 2048 elements at 8 warps
(8 values per thread; 64-104 registers at the MAE widths, no spills). ``MAX_D = 4096`` is one row per
tile (the backward at 16 warps, 128 registers); 8192 would spill. Several rows per program keep
programs busy at small ``D`` without a second grid axis. ``G = 2 * SMs`` on CUDA (one wave of two
8-warp programs per SM; ``G`` is fixed per device, so the sums are reproducible there), capped by the
number of row tiles: the partial buffer's ``16*G*D`` bytes (3.2 MB at D = 768 on an H100) are 1-4% of
the backward's bf16 traffic at batch 256 (encoder R = 12800, decoder R = 50432), 16% for the encoder
at batch 64, where fewer programs would leave SMs idle. Under the interpreter, which pays Python
overhead per program and per loop step, tiles are 16384 elements and ``G`` is at most 8.
Inputs are made contiguous by :func:`layer_norm_triton` (a no-op for the model's activations).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._column_sum import aot_overrides as column_sum_types
from fastmae.kernels._column_sum import column_sum, column_sum_kernel
from fastmae.kernels._common import interpreter_on, split_rows
from fastmae.kernels.aot import AotKernel

MAX_D = 4096  # whole rows in registers (the backward spills at 8192: 32 values per thread at 16 warps)
GPU_TILE = 4096  # elements of the forward's (BLOCK_R, BLOCK_D) tile on a GPU
GPU_BWD_TILE = 2048  # the backward's tile: it holds about 7 tiles' worth of values (2 of them accumulators)
FWD_PER_THREAD = 16  # tile elements per thread: 8 warps for a 4096 tile
BWD_PER_THREAD = 8  # 8 warps for a 2048 tile
INTERPRETER_TILE = 16384  # under the interpreter: fewer, larger programs
INTERPRETER_BWD_PROGRAMS = 8  # G under the interpreter (and for meta tensors)
RED_BLOCK_P = 32  # partial rows per step of the dweight/dbias reduction
RED_BLOCK_D = 64  # columns per reduction program


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,  # (R, D)
    res_ptr,  # (R, D) residual; x_ptr (unread) without one
    w_ptr,  # (D,)
    b_ptr,  # (D,)
    out_ptr,  # (R, D) LN(x [+ residual])
    sum_ptr,  # (R, D) x + residual, out's dtype; out_ptr (unwritten) without a residual
    mean_ptr,  # (R,) fp32
    rstd_ptr,  # (R,) fp32
    num_rows,  # R
    dim,  # D
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # fp32 math even when the float arrives typed fp64
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = rows < num_rows
    col_ok = cols < dim
    ok = row_ok[:, None] & col_ok[None, :]  # (BLOCK_R, BLOCK_D)
    offs = rows.to(tl.int64)[:, None] * dim + cols[None, :]  # (BLOCK_R, BLOCK_D)
    s = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        total = (s + tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offs, total, mask=ok)
        s = total.to(tl.float32)  # the statistics of the returned (rounded) sum
    mean = tl.sum(s, axis=1) / dim  # (BLOCK_R,)
    centred = tl.where(ok, s - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / dim  # (BLOCK_R,) biased
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    g_ptr,  # (R, D) gradient of out
    gs_ptr,  # (R, D) gradient of the returned sum; g_ptr (unread) without one
    s_ptr,  # (R, D) the normalised input: x, or x + residual
    w_ptr,  # (D,)
    mean_ptr,  # (R,) fp32
    rstd_ptr,  # (R,) fp32
    ds_ptr,  # (R, D) gradient wrt s, s's dtype
    partial_ptr,  # (2, G, D) fp32: per-program sums of g * xhat, then of g
    num_rows,  # R
    dim,  # D
    rows_per_program,  # a multiple of BLOCK_R
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_GRAD_SUM: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    col_ok = cols < dim
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
    dw_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    first = pid * rows_per_program
    end = tl.minimum(first + rows_per_program, num_rows)
    for start in range(first, end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        row_ok = rows < end
        ok = row_ok[:, None] & col_ok[None, :]  # (BLOCK_R, BLOCK_D)
        offs = rows.to(tl.int64)[:, None] * dim + cols[None, :]
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)  # (BLOCK_R,)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        xhat = tl.where(ok, (s - mean[:, None]) * rstd[:, None], 0.0)
        dy = g * w[None, :]  # 0 outside the tile's valid part
        c_xhat = tl.sum(dy * xhat, axis=1) / dim  # (BLOCK_R,)
        c_mean = tl.sum(dy, axis=1) / dim
        ds = (dy - (xhat * c_xhat[:, None] + c_mean[:, None])) * rstd[:, None]
        if HAS_GRAD_SUM:
            ds += tl.load(gs_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=ok)
        dw_acc += g * xhat
        db_acc += g
    num_programs = tl.num_programs(0)
    tl.store(partial_ptr + pid * dim + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    tl.store(partial_ptr + (num_programs + pid) * dim + cols, tl.sum(db_acc, axis=0), mask=col_ok)


def _blocks(dim: int, tile: int, per_thread: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_D, num_warps)`` for rows of width ``dim``, a tile of ``tile`` elements (or one
    row) and about ``per_thread`` tile elements per thread (4 to 16 warps)."""
    block_d = triton.next_power_of_2(int(dim))  # int(): a traced width is specialised (constexprs must be ints)
    block_r = max(1, tile // block_d)
    return block_r, block_d, min(16, max(4, block_r * block_d // (32 * per_thread)))


def _fwd_blocks(dim: int) -> tuple[int, int, int]:
    return _blocks(dim, INTERPRETER_TILE if interpreter_on() else GPU_TILE, FWD_PER_THREAD)


def _bwd_blocks(dim: int) -> tuple[int, int, int]:
    return _blocks(dim, INTERPRETER_TILE if interpreter_on() else GPU_BWD_TILE, BWD_PER_THREAD)


def _bwd_programs(num_rows: int, block_r: int, device: torch.device) -> tuple[int, int]:
    """``(G, rows_per_program)``: about ``2 * SMs`` programs on CUDA, each a whole number of row tiles."""
    target = (2 * torch.cuda.get_device_properties(device).multi_processor_count
              if device.type == "cuda" and not interpreter_on() else INTERPRETER_BWD_PROGRAMS)
    return split_rows(num_rows, block_r, target)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fastmae::layer_norm``: ``x (..., D)``, ``weight (D,)``, ``bias (D,)``, optional ``residual`` shaped as x ->
    ``(out (..., D), x + residual (..., D) or an empty placeholder (0,), mean (...), rstd (...))``;
    out and the sum in the promoted dtype of x and residual, mean and rstd fp32."""
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    residual = None if residual is None else residual.contiguous()
    dim = x.shape[-1]
    num_rows = x.numel() // dim  # R
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)  # (..., D)
    total = torch.empty(x.shape if residual is not None else (0,), dtype=out_dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)  # (...)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    block_r, block_d, num_warps = _fwd_blocks(dim)
    if num_rows > 0:
        _layer_norm_fwd_kernel[(triton.cdiv(num_rows, block_r),)](
            x, x if residual is None else residual, weight, bias, out, out if residual is None else total,
            mean, rstd, num_rows, dim, eps,
            BLOCK_R=block_r, BLOCK_D=block_d, HAS_RESIDUAL=residual is not None, num_warps=num_warps)
    return out, total, mean, rstd


def layer_norm_backward(grad_out: torch.Tensor, grad_sum: torch.Tensor | None, total: torch.Tensor,
                        weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        bias_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fastmae::layer_norm_backward``: ``grad_out (..., D)``, optional ``grad_sum (..., D)``, the normalised input
    ``total (..., D)``, ``weight (D,)``, ``mean``/``rstd (...)`` fp32 -> ``(grad_total (..., D)`` in total's
    dtype, ``grad_weight (D,)`` in weight's dtype, ``grad_bias (D,)`` in ``bias_dtype``)."""
    grad_out, total, weight = grad_out.contiguous(), total.contiguous(), weight.contiguous()
    grad_sum = None if grad_sum is None else grad_sum.contiguous()
    dim = total.shape[-1]
    num_rows = total.numel() // dim  # R
    block_r, block_d, num_warps = _bwd_blocks(dim)
    programs, rows_per_program = _bwd_programs(num_rows, block_r, total.device) if num_rows > 0 else (0, block_r)
    grad_total = torch.empty(total.shape, dtype=total.dtype, device=total.device)  # (..., D)
    partial = torch.empty((2, programs, dim), dtype=torch.float32, device=total.device)  # (2, G, D)
    grad_weight = torch.empty((dim,), dtype=weight.dtype, device=total.device)
    grad_bias = torch.empty((dim,), dtype=bias_dtype, device=total.device)
    if programs > 0:
        _layer_norm_bwd_kernel[(programs,)](
            grad_out, grad_out if grad_sum is None else grad_sum, total, weight, mean, rstd, grad_total, partial,
            num_rows, dim, rows_per_program,
            BLOCK_R=block_r, BLOCK_D=block_d, HAS_GRAD_SUM=grad_sum is not None, num_warps=num_warps)
    column_sum(partial, grad_weight, programs, dim, RED_BLOCK_P, RED_BLOCK_D, out2=grad_bias)  # (2, G, D) -> 2 (D,)
    return grad_total, grad_weight, grad_bias


_STATS = {"mean_ptr": "*fp32", "rstd_ptr": "*fp32"}
_FWD_TYPES = {**_STATS, "eps": "fp32"}
# under autocast: bf16/fp16 branch output x, fp32 residual stream and fp32 LayerNorm parameters -> fp32
_FWD_AUTOCAST_TYPES = {**_FWD_TYPES, "res_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp32",
                       "sum_ptr": "*fp32"}
_BWD_TYPES = {**_STATS, "partial_ptr": "*fp32"}


def _aot(dim: int) -> list[AotKernel]:
    """The configurations of width ``dim`` (768 and 1024 share theirs: BLOCK_D = 1024)."""
    fwd_r, block_d, fwd_warps = _blocks(dim, GPU_TILE, FWD_PER_THREAD)
    bwd_r, _, bwd_warps = _blocks(dim, GPU_BWD_TILE, BWD_PER_THREAD)
    fwd = {"BLOCK_R": fwd_r, "BLOCK_D": block_d}
    bwd = {"BLOCK_R": bwd_r, "BLOCK_D": block_d}
    label = f"D{block_d}"
    return [
        AotKernel(fn=_layer_norm_fwd_kernel, overrides=_FWD_TYPES, constexprs={**fwd, "HAS_RESIDUAL": False},
                  num_warps=fwd_warps, label=label),
        AotKernel(fn=_layer_norm_fwd_kernel, overrides=_FWD_TYPES, constexprs={**fwd, "HAS_RESIDUAL": True},
                  num_warps=fwd_warps, label=f"{label}-residual"),
        AotKernel(fn=_layer_norm_fwd_kernel, overrides=_FWD_AUTOCAST_TYPES,
                  constexprs={**fwd, "HAS_RESIDUAL": True}, num_warps=fwd_warps, label=f"{label}-residual-autocast"),
        AotKernel(fn=_layer_norm_bwd_kernel, overrides=_BWD_TYPES, constexprs={**bwd, "HAS_GRAD_SUM": False},
                  num_warps=bwd_warps, label=label),
        AotKernel(fn=_layer_norm_bwd_kernel, overrides=_BWD_TYPES, constexprs={**bwd, "HAS_GRAD_SUM": True},
                  num_warps=bwd_warps, label=f"{label}-residual"),
    ]


# MAE widths: decoder 512, ViT-B/L encoder 768/1024 (BLOCK_D 1024), ViT-H encoder 1280 (BLOCK_D 2048).
AOT_KERNELS = [
    *(k for dim in (512, 1024, 1280) for k in _aot(dim)),
    AotKernel(fn=column_sum_kernel, overrides=column_sum_types(),
              constexprs={"BLOCK_P": RED_BLOCK_P, "BLOCK_D": RED_BLOCK_D, "SLABS": 2}, num_warps=4,
              label="params"),
]
