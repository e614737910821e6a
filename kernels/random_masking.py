"""random_masking in Triton: rank, ``ids_keep``, ``ids_restore`` and ``mask`` in one launch.

Fused: the two argsorts of the reference (shuffle, then its inverse), the slice to ``len_keep`` and
the mask. Grid ``(N,)``: one program per sample ranks its ``L <= 1024`` noise values by counting,
``rank[l] = #{m : noise[m] < noise[l] or (noise[m] == noise[l] and m < l)}`` (NaN after everything,
NaNs among themselves by index: what ``torch.argsort(stable=True)`` does). That rank is the position
of ``l`` in the stable ascending sort, so it *is* ``ids_restore[n, l]``; ``mask = rank >= K``, and
``ids_keep[n, rank[l]] = l`` for ``rank < K`` (ranks are a permutation: every slot written once).

The whole row sits in registers as a ``(BLOCK_L,)`` vector; the program walks it in row blocks of
``BLOCK_I`` and compares each block against the whole row, a ``(BLOCK_I, BLOCK_L)`` tile of at most
``_TILE`` elements (32 per thread at 4 warps, no spills), counting along the row. ``L^2`` compares per
sample (64 Ki at L=256, 1 Mi at L=1024): compute-bound, a few microseconds at MAE's sizes.

Philox mode (``random_masking_philox``): no noise tensor exists. The noise of patch ``l`` of sample
``n`` at training ``step`` is Triton's Philox4x32-10 (``tl.philox``, the 32-bit variant on every
Triton version) with key ``seed`` (64 bit) and counter ``(n*L + l, step, 0, 0)``, first output word
mapped to ``[0, 1)`` as ``tl.rand`` maps it -- counter-based, so the masks of any (seed, step) are reproduced
after a resume without replaying the stream. The row block's noise is regenerated in registers
(``2*L`` Philox evaluations per sample) instead of being kept in memory.
:func:`fastmae.ops.random_masking.philox_noise_reference` computes the same numbers in torch.

Bytes moved per call (``e``: element size of noise): noise mode ``N*L*e`` read (the row-block re-read
hits L1/L2) + ``N*L*8`` (ids_restore) + ``N*L*4`` (mask) + ``N*K*8`` (ids_keep) written; Philox mode
the writes only.

Choices: counting instead of a bitonic sort -- ties and NaN are resolved exactly as the stable
reference without an index payload, and at ``L <= 1024`` the quadratic compare count costs less than
the writes. Comparisons in fp32 (bf16/fp16 -> fp32 is exact and order-preserving). ``BLOCK_L`` is
the next power of two of L, ``BLOCK_I = _TILE // BLOCK_L``: MAE's 196 and 256 patches share one
configuration. No gradient: the outputs are indices and a 0/1 mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels.aot import AotKernel

MAX_PATCHES = 1024  # the whole row lives in registers
_TILE = 4096  # elements of one (BLOCK_I, BLOCK_L) comparison tile


@triton.jit
def _rank_and_store(
    noise_blk,  # (BLOCK_I,) fp32: noise of the rows of this block
    rows,  # (BLOCK_I,) patch indices of the block
    noise_row,  # (BLOCK_L,) fp32: noise of the whole row
    cols,  # (BLOCK_L,) patch indices 0..BLOCK_L-1
    n,  # sample (int64)
    ids_keep_ptr,  # (N, K) int64
    ids_restore_ptr,  # (N, L) int64
    mask_ptr,  # (N, L) fp32
    num_patches,  # L
    num_keep,  # K
):
    row_ok = rows < num_patches
    a = noise_blk[:, None]  # (BLOCK_I, 1): the patch being ranked
    b = noise_row[None, :]  # (1, BLOCK_L): the patches it is compared with
    a_nan = a != a
    b_nan = b != b
    earlier = cols[None, :] < rows[:, None]  # (BLOCK_I, BLOCK_L)
    tie = (a == b) | (a_nan & b_nan)
    before = (b < a) | (a_nan & ~b_nan) | (tie & earlier)  # b sorts before a (stable, NaN last)
    before = before & (cols < num_patches)[None, :]
    rank = tl.sum(before.to(tl.int32), axis=1)  # (BLOCK_I,) = ids_restore
    tl.store(ids_restore_ptr + n * num_patches + rows, rank.to(tl.int64), mask=row_ok)
    tl.store(mask_ptr + n * num_patches + rows, (rank >= num_keep).to(tl.float32), mask=row_ok)
    tl.store(ids_keep_ptr + n * num_keep + rank, rows.to(tl.int64), mask=row_ok & (rank < num_keep))


@triton.jit
def _random_masking_kernel(
    noise_ptr,  # (N, L) contiguous
    ids_keep_ptr,  # (N, K) int64
    ids_restore_ptr,  # (N, L) int64
    mask_ptr,  # (N, L) fp32
    num_patches,  # L
    num_keep,  # K
    BLOCK_L: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    row_ptr = noise_ptr + n * num_patches
    cols = tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    noise_row = tl.load(row_ptr + cols, mask=cols < num_patches, other=0.0).to(tl.float32)
    for start in range(0, num_patches, BLOCK_I):
        rows = start + tl.arange(0, BLOCK_I)  # (BLOCK_I,)
        noise_blk = tl.load(row_ptr + rows, mask=rows < num_patches, other=0.0).to(tl.float32)
        _rank_and_store(noise_blk, rows, noise_row, cols, n, ids_keep_ptr, ids_restore_ptr, mask_ptr,
                        num_patches, num_keep)


@triton.jit
def _philox_uniform(seed, step, counter):
    """fp32 in [0, 1) from Philox4x32-10, key ``seed``, counter ``(counter, step, 0, 0)`` as uint32 words.

    Spelled out with ``tl.philox`` rather than ``tl.rand(seed, step * 2**32 + counter)``: Triton before
    3.4 switched an int64 offset to the 64-bit Philox, which would change the masks across versions."""
    c0 = counter.to(tl.uint32)
    zero = c0 * 0
    r, _, _, _ = tl.philox(seed, c0, zero + step.to(tl.uint32), zero, zero)
    return tl.uint_to_uniform_float(r)


@triton.jit
def _random_masking_philox_kernel(
    ids_keep_ptr,  # (N, K) int64
    ids_restore_ptr,  # (N, L) int64
    mask_ptr,  # (N, L) fp32
    seed_step_ptr,  # (2,) int64: the Philox key 0 <= seed < 2**63, counter word 1 0 <= step < 2**31
    num_patches,  # L
    num_keep,  # K
    BLOCK_L: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    seed = tl.load(seed_step_ptr)  # read on the device: a captured CUDA graph advances the step in place
    step = tl.load(seed_step_ptr + 1)
    n = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    noise_row = _philox_uniform(seed, step, n * num_patches + cols)  # (BLOCK_L,) columns >= L never counted
    for start in range(0, num_patches, BLOCK_I):
        rows = start + tl.arange(0, BLOCK_I)  # (BLOCK_I,)
        noise_blk = _philox_uniform(seed, step, n * num_patches + rows)  # (BLOCK_I,) the same numbers
        _rank_and_store(noise_blk, rows, noise_row, cols, n, ids_keep_ptr, ids_restore_ptr, mask_ptr,
                        num_patches, num_keep)


def _blocks(num_patches: int) -> tuple[int, int]:
    """``(BLOCK_L, BLOCK_I)`` for ``L`` patches: the whole row, and rows per ``_TILE``-element tile."""
    block_l = triton.next_power_of_2(num_patches)
    return block_l, max(1, _TILE // block_l)


def _empty_outputs(n: int, num_patches: int, num_keep: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids_keep = torch.empty((n, num_keep), dtype=torch.int64, device=device)
    ids_restore = torch.empty((n, num_patches), dtype=torch.int64, device=device)
    mask = torch.empty((n, num_patches), dtype=torch.float32, device=device)
    return ids_keep, ids_restore, mask


def random_masking(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fastmae::random_masking``: ``noise (N, L)``, ``L <= 1024`` -> ``ids_keep (N, K)``, ``ids_restore (N, L)``
    int64, ``mask (N, L)`` fp32."""
    noise = noise.contiguous()
    n, num_patches = noise.shape
    ids_keep, ids_restore, mask = _empty_outputs(n, num_patches, len_keep, noise.device)
    block_l, block_i = _blocks(num_patches)
    _random_masking_kernel[(n,)](
        noise, ids_keep, ids_restore, mask, num_patches, len_keep, BLOCK_L=block_l, BLOCK_I=block_i)
    return ids_keep, ids_restore, mask


