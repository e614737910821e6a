"""attention in Triton: softmax((q @ k^T) * Dh**-0.5) @ v per head, read in place from the packed qkv.

``qkv (N, S, 3*H*Dh)`` is the qkv Linear's output (last dim packed as ``(3, H, Dh)``, unit stride);
q, k and v of head ``h`` are read with strides (no transposes, no copies); the output is written as
``(N, S, H*Dh)``, ready for the projection, and the gradient as ``d(qkv) (N, S, 3*H*Dh)``.

Tiles in two parts. Triton tiles are powers of two; padding MAE's sizes to one would waste much of the
work (ViT-H's S = 65 -> 128 and Dh = 80 -> 128: 3.2x the score FLOPs; S = 257 -> 512: 2x). So the keys
and the head dim are each covered by a main tile and an optional smaller one (:func:`two_parts`):
S 65 = 64 + 16, S 257 = 256 + 16, Dh 80 = 64 + 16 (S 50 -> 64, S 197 -> 256, Dh 32/64 stay one tile).
Two head-dim parts make each product two ``tl.dot``s summed (q @ k^T) or two outputs (P @ V); two key
parts give two score tiles whose softmax is still exact: one max and one sum over both.

Grids are one-dimensional, a program's (block, head) split from its id with the blocks of one head
adjacent (CUDA caps a grid's second dimension at 65535; N*H can exceed it).

Forward, ``cdiv(S, BLOCK_M) * N*H`` programs: S <= MAX_S, so a program holds the whole K and V of its
head and ``BLOCK_M`` query rows: the score tiles in fp32, an exact (not online) softmax in fp32,
``P @ V``, and the logsumexp ``lse (N, H, S)`` fp32 saved for the backward. A second forward
(``AttentionPlan.fwd_loop``) walks the keys a block at a time with flash-attention's online softmax:
smaller tiles, keys padded to a multiple of the block only (the default where the head dim is one tile: on
an H200 the fastest looped forward took 0.70x / 0.85x the fastest whole-K/V one's time at the decoders, S 197
/ 257, 0.96-0.97x at S 50; at ViT-H's Dh 80 = 64 + 16 it took 1.22x).

Backward, no atomics, two forms (:class:`AttentionPlan`):
  * fused (small heads: ``keys * head dim`` up to 64*64, head dim in one part), ``N*H`` programs, one a
    head: it holds K, V, dK and dV and walks the queries ``BLOCK_M`` at a time, recomputing ``P`` from the lse; each query
    block's row of ``P`` is whole, so ``delta = rowsum(P * dP)`` (equal to ``rowsum(dO * O)``) needs
    neither O nor a pre-pass, and dQ is written straight away. One launch, q/k/v/dO each read once.
  * split (larger heads), flash-attention-2's three launches: ``delta = rowsum(dO * O)`` ``(N, H, S)``;
    dK/dV, ``cdiv(S, B) * N*H`` programs, one owns B keys and walks all queries T at a time; dQ,
    ``cdiv(S, B') * N*H`` programs, one owns B' queries and walks all keys T' at a time. Keys come in
    blocks here, so only the head dim is in parts.
  Both write ``d(qkv)`` in the packed layout.

:func:`default_plan` picks the tiles, blocks and warps: at MAE's shapes the ones ``bench/tune_attention.py``
measured fastest on an H200 (no spills on sm_80/sm_90 with Triton 3.8 or 3.6: ``python -m fastmae.kernels.aot``).

Matmuls accumulate in fp32; softmax, its statistics and the gradients' elementwise math are fp32.
fp32 inputs use exact fp32 products (``input_precision="ieee"``). bf16/fp16 inputs on a GPU feed the
tensor cores in their own dtype, with P and dS rounded to it before their matmuls (as flash-attention
does); under the interpreter (whose bf16 ``tl.dot`` is wrong in Triton 3.8) they are multiplied in fp32.

Bytes moved (``e``: element size of qkv; ``T = N*S*H*Dh``; ``c(b) = cdiv(S, b)``):
  forward  = T*e (q) + c(BLOCK_M)*2*T*e (k, v per query block) + T*e (out) + 4*N*H*S (lse)
  fused backward = 4*T*e (q, k, v, dO) + 4*N*H*S (lse) + 3*T*e (dqkv)
  split backward = 2*T*e + 4*N*H*S (delta)
             + 2*T*e + c(B)*(2*T*e + 8*N*H*S) + 2*T*e (dK/dV: k, v; q, dO, lse, delta per key block)
             + 2*T*e + 8*N*H*S + c(B')*2*T*e + T*e (dQ: q, dO, stats; k, v per query block)
  (at MAE's S <= 257 the re-reads of one head's q/k/v/dO, <= 66 KB, hit L2.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch
import triton
import triton.language as tl

from fastmae.kernels._common import interpreter_on, wrap_triton
from fastmae.kernels.aot import AotKernel

MAX_S = 512  # the whole K/V of a head in the forward's tiles
MAX_HEAD_DIM = 128
FUSED_BWD_MAX_TILE = 64 * 64  # keys * head dim (both padded) up to which the default backward is fused
DELTA_BLOCK = 64  # split backward: rows per program of the delta preprocess


@triton.jit
def _dot(a, b, NATIVE: tl.constexpr):
    """``a @ b`` accumulated in fp32; ``b`` is in the input dtype, ``a`` in it or fp32. NATIVE (bf16/fp16 on a
    GPU): ``a`` rounded to b's dtype, tensor-core products; else fp32 operands, exact products."""
    if NATIVE:
        out = tl.dot(a.to(b.dtype), b)
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return out


