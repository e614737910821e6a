"""What the Triton kernels share.

The kernels run on CUDA tensors and, under the Triton interpreter (``TRITON_INTERPRET=1``, set before the
kernels are defined; tests only), on CPU tensors. Loads are cast to fp32 and results cast back, so bf16, fp16
and fp32 inputs all accumulate in fp32 (the interpreter has no bf16 arithmetic).
"""

from __future__ import annotations

import os


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def split_rows(num_rows: int, block_r: int, target: int) -> tuple[int, int]:
    """``(G, rows_per_program)``: ``num_rows > 0`` rows split over about ``target`` programs, each a whole number
    of ``block_r``-row tiles (the row split of the backward kernels that write per-program partial sums)."""
    tiles = -(-num_rows // block_r)  # ceil division; this module imports without Triton
    rows_per_program = -(-tiles // target) * block_r
    return -(-num_rows // rows_per_program), rows_per_program