def random_masking_philox(seed_step: torch.Tensor, num_samples: int, num_patches: int,
                          len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fastmae::random_masking_philox``: ``seed_step (2,)`` int64 ``[seed, step]`` on the target device ->
    ``ids_keep (N, K)``, ``ids_restore (N, L)`` int64, ``mask (N, L)`` fp32 from the Philox noise of
    ``(seed, step)``; ``L <= 1024``."""
    ids_keep, ids_restore, mask = _empty_outputs(num_samples, num_patches, len_keep, seed_step.device)
    block_l, block_i = _blocks(num_patches)
    _random_masking_philox_kernel[(num_samples,)](
        ids_keep, ids_restore, mask, seed_step, num_patches, len_keep, BLOCK_L=block_l, BLOCK_I=block_i)
    return ids_keep, ids_restore, mask


_OUTS = {"ids_keep_ptr": "*i64", "ids_restore_ptr": "*i64", "mask_ptr": "*fp32"}
_PHILOX = {**_OUTS, "seed_step_ptr": "*i64"}
# MAE's 196 (patch 16 at 224 px, patch 14 at 196 px) and 256 (patch 14 at 224 px) patches share
# BLOCK_L=256, BLOCK_I=16; the 1024-patch limit takes BLOCK_L=1024, BLOCK_I=4. Noise from
# torch.rand is fp32: the "*fp32" noise entries compile that case too (the tool varies only "{dtype}").
_MAE = dict(zip(("BLOCK_L", "BLOCK_I"), _blocks(196)))
_MAX = dict(zip(("BLOCK_L", "BLOCK_I"), _blocks(MAX_PATCHES)))
AOT_KERNELS = [
    AotKernel(fn=_random_masking_kernel, overrides=_OUTS, constexprs=_MAE, label="L196-256"),
    AotKernel(fn=_random_masking_kernel, overrides={**_OUTS, "noise_ptr": "*fp32"}, constexprs=_MAE,
              label="L196-256-fp32"),
    AotKernel(fn=_random_masking_kernel, overrides=_OUTS, constexprs=_MAX, label="L1024"),
    AotKernel(fn=_random_masking_kernel, overrides={**_OUTS, "noise_ptr": "*fp32"}, constexprs=_MAX,
              label="L1024-fp32"),
    AotKernel(fn=_random_masking_philox_kernel, overrides=_PHILOX, constexprs=_MAE, label="L196-256"),
    AotKernel(fn=_random_masking_philox_kernel, overrides=_PHILOX, constexprs=_MAX, label="L1024"),
]