@triton.jit
def _block_and_head(seq, BLOCK: tl.constexpr):
    """``(block, n*H + h)`` of this program in a 1-D grid of ``cdiv(S, BLOCK) * N*H`` programs, the blocks of
    one head adjacent (they share its K/V in L2). One dimension: CUDA caps the second at 65535, N*H is not."""
    num_blocks = tl.cdiv(seq, BLOCK)
    pid = tl.program_id(0)
    return pid % num_blocks, pid // num_blocks


@triton.jit
def _load(ptr, rows, row_ok, row_stride, col0, num_cols, BLOCK_C: tl.constexpr):
    """``(len(rows), BLOCK_C)`` tile: columns ``col0 .. col0 + BLOCK_C`` of the given rows of a matrix with unit
    column stride, zero outside ``row_ok`` and past ``num_cols``."""
    cols = col0 + tl.arange(0, BLOCK_C)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :],
                   mask=row_ok[:, None] & (cols < num_cols)[None, :], other=0.0)


@triton.jit
def _load_parts(ptr, rows, row_ok, row_stride, num_cols, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """The head-dim parts of the given rows: ``(len(rows), BLOCK_D)`` and ``(len(rows), BLOCK_E)`` tiles (the
    second is the first again when BLOCK_E = 0, and then unused)."""
    x0 = _load(ptr, rows, row_ok, row_stride, 0, num_cols, BLOCK_D)
    x1 = x0
    if BLOCK_E > 0:
        x1 = _load(ptr, rows, row_ok, row_stride, BLOCK_D, num_cols, BLOCK_E)
    return x0, x1


@triton.jit
def _store(ptr, x, rows, row_ok, row_stride, col0, num_cols, BLOCK_C: tl.constexpr):
    """Writes the ``(len(rows), BLOCK_C)`` tile ``x`` where :func:`_load` reads, in ptr's dtype."""
    cols = col0 + tl.arange(0, BLOCK_C)
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols < num_cols)[None, :])


@triton.jit
def _scores(a0, a1, b0, b1, BLOCK_E: tl.constexpr, NATIVE: tl.constexpr):
    """``a @ b^T`` fp32 from the head-dim parts of both: ``a0 (R, BLOCK_D)``, ``b0 (C, BLOCK_D)`` and, when
    BLOCK_E > 0, ``a1 (R, BLOCK_E)``, ``b1 (C, BLOCK_E)`` (ignored otherwise) -> ``(R, C)``."""
    s = _dot(a0, tl.trans(b0), NATIVE)
    if BLOCK_E > 0:
        s += _dot(a1, tl.trans(b1), NATIVE)
    return s


