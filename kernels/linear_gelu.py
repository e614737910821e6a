"""linear_gelu in Triton: ``gelu(x @ W^T + b)`` with the exact (erf) GELU, the MLP's fc1 and its activation.

The GEMM ``h = x @ W^T`` (without its bias) stays with cuBLAS (:func:`fastmae.ops.linear_gelu`'s triton
backend calls ``F.linear(x, W)``); the kernels here fuse what follows, the bias add and the GELU, and
take ``h (..., F)`` and ``b (F,)``, ``h`` viewed as ``R = prod(shape[:-1])`` rows of ``F`` features. The
custom ops keep their kernel-level names ``fastmae_triton::bias_gelu`` and ``bias_gelu_backward``.

Forward, grid ``(cdiv(R, BLOCK_R), cdiv(F, BLOCK_F))``: a program loads a ``(BLOCK_R, BLOCK_F)`` tile
of ``h`` and its slice of the bias, computes ``z = h + b`` and ``gelu(z) = z * Phi(z)`` in fp32
(``Phi(z) = (1 + erf(z / sqrt 2)) / 2``) and stores the result in h's dtype. Nothing is saved but
``h`` and the bias, which the backward needs anyway: it recomputes ``z``.

Backward, grid ``(G, cdiv(F, BLOCK_F))``: program ``(p, c)`` walks its ``rows_per_program`` rows of
column block ``c``, ``BLOCK_R`` rows at a time: ``dz = g * (Phi(z) + z * phi(z))`` (``phi`` the normal
density), stores ``dh = dz`` in h's dtype and adds ``dz`` into an fp32 register tile; at the end it
stores that tile's column sums as row ``p`` of ``partial (G, F)`` fp32. A second kernel
(kernels/_column_sum.py), grid ``(cdiv(F, RED_BLOCK_F),)``, adds the ``G`` partial rows in a fixed
order into ``grad_bias`` (no atomics: bit-identical run to run). The bias gradient is the sum of the fp32 ``dz``, before ``dh`` is
rounded, as autograd computes it through the fp32 reference. cuBLAS then takes ``dh`` for the
gradients of ``x`` and ``W``.

Bytes moved besides the GEMMs, which both backends share (``e``: element size of h, the output, the
incoming gradient and dh; the bias's bytes, ``O(F)``, left out):
  torch backend  ``F.gelu(F.linear(x, W, b))``: the bias rides in the GEMM's epilogue for free;
    forward  = 2*R*F*e      (GELU reads z, writes out)
    backward = 3*R*F*e      (gelu_backward reads g and z, writes dz)
             + 1*R*F*e      (the Linear's backward reads dz again to sum the bias gradient)
  triton backend (this file), ``F.linear(x, W)`` then the fused kernels:
    forward  = 2*R*F*e      (read h, write out, adding the bias on the way)
    backward = 3*R*F*e + 8*G*F   (read g and h, write dh, summing dz into the bias-gradient partials;
                                  the partials written and read back)
So the triton path saves one pass over ``R*F`` in the backward (3 instead of 4) and a launch; the
forward moves the same bytes. ``torch.compile`` can fuse the torch backend's backward the same way,
so the priority between the two is set by measurement on the GPU.

Choices: ``BLOCK_F = 256`` columns (512 contiguous bytes of a bf16 row per tile row; every MAE hidden
width, 2048 to 5120, is a multiple) and 4096-element forward tiles at 8 warps (16 values per thread).
The backward holds about six tile-sized values (g, h, z, the erf and exp terms, the accumulator), so
its tile is 2048 elements at 8 warps (8 values per thread). ``G`` targets ``PROGRAMS_PER_SM`` programs
per SM across the column blocks (44 at F = 3072 on an H100's 132 SMs; fixed per device and shape, so
the sums are reproducible there), capped by the number of row tiles; the partials' ``8*G*F`` bytes
are under 1% of the backward's bf16 traffic at batch 64 and up. Under the interpreter, which pays
Python overhead per program and per loop step, tiles are 16384 elements, up to 1024 columns wide,
and ``G`` is at most ``INTERPRETER_ROW_PROGRAMS``. Inputs are made contiguous by
:func:`bias_gelu_triton` (a no-op for the GEMM's output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._common import interpreter_on, split_rows
from fastmae.kernels._column_sum import aot_overrides as column_sum_types
from fastmae.kernels._column_sum import column_sum, column_sum_kernel
from fastmae.kernels.aot import AotKernel

GPU_BLOCK_F = 256  # columns per tile on a GPU
GPU_TILE = 4096  # elements of the forward's (BLOCK_R, BLOCK_F) tile
GPU_BWD_TILE = 2048  # the backward's tile: it holds about six tiles' worth of values
FWD_PER_THREAD = 16  # tile elements per thread: 8 warps for a 4096 tile
BWD_PER_THREAD = 8  # 8 warps for a 2048 tile
PROGRAMS_PER_SM = 4  # the backward's target number of programs per SM (over all column blocks)
INTERPRETER_BLOCK_F = 1024  # under the interpreter: fewer, larger programs
INTERPRETER_TILE = 16384
INTERPRETER_ROW_PROGRAMS = 4  # G under the interpreter (and for meta tensors)
RED_BLOCK_P = 32  # partial rows per step of the bias-gradient reduction
RED_BLOCK_F = 64  # columns per reduction program
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr,  # (R, F) h, the GEMM's output
    bias_ptr,  # (F,)
    out_ptr,  # (R, F) gelu(h + bias), h's dtype
    num_rows,  # R
    dim,  # F
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # (BLOCK_F,)
    col_ok = cols < dim
    ok = (rows < num_rows)[:, None] & col_ok[None, :]  # (BLOCK_R, BLOCK_F)
    offs = rows.to(tl.int64)[:, None] * dim + cols[None, :]  # (BLOCK_R, BLOCK_F)
    b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_F,)
    z = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) + b[None, :]
    out = 0.5 * z * (1.0 + tl.math.erf(z * SQRT1_2))
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bias_gelu_bwd_kernel(
    g_ptr,  # (R, F) gradient of out
    x_ptr,  # (R, F) h
    bias_ptr,  # (F,)
    dx_ptr,  # (R, F) gradient wrt h, h's dtype
    partial_ptr,  # (G, F) fp32: per-program column sums of dz
    num_rows,  # R
    dim,  # F
    rows_per_program,  # a multiple of BLOCK_R
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # (BLOCK_F,)
    col_ok = cols < dim
    b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_F,)
    db_acc = tl.zeros([BLOCK_R, BLOCK_F], dtype=tl.float32)
    first = pid * rows_per_program
    end = tl.minimum(first + rows_per_program, num_rows)
    for start in range(first, end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        ok = (rows < end)[:, None] & col_ok[None, :]  # (BLOCK_R, BLOCK_F)
        offs = rows.to(tl.int64)[:, None] * dim + cols[None, :]
        z = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) + b[None, :]
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)  # 0 outside the valid part
        cdf = 0.5 * (1.0 + tl.math.erf(z * SQRT1_2))
        pdf = tl.exp(-0.5 * z * z) * INV_SQRT_2PI
        dz = g * (cdf + z * pdf)
        tl.store(dx_ptr + offs, dz.to(dx_ptr.dtype.element_ty), mask=ok)
        db_acc += dz
    tl.store(partial_ptr + pid * dim + cols, tl.sum(db_acc, axis=0), mask=col_ok)


def _blocks(dim: int, tile: int, max_block_f: int, per_thread: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_F, num_warps)`` for rows of ``dim`` features, a tile of ``tile`` elements at most
    ``max_block_f`` wide and about ``per_thread`` tile elements per thread (4 to 8 warps)."""
    block_f = min(max_block_f, triton.next_power_of_2(dim))
    block_r = max(1, tile // block_f)
    return block_r, block_f, min(8, max(4, block_r * block_f // (32 * per_thread)))


def _fwd_blocks(dim: int) -> tuple[int, int, int]:
    if interpreter_on():
        return _blocks(dim, INTERPRETER_TILE, INTERPRETER_BLOCK_F, FWD_PER_THREAD)
    return _blocks(dim, GPU_TILE, GPU_BLOCK_F, FWD_PER_THREAD)


def _bwd_blocks(dim: int) -> tuple[int, int, int]:
    if interpreter_on():
        return _blocks(dim, INTERPRETER_TILE, INTERPRETER_BLOCK_F, BWD_PER_THREAD)
    return _blocks(dim, GPU_BWD_TILE, GPU_BLOCK_F, BWD_PER_THREAD)


def _bwd_programs(num_rows: int, block_r: int, col_blocks: int, device: torch.device) -> tuple[int, int]:
    """``(G, rows_per_program)``: about ``PROGRAMS_PER_SM * SMs / col_blocks`` row programs on CUDA, each a
    whole number of row tiles."""
    if device.type == "cuda" and not interpreter_on():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = triton.cdiv(PROGRAMS_PER_SM * sms, col_blocks)
    else:
        target = INTERPRETER_ROW_PROGRAMS
    return split_rows(num_rows, block_r, target)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``fastmae::bias_gelu``: ``x (..., F)``, ``bias (F,)`` -> ``gelu(x + bias) (..., F)`` in x's dtype."""
    x, bias = x.contiguous(), bias.contiguous()
    dim = x.shape[-1]
    num_rows = x.numel() // dim  # R
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (..., F)
    block_r, block_f, num_warps = _fwd_blocks(dim)
    if num_rows > 0:
        _bias_gelu_fwd_kernel[(triton.cdiv(num_rows, block_r), triton.cdiv(dim, block_f))](
            x, bias, out, num_rows, dim, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=num_warps)
    return out


def bias_gelu_backward(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastmae::bias_gelu_backward``: ``grad (..., F)`` (of the output), ``x (..., F)``, ``bias (F,)`` ->
    ``(grad_x (..., F)`` in x's dtype, ``grad_bias (F,)`` in the bias's dtype)."""
    grad, x, bias = grad.contiguous(), x.contiguous(), bias.contiguous()
    dim = x.shape[-1]
    num_rows = x.numel() // dim  # R
    block_r, block_f, num_warps = _bwd_blocks(dim)
    col_blocks = triton.cdiv(dim, block_f)
    programs, rows_per_program = (_bwd_programs(num_rows, block_r, col_blocks, x.device) if num_rows > 0
                                  else (0, block_r))
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (..., F)
    partial = torch.empty((programs, dim), dtype=torch.float32, device=x.device)  # (G, F)
    grad_bias = torch.empty((dim,), dtype=bias.dtype, device=x.device)
    if programs > 0:
        _bias_gelu_bwd_kernel[(programs, col_blocks)](
            grad, x, bias, grad_x, partial, num_rows, dim, rows_per_program,
            BLOCK_R=block_r, BLOCK_F=block_f, num_warps=num_warps)
    column_sum(partial, grad_bias, programs, dim, RED_BLOCK_P, RED_BLOCK_F)
    return grad_x, grad_bias


def _aot() -> list[AotKernel]:
    """The GPU configuration (every MAE hidden width has F >= 256: one BLOCK_F), with the bias in h's dtype
    and, as under autocast (a bf16/fp16 GEMM output and the fp32 fc1.bias), in fp32."""
    fwd_r, block_f, fwd_warps = _blocks(GPU_BLOCK_F, GPU_TILE, GPU_BLOCK_F, FWD_PER_THREAD)
    bwd_r, _, bwd_warps = _blocks(GPU_BLOCK_F, GPU_BWD_TILE, GPU_BLOCK_F, BWD_PER_THREAD)
    kernels = []
    for label, bias_type in (("", "*{dtype}"), ("autocast", "*fp32")):
        kernels += [
            AotKernel(fn=_bias_gelu_fwd_kernel, overrides={"bias_ptr": bias_type},
                      constexprs={"BLOCK_R": fwd_r, "BLOCK_F": block_f}, num_warps=fwd_warps, label=label),
            AotKernel(fn=_bias_gelu_bwd_kernel, overrides={"partial_ptr": "*fp32", "bias_ptr": bias_type},
                      constexprs={"BLOCK_R": bwd_r, "BLOCK_F": block_f}, num_warps=bwd_warps, label=label),
            AotKernel(fn=column_sum_kernel, overrides=column_sum_types(bias_type),
                      constexprs={"BLOCK_P": RED_BLOCK_P, "BLOCK_D": RED_BLOCK_F, "SLABS": 1}, num_warps=4,
                      label=f"bias-{label}" if label else "bias"),
        ]
    return kernels


AOT_KERNELS = _aot()
