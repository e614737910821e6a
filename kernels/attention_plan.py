"""How the attention kernels (kernels/attention.py) tile one ``(S, Dh)``: :class:`AttentionPlan` and the
plan the ops use, :func:`default_plan`.

Tiles are powers of two; :func:`two_parts` covers the keys and the head dim each with a main tile and an
optional smaller one where one tile would pad much (S 65 = 64 + 16, S 257 = 256 + 16, Dh 80 = 64 + 16).
A plan also picks the forward's form (whole K/V in the tiles, or the keys walked ``fwd_loop`` at a time),
its query rows and warps, and the backward's form (fused: one program a head; split: dK/dV and dQ
launches) with their blocks and warps. :func:`default_plan` follows what ``bench/tune_attention.py``
measured fastest at MAE's shapes (the search space: kernels/attention_tuning.py) and, elsewhere, a rule
that keeps sm_80 and sm_90 free of register spills (``python -m fastmae.kernels.aot``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import triton

MAX_S = 512  # the whole K/V of a head in the forward's tiles
MAX_HEAD_DIM = 128
FUSED_BWD_MAX_TILE = 64 * 64  # keys * head dim (both padded) up to which the default backward is fused


def two_parts(size: int) -> tuple[int, int]:
    """``(main, extra)`` powers of two (at least 16; extra 0 = none) with ``main + extra >= size``: the
    largest power of two not above ``size`` plus the smallest one covering the rest, or one tile
    ``next_pow2(size)`` where two parts would not be smaller. 65 -> (64, 16), 80 -> (64, 16),
    257 -> (256, 16), 50 -> (64, 0), 197 -> (256, 0)."""
    whole = max(16, triton.next_power_of_2(size))
    main = max(16, whole // 2 if whole > size else whole)
    rest = size - main
    if rest <= 0:
        return whole, 0
    extra = max(16, triton.next_power_of_2(rest))
    return (main, extra) if main + extra < whole else (whole, 0)


@dataclass(frozen=True)
class AttentionPlan:
    """How the kernels tile one ``(S, Dh)``: the key and head-dim parts (each ``(main, extra)``, extra 0 =
    none), the forward's query rows and warps, and the backward's form with its blocks and warps."""

    key_parts: tuple[int, int]
    dim_parts: tuple[int, int]
    fwd_block_m: int
    fwd_warps: int
    fwd_loop: int  # 0: the whole K/V in the forward's tiles (key_parts); else keys walked this many at a time
    bwd_fused: bool
    bwd_block_m: int  # fused: queries per step of the loop
    bwd_warps: int  # fused
    dkdv_block: int  # split: keys per dK/dV program
    dkdv_step: int  # split: queries per step of the dK/dV loop
    dkdv_warps: int
    dq_block: int  # split: queries per dQ program
    dq_step: int  # split: keys per step of the dQ loop
    dq_warps: int

    def check(self, seq: int, head_dim: int) -> None:
        """ValueError unless the parts cover ``seq`` and ``head_dim`` and every block is a power of two >= 16."""
        if sum(self.key_parts) < seq or sum(self.dim_parts) < head_dim:
            raise ValueError(f"plan's key parts {self.key_parts} / head-dim parts {self.dim_parts} do not cover "
                             f"S = {seq}, Dh = {head_dim}")
        blocks = [*self.key_parts, *self.dim_parts, self.fwd_block_m, self.fwd_loop, self.bwd_block_m,
                  self.dkdv_block, self.dkdv_step, self.dq_block, self.dq_step]
        if any(b and (b < 16 or b & (b - 1)) for b in blocks) or not self.key_parts[0] or not self.dim_parts[0]:
            raise ValueError(f"plan blocks must be powers of two >= 16 (extra parts may be 0), got {self}")


@cache  # called twice per forward+backward; building the plan took 9.5 us of host time on a 2-core CPU
def default_plan(seq: int, head_dim: int) -> AttentionPlan:
    """The plan the ops use: tiles from :func:`two_parts`, and the launches ``bench/tune_attention.py`` measured
    fastest at MAE's (S, Dh) on an H200 (bf16, batch 256; bench/results/nvidia-h200-attention-tuning.csv):
    at (50, 64), (65, 80), (197, 32) and (257, 32) this is the sweep's tuned plan.

    Forward: keys walked 32 at a time (online softmax) where the head dim is one tile or K exceeds 128 x 64
    (keys x head dim), with 128 query rows where the keys are one tile of 256 or more at head dims up to 64,
    else 64; the whole-K/V forward for a head dim in two parts over a smaller K (ViT-H's S 65, Dh 80 = 64 + 16).
    Backward: fused where K, V, dK and dV fit a program (``keys * head dim <= FUSED_BWD_MAX_TILE``, head dim in
    one part: the ViT-B/L encoder), else split with dK/dV over 64 keys stepping 16 queries and dQ over 64
    queries stepping 32 keys (16 past a head dim of 64), 4 warps each; 32-row blocks and 8 warps at head dims
    above 80. Only MAE's shapes are measured; elsewhere the rule keeps sm_80 and sm_90 free of spills (Triton 3.8,
    checked for S in {17, 100, 320, 512} x Dh in {16, 48, 96, 128}); at MAE's shapes none with Triton 3.8 or 3.6
    (``python -m fastmae.kernels.aot``)."""
    key_parts, dim_parts = two_parts(seq), two_parts(head_dim)
    keys, depth = sum(key_parts), sum(dim_parts)
    one_dim_tile = dim_parts[1] == 0
    wide = depth > 80
    return AttentionPlan(
        key_parts=key_parts, dim_parts=dim_parts,
        fwd_block_m=128 if one_dim_tile and depth <= 64 and key_parts[1] == 0 and keys >= 256 else 64,
        fwd_warps=4,
        fwd_loop=32 if one_dim_tile or keys * depth > 128 * 64 else 0,
        bwd_fused=keys * depth <= FUSED_BWD_MAX_TILE and one_dim_tile,
        bwd_block_m=32, bwd_warps=4,
        dkdv_block=32 if wide else 64, dkdv_step=16, dkdv_warps=8 if wide else 4,
        dq_block=32 if wide else 64, dq_step=16 if depth > 64 else 32, dq_warps=8 if wide else 4,
    )