@triton.jit
def _store_forward(out_ptr, lse_ptr, o0, o1, l, m, rows, row_ok, n, h, pid_nh, seq, width, head_dim,
                   BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """Both forwards' epilogue: ``out = o / l`` from the unnormalised head-dim parts ``o0 (BLOCK_M, BLOCK_D)``,
    ``o1 (BLOCK_M, BLOCK_E)`` (unused when BLOCK_E = 0), and ``lse = m + log(l)`` of the rows."""
    o_ptr = out_ptr + n * seq * width + h * head_dim
    _store(o_ptr, o0 / l[:, None], rows, row_ok, width, 0, head_dim, BLOCK_D)
    if BLOCK_E > 0:
        _store(o_ptr, o1 / l[:, None], rows, row_ok, width, BLOCK_D, head_dim, BLOCK_E)
    tl.store(lse_ptr + pid_nh.to(tl.int64) * seq + rows, m + tl.log(l), mask=row_ok)


@triton.jit
def _attention_fwd_kernel(
    qkv_ptr,  # (N, S, 3*H*Dh), unit stride in the last dim
    out_ptr,  # (N, S, H*Dh) contiguous
    lse_ptr,  # (N, H, S) fp32
    seq,  # S
    num_heads,  # H
    head_dim,  # Dh
    stride_n,  # qkv.stride(0)
    stride_s,  # qkv.stride(1)
    scale,  # Dh ** -0.5
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    NATIVE: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # torch.compile's inductor passes a Python float as fp64
    pid_m, pid_nh = _block_and_head(seq, BLOCK_M)
    n = (pid_nh // num_heads).to(tl.int64)
    h = pid_nh % num_heads
    width = num_heads * head_dim  # H*Dh
    q_ptr = qkv_ptr + n * stride_n + h * head_dim
    k_ptr = q_ptr + width
    v_ptr = q_ptr + 2 * width
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
    row_ok = rows < seq
    q0, q1 = _load_parts(q_ptr, rows, row_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_M, BLOCK_D|E)
    keys0 = tl.arange(0, BLOCK_N)  # (BLOCK_N,) the main key tile
    key0_ok = keys0 < seq
    k00, k01 = _load_parts(k_ptr, keys0, key0_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_N, BLOCK_D|E)
    v00, v01 = _load_parts(v_ptr, keys0, key0_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)
    s0 = _scores(q0, q1, k00, k01, BLOCK_E, NATIVE) * scale
    s0 = tl.where(key0_ok[None, :], s0, float("-inf"))  # (BLOCK_M, BLOCK_N)
    m = tl.max(s0, axis=1)  # (BLOCK_M,)
    if BLOCK_T > 0:
        keys1 = BLOCK_N + tl.arange(0, BLOCK_T)  # (BLOCK_T,) the tail key tile
        key1_ok = keys1 < seq
        k10, k11 = _load_parts(k_ptr, keys1, key1_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_T, BLOCK_D|E)
        v10, v11 = _load_parts(v_ptr, keys1, key1_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)
        s1 = _scores(q0, q1, k10, k11, BLOCK_E, NATIVE) * scale
        s1 = tl.where(key1_ok[None, :], s1, float("-inf"))  # (BLOCK_M, BLOCK_T)
        m = tl.maximum(m, tl.max(s1, axis=1))
    p0 = tl.exp(s0 - m[:, None])
    l = tl.sum(p0, axis=1)  # (BLOCK_M,)
    o0 = _dot(p0, v00, NATIVE)  # (BLOCK_M, BLOCK_D)
    o1 = o0  # unused when BLOCK_E = 0
    if BLOCK_E > 0:
        o1 = _dot(p0, v01, NATIVE)  # (BLOCK_M, BLOCK_E)
    if BLOCK_T > 0:
        p1 = tl.exp(s1 - m[:, None])
        l += tl.sum(p1, axis=1)
        o0 += _dot(p1, v10, NATIVE)
        if BLOCK_E > 0:
            o1 += _dot(p1, v11, NATIVE)
    _store_forward(out_ptr, lse_ptr, o0, o1, l, m, rows, row_ok, n, h, pid_nh, seq, width, head_dim,
                   BLOCK_D, BLOCK_E)


@triton.jit
def _attention_fwd_loop_kernel(
    qkv_ptr,  # (N, S, 3*H*Dh), unit stride in the last dim
    out_ptr,  # (N, S, H*Dh) contiguous
    lse_ptr,  # (N, H, S) fp32
    seq,  # S
    num_heads,  # H
    head_dim,  # Dh
    stride_n,  # qkv.stride(0)
    stride_s,  # qkv.stride(1)
    scale,  # Dh ** -0.5
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per step of the loop
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    NATIVE: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # torch.compile's inductor passes a Python float as fp64
    # The forward with the keys walked BLOCK_N at a time and an online softmax (running max m, sum l; the
    # output rescaled by exp(m_old - m_new) per step): smaller tiles than the whole-K/V kernel, keys padded
    # only to a multiple of BLOCK_N (S 197 -> 208 at 16), one rescale of (BLOCK_M, Dh) per step.
    pid_m, pid_nh = _block_and_head(seq, BLOCK_M)
    n = (pid_nh // num_heads).to(tl.int64)
    h = pid_nh % num_heads
    width = num_heads * head_dim  # H*Dh
    q_ptr = qkv_ptr + n * stride_n + h * head_dim
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
    row_ok = rows < seq
    q0, q1 = _load_parts(q_ptr, rows, row_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_M, BLOCK_D|E)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    o0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    o1 = o0  # unused when BLOCK_E = 0
    if BLOCK_E > 0:
        o1 = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    for start in range(0, seq, BLOCK_N):  # the first step has a valid key, so m is finite from then on
        keys = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        key_ok = keys < seq
        k0, k1 = _load_parts(q_ptr + width, keys, key_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_N, BLOCK_D|E)
        v0, v1 = _load_parts(q_ptr + 2 * width, keys, key_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)
        s = _scores(q0, q1, k0, k1, BLOCK_E, NATIVE) * scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # (BLOCK_M,)
        alpha = tl.exp(m - m_new)  # 0 at the first step
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        o0 = o0 * alpha[:, None] + _dot(p, v0, NATIVE)  # (BLOCK_M, BLOCK_D)
        if BLOCK_E > 0:
            o1 = o1 * alpha[:, None] + _dot(p, v1, NATIVE)  # (BLOCK_M, BLOCK_E)
        m = m_new
    _store_forward(out_ptr, lse_ptr, o0, o1, l, m, rows, row_ok, n, h, pid_nh, seq, width, head_dim,
                   BLOCK_D, BLOCK_E)


@triton.jit
def _attention_bwd_kernel(
    qkv_ptr,  # (N, S, 3*H*Dh), unit stride in the last dim
    dout_ptr,  # (N, S, H*Dh) contiguous
    lse_ptr,  # (N, H, S) fp32
    dqkv_ptr,  # (N, S, 3*H*Dh) contiguous
    seq,  # S
    num_heads,  # H
    head_dim,  # Dh
    stride_n,  # qkv.stride(0)
    stride_s,  # qkv.stride(1)
    scale,  # Dh ** -0.5
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    NATIVE: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # torch.compile's inductor passes a Python float as fp64
    # Tiles are named by (key part, head-dim part): k01 = main keys x extra dims. Tail-key tiles (k1*, v1*,
    # dk1*, dv1*) exist only when BLOCK_T > 0 and extra-dim accumulators (d*01, d*11) only when BLOCK_E > 0;
    # the extra-dim input tiles (k01, q1, ...) alias part 0 when BLOCK_E = 0 and are then unused.
    pid_nh = tl.program_id(0)
    n = (pid_nh // num_heads).to(tl.int64)
    h = pid_nh % num_heads
    width = num_heads * head_dim  # H*Dh
    q_ptr = qkv_ptr + n * stride_n + h * head_dim
    k_ptr = q_ptr + width
    v_ptr = q_ptr + 2 * width
    do_ptr = dout_ptr + n * seq * width + h * head_dim
    dq_ptr = dqkv_ptr + n * seq * 3 * width + h * head_dim
    stats = lse_ptr + pid_nh.to(tl.int64) * seq
    keys0 = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    key0_ok = keys0 < seq
    k00, k01 = _load_parts(k_ptr, keys0, key0_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_N, BLOCK_D|E)
    v00, v01 = _load_parts(v_ptr, keys0, key0_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)
    dk00 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv00 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if BLOCK_E > 0:
        dk01 = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
        dv01 = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    if BLOCK_T > 0:
        keys1 = BLOCK_N + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
        key1_ok = keys1 < seq
        k10, k11 = _load_parts(k_ptr, keys1, key1_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_T, BLOCK_D|E)
        v10, v11 = _load_parts(v_ptr, keys1, key1_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)
        dk10 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        dv10 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        if BLOCK_E > 0:
            dk11 = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
            dv11 = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for start in range(0, seq, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
        row_ok = rows < seq
        q0, q1 = _load_parts(q_ptr, rows, row_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_M, BLOCK_D|E)
        do0, do1 = _load_parts(do_ptr, rows, row_ok, width, head_dim, BLOCK_D, BLOCK_E)
        lse = tl.load(stats + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
        s0 = _scores(q0, q1, k00, k01, BLOCK_E, NATIVE) * scale  # (BLOCK_M, BLOCK_N)
        p0 = tl.where(row_ok[:, None] & key0_ok[None, :], tl.exp(s0 - lse[:, None]), 0.0)
        dp0 = _scores(do0, do1, v00, v01, BLOCK_E, NATIVE)
        delta = tl.sum(p0 * dp0, axis=1)  # (BLOCK_M,) = rowsum(dO * O): the whole row is here
        if BLOCK_T > 0:
            s1 = _scores(q0, q1, k10, k11, BLOCK_E, NATIVE) * scale  # (BLOCK_M, BLOCK_T)
            p1 = tl.where(row_ok[:, None] & key1_ok[None, :], tl.exp(s1 - lse[:, None]), 0.0)
            dp1 = _scores(do0, do1, v10, v11, BLOCK_E, NATIVE)
            delta += tl.sum(p1 * dp1, axis=1)
        ds0 = p0 * (dp0 - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dv00 += _dot(tl.trans(p0), do0, NATIVE)  # (BLOCK_N, BLOCK_D)
        dk00 += _dot(tl.trans(ds0), q0, NATIVE)
        dq0 = _dot(ds0, k00, NATIVE)  # (BLOCK_M, BLOCK_D)
        if BLOCK_E > 0:
            dv01 += _dot(tl.trans(p0), do1, NATIVE)  # (BLOCK_N, BLOCK_E)
            dk01 += _dot(tl.trans(ds0), q1, NATIVE)
            dq1 = _dot(ds0, k01, NATIVE)  # (BLOCK_M, BLOCK_E)
        if BLOCK_T > 0:
            ds1 = p1 * (dp1 - delta[:, None])  # (BLOCK_M, BLOCK_T)
            dv10 += _dot(tl.trans(p1), do0, NATIVE)  # (BLOCK_T, BLOCK_D)
            dk10 += _dot(tl.trans(ds1), q0, NATIVE)
            dq0 += _dot(ds1, k10, NATIVE)
            if BLOCK_E > 0:
                dv11 += _dot(tl.trans(p1), do1, NATIVE)  # (BLOCK_T, BLOCK_E)
                dk11 += _dot(tl.trans(ds1), q1, NATIVE)
                dq1 += _dot(ds1, k11, NATIVE)
        _store(dq_ptr, dq0 * scale, rows, row_ok, 3 * width, 0, head_dim, BLOCK_D)
        if BLOCK_E > 0:
            _store(dq_ptr, dq1 * scale, rows, row_ok, 3 * width, BLOCK_D, head_dim, BLOCK_E)
    dk_ptr = dq_ptr + width
    dv_ptr = dq_ptr + 2 * width
    _store(dk_ptr, dk00 * scale, keys0, key0_ok, 3 * width, 0, head_dim, BLOCK_D)
    _store(dv_ptr, dv00, keys0, key0_ok, 3 * width, 0, head_dim, BLOCK_D)
    if BLOCK_E > 0:
        _store(dk_ptr, dk01 * scale, keys0, key0_ok, 3 * width, BLOCK_D, head_dim, BLOCK_E)
        _store(dv_ptr, dv01, keys0, key0_ok, 3 * width, BLOCK_D, head_dim, BLOCK_E)
    if BLOCK_T > 0:
        _store(dk_ptr, dk10 * scale, keys1, key1_ok, 3 * width, 0, head_dim, BLOCK_D)
        _store(dv_ptr, dv10, keys1, key1_ok, 3 * width, 0, head_dim, BLOCK_D)
        if BLOCK_E > 0:
            _store(dk_ptr, dk11 * scale, keys1, key1_ok, 3 * width, BLOCK_D, head_dim, BLOCK_E)
            _store(dv_ptr, dv11, keys1, key1_ok, 3 * width, BLOCK_D, head_dim, BLOCK_E)


@triton.jit
def _attention_bwd_delta_kernel(
    out_ptr,  # (N, S, H*Dh) contiguous
    dout_ptr,  # (N, S, H*Dh) contiguous
    delta_ptr,  # (N, H, S) fp32: rowsum(dO * O)
    seq,  # S
    num_heads,  # H
    head_dim,  # Dh
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid_m, pid_nh = _block_and_head(seq, BLOCK_M)
    n = (pid_nh // num_heads).to(tl.int64)
    h = pid_nh % num_heads
    width = num_heads * head_dim
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < seq
    offs = n * seq * width + h * head_dim
    o0, o1 = _load_parts(out_ptr + offs, rows, row_ok, width, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_M, BLOCK_D|E)
    do0, do1 = _load_parts(dout_ptr + offs, rows, row_ok, width, head_dim, BLOCK_D, BLOCK_E)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), axis=1)  # (BLOCK_M,)
    if BLOCK_E > 0:
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), axis=1)
    tl.store(delta_ptr + pid_nh.to(tl.int64) * seq + rows, delta, mask=row_ok)


@triton.jit
def _attention_bwd_dkdv_kernel(
    qkv_ptr,  # (N, S, 3*H*Dh), unit stride in the last dim
    dout_ptr,  # (N, S, H*Dh) contiguous
    lse_ptr,  # (N, H, S) fp32
    delta_ptr,  # (N, H, S) fp32
    dqkv_ptr,  # (N, S, 3*H*Dh) contiguous: this kernel writes the k and v thirds
    seq,  # S
    num_heads,  # H
    head_dim,  # Dh
    stride_n,  # qkv.stride(0)
    stride_s,  # qkv.stride(1)
    scale,  # Dh ** -0.5
    BLOCK_N: tl.constexpr,  # keys this program owns
    BLOCK_M: tl.constexpr,  # queries per step of its loop
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    NATIVE: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # torch.compile's inductor passes a Python float as fp64
    pid_k, pid_nh = _block_and_head(seq, BLOCK_N)
    n = (pid_nh // num_heads).to(tl.int64)
    h = pid_nh % num_heads
    width = num_heads * head_dim
    q_ptr = qkv_ptr + n * stride_n + h * head_dim
    do_ptr = dout_ptr + n * seq * width + h * head_dim
    stats = pid_nh.to(tl.int64) * seq
    keys = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) this program's keys
    key_ok = keys < seq
    k0, k1 = _load_parts(q_ptr + width, keys, key_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_N, BLOCK_D|E)
    v0, v1 = _load_parts(q_ptr + 2 * width, keys, key_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if BLOCK_E > 0:
        dk1 = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    for start in range(0, seq, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
        row_ok = rows < seq
        q0, q1 = _load_parts(q_ptr, rows, row_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_M, BLOCK_D|E)
        do0, do1 = _load_parts(do_ptr, rows, row_ok, width, head_dim, BLOCK_D, BLOCK_E)
        lse = tl.load(lse_ptr + stats + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
        delta = tl.load(delta_ptr + stats + rows, mask=row_ok, other=0.0)
        st = _scores(k0, k1, q0, q1, BLOCK_E, NATIVE) * scale  # (BLOCK_N keys, BLOCK_M queries)
        pt = tl.where(key_ok[:, None] & row_ok[None, :], tl.exp(st - lse[None, :]), 0.0)
        dpt = _scores(v0, v1, do0, do1, BLOCK_E, NATIVE)  # (BLOCK_N keys, BLOCK_M queries)
        dst = pt * (dpt - delta[None, :])
        dv0 += _dot(pt, do0, NATIVE)  # (BLOCK_N, BLOCK_D)
        dk0 += _dot(dst, q0, NATIVE)
        if BLOCK_E > 0:
            dv1 += _dot(pt, do1, NATIVE)  # (BLOCK_N, BLOCK_E)
            dk1 += _dot(dst, q1, NATIVE)
    dk_ptr = dqkv_ptr + n * seq * 3 * width + width + h * head_dim
    dv_ptr = dk_ptr + width
    _store(dk_ptr, dk0 * scale, keys, key_ok, 3 * width, 0, head_dim, BLOCK_D)
    _store(dv_ptr, dv0, keys, key_ok, 3 * width, 0, head_dim, BLOCK_D)
    if BLOCK_E > 0:
        _store(dk_ptr, dk1 * scale, keys, key_ok, 3 * width, BLOCK_D, head_dim, BLOCK_E)
        _store(dv_ptr, dv1, keys, key_ok, 3 * width, BLOCK_D, head_dim, BLOCK_E)


@triton.jit
def _attention_bwd_dq_kernel(
    qkv_ptr,  # (N, S, 3*H*Dh), unit stride in the last dim
    dout_ptr,  # (N, S, H*Dh) contiguous
    lse_ptr,  # (N, H, S) fp32
    delta_ptr,  # (N, H, S) fp32
    dqkv_ptr,  # (N, S, 3*H*Dh) contiguous: this kernel writes the q third
    seq,  # S
    num_heads,  # H
    head_dim,  # Dh
    stride_n,  # qkv.stride(0)
    stride_s,  # qkv.stride(1)
    scale,  # Dh ** -0.5
    BLOCK_M: tl.constexpr,  # queries this program owns
    BLOCK_N: tl.constexpr,  # keys per step of its loop
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    NATIVE: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # torch.compile's inductor passes a Python float as fp64
    pid_m, pid_nh = _block_and_head(seq, BLOCK_M)
    n = (pid_nh // num_heads).to(tl.int64)
    h = pid_nh % num_heads
    width = num_heads * head_dim
    q_ptr = qkv_ptr + n * stride_n + h * head_dim
    do_ptr = dout_ptr + n * seq * width + h * head_dim
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) this program's queries
    row_ok = rows < seq
    q0, q1 = _load_parts(q_ptr, rows, row_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_M, BLOCK_D|E)
    do0, do1 = _load_parts(do_ptr, rows, row_ok, width, head_dim, BLOCK_D, BLOCK_E)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_E > 0:
        dq1 = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    stats = pid_nh.to(tl.int64) * seq
    lse = tl.load(lse_ptr + stats + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
    delta = tl.load(delta_ptr + stats + rows, mask=row_ok, other=0.0)
    for start in range(0, seq, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
        key_ok = keys < seq
        k0, k1 = _load_parts(q_ptr + width, keys, key_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_N, BLOCK_D|E)
        v0, v1 = _load_parts(q_ptr + 2 * width, keys, key_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)
        s = _scores(q0, q1, k0, k1, BLOCK_E, NATIVE) * scale  # (BLOCK_M queries, BLOCK_N keys)
        p = tl.where(row_ok[:, None] & key_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = _scores(do0, do1, v0, v1, BLOCK_E, NATIVE)
        ds = p * (dp - delta[:, None])
        dq0 += _dot(ds, k0, NATIVE)
        if BLOCK_E > 0:
            dq1 += _dot(ds, k1, NATIVE)
    dq_ptr = dqkv_ptr + n * seq * 3 * width + h * head_dim
    _store(dq_ptr, dq0 * scale, rows, row_ok, 3 * width, 0, head_dim, BLOCK_D)
    if BLOCK_E > 0:
        _store(dq_ptr, dq1 * scale, rows, row_ok, 3 * width, BLOCK_D, head_dim, BLOCK_E)


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


def _native(qkv: torch.Tensor) -> bool:
    return qkv.dtype != torch.float32 and not interpreter_on()


def attention_forward(qkv: torch.Tensor, num_heads: int, plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward: ``qkv (N, S, 3*H*Dh)`` with unit last stride -> ``(out (N, S, H*Dh)`` in qkv's
    dtype, ``lse (N, H, S)`` fp32)."""
    n, seq, packed = qkv.shape
    head_dim = packed // (3 * num_heads)
    plan.check(seq, head_dim)
    out = torch.empty((n, seq, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)  # (N, S, H*Dh)
    lse = torch.empty((n, num_heads, seq), dtype=torch.float32, device=qkv.device)  # (N, H, S)
    (block_n, block_t), (block_d, block_e) = plan.key_parts, plan.dim_parts
    if n * seq > 0 and plan.fwd_loop:
        wrap_triton(_attention_fwd_loop_kernel)[(triton.cdiv(seq, plan.fwd_block_m) * n * num_heads,)](
            qkv, out, lse, seq, num_heads, head_dim, qkv.stride(0), qkv.stride(1), head_dim**-0.5,
            BLOCK_M=plan.fwd_block_m, BLOCK_N=plan.fwd_loop, BLOCK_D=block_d, BLOCK_E=block_e, NATIVE=_native(qkv),
            num_warps=plan.fwd_warps)
    elif n * seq > 0:
        wrap_triton(_attention_fwd_kernel)[(triton.cdiv(seq, plan.fwd_block_m) * n * num_heads,)](
            qkv, out, lse, seq, num_heads, head_dim, qkv.stride(0), qkv.stride(1), head_dim**-0.5,
            BLOCK_M=plan.fwd_block_m, BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_E=block_e,
            NATIVE=_native(qkv), num_warps=plan.fwd_warps)
    return out, lse


def attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       num_heads: int, plan: AttentionPlan) -> torch.Tensor:
    """Launches the backward: contiguous ``grad_out (N, S, H*Dh)``, ``qkv (N, S, 3*H*Dh)`` (unit last stride),
    contiguous ``out (N, S, H*Dh)`` (read by the split form only), ``lse (N, H, S)`` fp32 ->
    ``d(qkv) (N, S, 3*H*Dh)`` in qkv's dtype."""
    n, seq, packed = qkv.shape
    head_dim = packed // (3 * num_heads)
    plan.check(seq, head_dim)
    dqkv = torch.empty((n, seq, packed), dtype=qkv.dtype, device=qkv.device)  # (N, S, 3*H*Dh)
    if n * seq == 0:
        return dqkv
    (block_n, block_t), (block_d, block_e) = plan.key_parts, plan.dim_parts
    nh = n * num_heads
    scale = head_dim**-0.5
    native = _native(qkv)
    strides_scale = (qkv.stride(0), qkv.stride(1), scale)  # stride_n, stride_s, scale
    if plan.bwd_fused:
        wrap_triton(_attention_bwd_kernel)[(nh,)](
            qkv, grad_out, lse, dqkv, seq, num_heads, head_dim, *strides_scale,
            BLOCK_M=plan.bwd_block_m, BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_E=block_e,
            NATIVE=native, num_warps=plan.bwd_warps, num_stages=1)
        return dqkv
    delta = torch.empty((n, num_heads, seq), dtype=torch.float32, device=qkv.device)  # (N, H, S)
    wrap_triton(_attention_bwd_delta_kernel)[(triton.cdiv(seq, DELTA_BLOCK) * nh,)](
        out, grad_out, delta, seq, num_heads, head_dim, BLOCK_M=DELTA_BLOCK, BLOCK_D=block_d, BLOCK_E=block_e,
        num_warps=4)
    wrap_triton(_attention_bwd_dkdv_kernel)[(triton.cdiv(seq, plan.dkdv_block) * nh,)](
        qkv, grad_out, lse, delta, dqkv, seq, num_heads, head_dim, *strides_scale,
        BLOCK_N=plan.dkdv_block, BLOCK_M=plan.dkdv_step, BLOCK_D=block_d, BLOCK_E=block_e, NATIVE=native,
        num_warps=plan.dkdv_warps)
    wrap_triton(_attention_bwd_dq_kernel)[(triton.cdiv(seq, plan.dq_block) * nh,)](
        qkv, grad_out, lse, delta, dqkv, seq, num_heads, head_dim, *strides_scale,
        BLOCK_M=plan.dq_block, BLOCK_N=plan.dq_step, BLOCK_D=block_d, BLOCK_E=block_e, NATIVE=native,
        num_warps=plan.dq_warps)
    return dqkv


@torch.library.triton_op("fastmae_triton::attention", mutates_args=())
def attention_op(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``qkv (N, S, 3*H*Dh)`` with unit last stride -> ``(out (N, S, H*Dh)`` in qkv's dtype,
    ``lse (N, H, S)`` fp32), tiled by :func:`default_plan`."""
    n, seq, packed = qkv.shape
    return attention_forward(qkv, num_heads, default_plan(seq, packed // (3 * num_heads)))


@torch.library.triton_op("fastmae_triton::attention_backward", mutates_args=())
def attention_backward_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          num_heads: int) -> torch.Tensor:
    """:func:`attention_backward` tiled by :func:`default_plan`: ``d(qkv) (N, S, 3*H*Dh)``."""
    n, seq, packed = qkv.shape
    return attention_backward(grad_out, qkv, out, lse, num_heads, default_plan(seq, packed // (3 * num_heads)))


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple,
                   output: tuple[torch.Tensor, torch.Tensor]) -> None:
    qkv, num_heads = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads = num_heads


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor, _grad_lse: None) -> tuple:
    qkv, out, lse = ctx.saved_tensors
    return attention_backward_op(grad_out.contiguous(), qkv, out, lse, ctx.num_heads), None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention_triton(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """As :func:`fastmae.ops.attention.attention_reference`: ``qkv (N, S, 3*H*Dh)`` -> ``(N, S, H*Dh)``."""
    if qkv.stride(-1) != 1:  # the Linear's output always has it; anything else is copied once
        qkv = qkv.contiguous()
    return attention_op(qkv, num_heads)[0]


_COMMON = {"seq": "i32", "num_heads": "i32", "head_dim": "i32"}
_STRIDES = {"stride_n": "i32", "stride_s": "i32", "scale": "fp32"}
_PARTS = {"BLOCK_N": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr", "BLOCK_E": "constexpr",
          "NATIVE": "constexpr"}
_SIG_FWD = {"qkv_ptr": "*{dtype}", "out_ptr": "*{dtype}", "lse_ptr": "*fp32", **_COMMON, **_STRIDES,
            "BLOCK_M": "constexpr", **_PARTS}
_SIG_FWD_LOOP = {"qkv_ptr": "*{dtype}", "out_ptr": "*{dtype}", "lse_ptr": "*fp32", **_COMMON, **_STRIDES,
                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "BLOCK_E": "constexpr",
                 "NATIVE": "constexpr"}
_SIG_BWD_FUSED = {"qkv_ptr": "*{dtype}", "dout_ptr": "*{dtype}", "lse_ptr": "*fp32", "dqkv_ptr": "*{dtype}",
                  **_COMMON, **_STRIDES, "BLOCK_M": "constexpr", **_PARTS}
_SIG_DELTA = {"out_ptr": "*{dtype}", "dout_ptr": "*{dtype}", "delta_ptr": "*fp32", **_COMMON,
              "BLOCK_M": "constexpr", "BLOCK_D": "constexpr", "BLOCK_E": "constexpr"}
_SIG_SPLIT = {"qkv_ptr": "*{dtype}", "dout_ptr": "*{dtype}", "lse_ptr": "*fp32", "delta_ptr": "*fp32",
              "dqkv_ptr": "*{dtype}", **_COMMON, **_STRIDES}
_DIMS = {"BLOCK_D": "constexpr", "BLOCK_E": "constexpr", "NATIVE": "constexpr"}
_SIG_DKDV = {**_SIG_SPLIT, "BLOCK_N": "constexpr", "BLOCK_M": "constexpr", **_DIMS}
_SIG_DQ = {**_SIG_SPLIT, "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", **_DIMS}


def aot_kernels(plan: AttentionPlan) -> list[AotKernel]:
    """Every kernel launch of ``plan``, forward and backward, for ``python -m fastmae.kernels.aot``."""
    (block_n, block_t), (block_d, block_e) = plan.key_parts, plan.dim_parts
    parts = {"BLOCK_N": block_n, "BLOCK_T": block_t, "BLOCK_D": block_d, "BLOCK_E": block_e, "NATIVE": True}
    label = f"N{block_n}+{block_t}-D{block_d}+{block_e}"
    if plan.fwd_loop:
        kernels = [AotKernel(fn=_attention_fwd_loop_kernel, signature=_SIG_FWD_LOOP,
                             constexprs={"BLOCK_M": plan.fwd_block_m, "BLOCK_N": plan.fwd_loop, "BLOCK_D": block_d,
                                         "BLOCK_E": block_e, "NATIVE": True},
                             num_warps=plan.fwd_warps, label=f"M{plan.fwd_block_m}-N{plan.fwd_loop}-D{block_d}+{block_e}")]
    else:
        kernels = [AotKernel(fn=_attention_fwd_kernel, signature=_SIG_FWD,
                             constexprs={"BLOCK_M": plan.fwd_block_m, **parts}, num_warps=plan.fwd_warps,
                             label=f"M{plan.fwd_block_m}-{label}")]
    if plan.bwd_fused:
        return [*kernels, AotKernel(fn=_attention_bwd_kernel, signature=_SIG_BWD_FUSED,
                                    constexprs={"BLOCK_M": plan.bwd_block_m, **parts}, num_warps=plan.bwd_warps,
                                    num_stages=1, label=f"M{plan.bwd_block_m}-{label}")]
    dims = {"BLOCK_D": block_d, "BLOCK_E": block_e}
    return [
        *kernels,
        AotKernel(fn=_attention_bwd_delta_kernel, signature=_SIG_DELTA, constexprs={"BLOCK_M": DELTA_BLOCK, **dims},
                  num_warps=4, label=f"D{block_d}+{block_e}"),
        AotKernel(fn=_attention_bwd_dkdv_kernel, signature=_SIG_DKDV,
                  constexprs={"BLOCK_N": plan.dkdv_block, "BLOCK_M": plan.dkdv_step, **dims, "NATIVE": True},
                  num_warps=plan.dkdv_warps, label=f"N{plan.dkdv_block}-M{plan.dkdv_step}-D{block_d}+{block_e}"),
        AotKernel(fn=_attention_bwd_dq_kernel, signature=_SIG_DQ,
                  constexprs={"BLOCK_M": plan.dq_block, "BLOCK_N": plan.dq_step, **dims, "NATIVE": True},
                  num_warps=plan.dq_warps, label=f"M{plan.dq_block}-N{plan.dq_step}-D{block_d}+{block_e}"),
    ]


# MAE: ViT-B/L encoder S = 50, Dh = 64; ViT-H encoder S = 65, Dh = 80; decoder S = 197 / 257, Dh = 32.
MAE_SHAPES = ((50, 64), (65, 80), (197, 32), (257, 32))
# and two corners of what the op accepts: the auto pick's widest heads at its longest S, the op's largest tile
CORNER_SHAPES = ((257, 80), (512, 128))
AOT_KERNELS = [k for s, d in MAE_SHAPES + CORNER_SHAPES for k in aot_kernels(default_plan(s, d))]
