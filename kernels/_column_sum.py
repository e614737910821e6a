"""Column sums of fp32 partial rows in a fixed order: the last step of the backward reductions that
avoid atomics (layer_norm's weight and bias gradients, unshuffle's mask-token gradient, linear_gelu's bias
gradient).

Those backward kernels have each program write one row of fp32 partial sums per reduced quantity,
``partial (SLABS, G, D)``: one slab, or two (layer_norm: the sums of ``g * xhat`` and of ``g``).
``column_sum_kernel``, grid ``(cdiv(D, BLOCK_D), SLABS)``, adds the ``G`` rows of slab ``k`` ``BLOCK_P`` at a
time, always in the same order, into output ``k``, so the result is bit-identical run to run. Bytes moved:
``4*SLABS*G*D`` read, ``SLABS*D*e`` written. ``G`` is small (hundreds to a few thousand rows), so few programs
suffice. ``SLABS`` is a constexpr: with one slab the kernel has no second grid axis and no branch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def column_sum_kernel(
    partial_ptr,  # (SLABS, G, D) fp32, contiguous
    out_ptr,  # (D,) the sum of slab 0, in its own dtype
    out2_ptr,  # (D,) the sum of slab 1, in its own dtype; out_ptr again (unwritten here) when SLABS = 1
    num_partials,  # G
    dim,  # D
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SLABS: tl.constexpr,  # 1 or 2
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    col_ok = cols < dim
    slab = 0
    if SLABS > 1:
        slab = tl.program_id(1)
    slab_ptr = partial_ptr + slab * num_partials * dim
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for start in range(0, num_partials, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
        ok = (parts < num_partials)[:, None] & col_ok[None, :]
        acc += tl.load(slab_ptr + parts[:, None] * dim + cols[None, :], mask=ok, other=0.0)
    total = tl.sum(acc, axis=0)  # (BLOCK_D,)
    if slab == 0:
        tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)
    else:
        tl.store(out2_ptr + cols, total.to(out2_ptr.dtype.element_ty), mask=col_ok)


def column_sum(partial: torch.Tensor, out: torch.Tensor, num_partials: int, dim: int, block_p: int,
               block_d: int, out2: torch.Tensor | None = None) -> None:
    """``out = partial[0].sum(0)`` (and ``out2 = partial[1].sum(0)`` when given) in a fixed order: ``partial``
    holds ``SLABS x G x D`` contiguous fp32 values (two slabs with ``out2``, else one), ``out`` and ``out2``
    ``D`` values each in its own dtype (any shapes with those sizes: the tensors are passed as they are, no
    views)."""
    slabs = 1 if out2 is None else 2
    column_sum_kernel[(triton.cdiv(dim, block_d), slabs)](
        partial, out, out if out2 is None else out2, num_partials, dim, BLOCK_P=block_p, BLOCK_D=block_d,
        SLABS=slabs)


def aot_overrides(out_type: str = "*{dtype}") -> dict[str, str]:
    """The AotKernel types of column_sum_kernel besides the derived ones, both outputs typed ``out_type``."""
    return {"partial_ptr": "*fp32", "out_ptr": out_type, "out2_ptr": out_type}
