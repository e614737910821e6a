"""The tiling search space of the attention kernels: the alternatives to
:func:`fastmae.kernels.attention_plan.default_plan` that ``bench/tune_attention.py`` times on a GPU."""

from __future__ import annotations

from dataclasses import replace

import triton

from fastmae.kernels.attention_plan import AttentionPlan, default_plan


def _split_blocks() -> list[tuple[int, int, int]]:
    """(block owned, step of the loop, warps) of the split backward's launches that the sweep tries."""
    return [(b, t, w) for b in (16, 32, 64) for t in (16, 32, 64) for w in (4, 8)]


def tuning_plans(seq: int, head_dim: int) -> dict[str, list[AttentionPlan]]:
    """The alternatives to :func:`default_plan` that ``bench/tune_attention.py`` times, by the launch they
    vary: "forward" (query rows, warps, keys in two parts or one tile or walked 16/32/64 at a time with an
    online softmax), "fused backward" (query rows, warps, keys in two parts or one tile; the
    backward fused), "dkdv" and "dq" (block, step, warps; the backward split). Each is the default plan with
    those fields replaced, so a "dkdv" plan also takes the split form where the default is fused."""
    base = default_plan(seq, head_dim)
    key_choices = sorted({base.key_parts, (max(16, triton.next_power_of_2(seq)), 0)})
    split = replace(base, bwd_fused=False)
    return {
        "forward": [*(replace(base, key_parts=keys, fwd_block_m=m, fwd_warps=w, fwd_loop=0)
                      for keys in key_choices for m in (16, 32, 64, 128) for w in (4, 8)),
                    *(replace(base, fwd_loop=b, fwd_block_m=m, fwd_warps=w)
                      for b in (16, 32, 64) for m in (32, 64, 128) for w in (4, 8))],
        "fused backward": [replace(base, key_parts=keys, bwd_fused=True, bwd_block_m=m, bwd_warps=w)
                           for keys in key_choices for m in (16, 32) for w in (4, 8)],
        "dkdv": [replace(split, dkdv_block=b, dkdv_step=t, dkdv_warps=w) for b, t, w in _split_blocks()],
        "dq": [replace(split, dq_block=b, dq_step=t, dq_warps=w) for b, t, w in _split_blocks()],
    }
