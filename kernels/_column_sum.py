"""Column sums of fp32 partial rows in a fixed order: the last step of the backward reductions that
avoid atomics (unshuffle's mask-token gradient, linear_gelu's bias gradient).

Those backward kernels have each program write one row of fp32 partial sums, ``partial (G, D)``;
``column_sum_kernel``, grid ``(cdiv(D, BLOCK_D),)``, adds the ``G`` rows ``BLOCK_P`` at a time, always
in the same order, so the result is bit-identical run to run. Bytes moved: ``4*G*D`` read,
``D*e`` written. ``G`` is small (hundreds to a few thousand rows), so few programs suffice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._common import wrap_triton


@triton.jit
def column_sum_kernel(
    partial_ptr,  # (G, D) fp32, contiguous
    out_ptr,  # (D,) the result's dtype
    num_partials,  # G
    dim,  # D
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    col_ok = cols < dim
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for start in range(0, num_partials, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
        ok = (parts < num_partials)[:, None] & col_ok[None, :]
        acc += tl.load(partial_ptr + parts[:, None] * dim + cols[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=col_ok)


def column_sum(partial: torch.Tensor, out: torch.Tensor, num_partials: int, dim: int, block_p: int,
               block_d: int) -> None:
    """``out = partial.sum(0)`` in a fixed order, launched from inside a ``triton_op``: ``partial`` holds
    ``G x D`` contiguous fp32 values, ``out`` ``D`` values in its own dtype (any shapes with those sizes:
    the tensors are passed as they are, no views)."""
    wrap_triton(column_sum_kernel)[(triton.cdiv(dim, block_d),)](
        partial, out, num_partials, dim, BLOCK_P=block_p, BLOCK_D=block_d)


SIGNATURE = {"partial_ptr": "*fp32", "out_ptr": "*{dtype}", "num_partials": "i32", "dim": "i32",
             "BLOCK_P": "constexpr", "BLOCK_D": "constexpr"}
