"""attention in Triton: softmax((q @ k^T) * Dh**-0.5) @ v per head, read in place from the packed qkv.

``qkv (N, S, 3*H*Dh)`` is the qkv Linear's output (last dim packed as ``(3, H, Dh)``, unit stride);
q, k and v of head ``h`` are read with strides (no transposes, no copies); the output is written as
``(N, S, H*Dh)``, ready for the projection, and the gradient as ``d(qkv) (N, S, 3*H*Dh)``.

Tiles in two parts. Triton tiles are powers of two; padding MAE's sizes to one would waste much of the
work (ViT-H's S = 65 -> 128 and Dh = 80 -> 128: 3.2x the score FLOPs; S = 257 -> 512: 2x). So the keys
and the head dim are each covered by a main tile and an optional smaller one (``two_parts`` in
kernels/attention_plan.py, which holds the tiling policy):
S 65 = 64 + 16, S 257 = 256 + 16, Dh 80 = 64 + 16 (S 50 -> 64, S 197 -> 256, Dh 32/64 stay one tile).
Two head-dim parts make each product two ``tl.dot``s summed (q @ k^T) or two outputs (P @ V); two key
parts give two score tiles whose softmax is still exact: one max and one sum over both.

Grids are one-dimensional, a program's (block, head) split from its id with the blocks of one head
adjacent (CUDA caps a grid's second dimension at 65535; N*H can exceed it).

Forward, ``cdiv(S, BLOCK_M) * N*H`` programs: S <= 512 (``MAX_S``), so a program holds the whole K and V of its
head and ``BLOCK_M`` query rows: the score tiles in fp32, an exact (not online) softmax in fp32,
``P @ V``, and the logsumexp ``lse (N, H, S)`` fp32 saved for the backward. A second forward
(``AttentionPlan.fwd_loop``) walks the keys a block at a time with flash-attention's online softmax:
smaller tiles, keys padded to a multiple of the block only (the default where the head dim is one tile).

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

``default_plan`` (kernels/attention_plan.py) picks the tiles, blocks and warps; the launchers here take any
:class:`AttentionPlan` (``bench/tune_attention.py`` times those of kernels/attention_tuning.py).

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

import torch
import triton
import triton.language as tl

from fastmae.kernels._common import interpreter_on
from fastmae.kernels.aot import AotKernel
from fastmae.kernels.attention_plan import AttentionPlan, default_plan

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
def _head(pid_nh, seq, num_heads, head_dim):
    """Head ``pid_nh = n*H + h``: ``(n`` (int64), ``h``, ``width = H*Dh``, the head's offset in a contiguous
    ``(N, S, H*Dh)`` tensor (out, dO)``)``; its rows of the ``(N, H, S)`` statistics start at ``pid_nh * S``."""
    n = (pid_nh // num_heads).to(tl.int64)
    h = pid_nh % num_heads
    width = num_heads * head_dim  # H*Dh
    return n, h, width, n * seq * width + h * head_dim


@triton.jit
def _qkv_head(qkv_ptr, pid_nh, seq, num_heads, head_dim, stride_n):
    """:func:`_head` where qkv is read: ``(width``, the head's q pointer in qkv (k's is ``width`` further, v's
    ``2*width``), its offsets in out/dO and in the contiguous d(qkv) ``(N, S, 3*H*Dh)``, the statistics' row
    offset``)``."""
    n, h, width, offs = _head(pid_nh, seq, num_heads, head_dim)
    return (width, qkv_ptr + n * stride_n + h * head_dim, offs, n * seq * 3 * width + h * head_dim,
            pid_nh.to(tl.int64) * seq)


@triton.jit
def _rows(start, seq, BLOCK: tl.constexpr):
    """``(BLOCK,)`` positions ``start ..`` and which of them are ``< seq``."""
    rows = start + tl.arange(0, BLOCK)
    return rows, rows < seq


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
def _load_rows(a_ptr, b_ptr, start, seq, a_stride, b_stride, head_dim, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_E: tl.constexpr):
    """Rows ``start .. start + BLOCK`` of two heads' tensors (k and v, q and dO, out and dO): ``(rows, row_ok``,
    a's parts, b's parts``)`` (:func:`_load_parts`)."""
    rows, row_ok = _rows(start, seq, BLOCK)
    a0, a1 = _load_parts(a_ptr, rows, row_ok, a_stride, head_dim, BLOCK_D, BLOCK_E)
    b0, b1 = _load_parts(b_ptr, rows, row_ok, b_stride, head_dim, BLOCK_D, BLOCK_E)
    return rows, row_ok, a0, a1, b0, b1


@triton.jit
def _zero_parts(ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """fp32 accumulators for the head-dim parts of ``ROWS`` rows, laid out as :func:`_load_parts` returns them."""
    x0 = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    x1 = x0
    if BLOCK_E > 0:
        x1 = tl.zeros([ROWS, BLOCK_E], dtype=tl.float32)
    return x0, x1


@triton.jit
def _acc_parts(acc0, acc1, a, b0, b1, BLOCK_E: tl.constexpr, NATIVE: tl.constexpr):
    """``(acc0 + a @ b0, acc1 + a @ b1)``, the products in the head-dim parts (the second only when BLOCK_E > 0)."""
    acc0 += _dot(a, b0, NATIVE)
    if BLOCK_E > 0:
        acc1 += _dot(a, b1, NATIVE)
    return acc0, acc1


@triton.jit
def _store(ptr, x, rows, row_ok, row_stride, col0, num_cols, BLOCK_C: tl.constexpr):
    """Writes the ``(len(rows), BLOCK_C)`` tile ``x`` where :func:`_load` reads, in ptr's dtype."""
    cols = col0 + tl.arange(0, BLOCK_C)
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols < num_cols)[None, :])


@triton.jit
def _store_parts(ptr, x0, x1, rows, row_ok, row_stride, num_cols, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """Writes the head-dim parts ``x0``, ``x1`` (the second only when BLOCK_E > 0) where :func:`_load_parts` reads."""
    _store(ptr, x0, rows, row_ok, row_stride, 0, num_cols, BLOCK_D)
    if BLOCK_E > 0:
        _store(ptr, x1, rows, row_ok, row_stride, BLOCK_D, num_cols, BLOCK_E)


@triton.jit
def _store_dkdv(dq_ptr, width, dk0, dk1, dv0, dv1, scale, keys, key_ok, head_dim, BLOCK_D: tl.constexpr,
                BLOCK_E: tl.constexpr):
    """Writes ``dK = scale * dk`` and ``dV = dv`` of the given keys into d(qkv), whose q part of the head starts at
    ``dq_ptr`` (k's ``width``, v's ``2*width`` further)."""
    _store_parts(dq_ptr + width, dk0 * scale, dk1 * scale, keys, key_ok, 3 * width, head_dim, BLOCK_D, BLOCK_E)
    _store_parts(dq_ptr + 2 * width, dv0, dv1, keys, key_ok, 3 * width, head_dim, BLOCK_D, BLOCK_E)


@triton.jit
def _scores(a0, a1, b0, b1, BLOCK_E: tl.constexpr, NATIVE: tl.constexpr):
    """``a @ b^T`` fp32 from the head-dim parts of both: ``a0 (R, BLOCK_D)``, ``b0 (C, BLOCK_D)`` and, when
    BLOCK_E > 0, ``a1 (R, BLOCK_E)``, ``b1 (C, BLOCK_E)`` (ignored otherwise) -> ``(R, C)``."""
    s = _dot(a0, tl.trans(b0), NATIVE)
    if BLOCK_E > 0:
        s += _dot(a1, tl.trans(b1), NATIVE)
    return s


@triton.jit
def _probs(a0, a1, b0, b1, lse, ok, scale, BLOCK_E: tl.constexpr, NATIVE: tl.constexpr):
    """The backwards' recomputed ``P = exp(scale * a @ b^T - lse)`` (a, b: q and k, or k and q for ``P^T``),
    zero outside ``ok``; ``lse`` comes shaped to broadcast: ``(R, 1)`` for P, ``(1, C)`` for ``P^T``."""
    return tl.where(ok, tl.exp(_scores(a0, a1, b0, b1, BLOCK_E, NATIVE) * scale - lse), 0.0)


@triton.jit
def _masked_scores(q0, q1, k0, k1, key_ok, scale, BLOCK_E: tl.constexpr, NATIVE: tl.constexpr):
    """The forwards' ``scale * q @ k^T``, ``-inf`` on padded keys."""
    return tl.where(key_ok[None, :], _scores(q0, q1, k0, k1, BLOCK_E, NATIVE) * scale, float("-inf"))


@triton.jit
def _store_forward(o_ptr, lse_ptr, o0, o1, l, m, rows, row_ok, width, head_dim, BLOCK_D: tl.constexpr,
                   BLOCK_E: tl.constexpr):
    """Both forwards' epilogue: ``out = o / l`` from the unnormalised head-dim parts ``o0 (BLOCK_M, BLOCK_D)``,
    ``o1 (BLOCK_M, BLOCK_E)`` (unused when BLOCK_E = 0), and ``lse = m + log(l)`` of the rows."""
    _store_parts(o_ptr, o0 / l[:, None], o1 / l[:, None], rows, row_ok, width, head_dim, BLOCK_D, BLOCK_E)
    tl.store(lse_ptr + rows, m + tl.log(l), mask=row_ok)


# The kernels' arguments, by name. Each kernel takes the ones it uses: its pointers in the order listed here,
# then seq, num_heads, head_dim, then (where qkv is read) stride_n, stride_s and scale, then its constexprs.
#   qkv_ptr    (N, S, 3*H*Dh), unit stride in the last dim; stride_n, stride_s: qkv.stride(0), qkv.stride(1)
#   out_ptr    (N, S, H*Dh) contiguous: the output (the forwards write it, the delta preprocess reads it)
#   dout_ptr   (N, S, H*Dh) contiguous: dO, the gradient of out
#   lse_ptr    (N, H, S) fp32: the logsumexp of each query's scores (the forwards write it)
#   delta_ptr  (N, H, S) fp32: rowsum(dO * O) (the delta preprocess writes it)
#   dqkv_ptr   (N, S, 3*H*Dh) contiguous: d(qkv) (the split backward's dK/dV kernel writes the k and v thirds,
#              its dQ kernel the q third)
#   seq, num_heads, head_dim: S, H, Dh; scale: Dh ** -0.5 (cast to fp32 first: torch.compile may pass it as fp64)
#   BLOCK_M    query rows: a program's block, or (split dK/dV, fused backward) a step of its loop over queries
#   BLOCK_N    keys: the main key tile (whole-K/V forward, fused backward), a program's block (split dK/dV) or a
#              step of a loop over keys (loop forward, split dQ)
#   BLOCK_T    the tail key tile (0: none); BLOCK_D, BLOCK_E the head-dim parts (BLOCK_E 0: one part)
#   NATIVE     bf16/fp16 tensor-core products (:func:`_dot`)
@triton.jit
def _attention_fwd_kernel(qkv_ptr, out_ptr, lse_ptr, seq, num_heads, head_dim, stride_n, stride_s, scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_E: tl.constexpr, NATIVE: tl.constexpr):
    """The whole K and V of the head (BLOCK_N + BLOCK_T keys) against BLOCK_M queries, an exact softmax."""
    scale = tl.cast(scale, tl.float32)
    pid_m, pid_nh = _block_and_head(seq, BLOCK_M)
    width, q_ptr, offs, _, stats = _qkv_head(qkv_ptr, pid_nh, seq, num_heads, head_dim, stride_n)
    rows, row_ok = _rows(pid_m * BLOCK_M, seq, BLOCK_M)  # query positions
    q0, q1 = _load_parts(q_ptr, rows, row_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_M, BLOCK_D|E)
    _, key0_ok, k00, k01, v00, v01 = _load_rows(q_ptr + width, q_ptr + 2 * width, 0, seq, stride_s, stride_s,
                                                head_dim, BLOCK_N, BLOCK_D, BLOCK_E)  # the main key tile
    s0 = _masked_scores(q0, q1, k00, k01, key0_ok, scale, BLOCK_E, NATIVE)  # (BLOCK_M, BLOCK_N)
    m = tl.max(s0, axis=1)  # (BLOCK_M,)
    if BLOCK_T > 0:
        _, key1_ok, k10, k11, v10, v11 = _load_rows(q_ptr + width, q_ptr + 2 * width, BLOCK_N, seq, stride_s,
                                                    stride_s, head_dim, BLOCK_T, BLOCK_D, BLOCK_E)  # the tail tile
        s1 = _masked_scores(q0, q1, k10, k11, key1_ok, scale, BLOCK_E, NATIVE)  # (BLOCK_M, BLOCK_T)
        m = tl.maximum(m, tl.max(s1, axis=1))
    p0 = tl.exp(s0 - m[:, None])
    l = tl.sum(p0, axis=1)  # (BLOCK_M,)
    o0, o1 = _zero_parts(BLOCK_M, BLOCK_D, BLOCK_E)
    o0, o1 = _acc_parts(o0, o1, p0, v00, v01, BLOCK_E, NATIVE)  # (BLOCK_M, BLOCK_D|E)
    if BLOCK_T > 0:
        p1 = tl.exp(s1 - m[:, None])
        l += tl.sum(p1, axis=1)
        o0, o1 = _acc_parts(o0, o1, p1, v10, v11, BLOCK_E, NATIVE)
    _store_forward(out_ptr + offs, lse_ptr + stats, o0, o1, l, m, rows, row_ok, width, head_dim, BLOCK_D, BLOCK_E)


@triton.jit
def _attention_fwd_loop_kernel(qkv_ptr, out_ptr, lse_ptr, seq, num_heads, head_dim, stride_n, stride_s, scale,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_E: tl.constexpr, NATIVE: tl.constexpr):
    """The forward with the keys walked BLOCK_N at a time and an online softmax (running max m, sum l; the
    output rescaled by exp(m_old - m_new) per step): smaller tiles than the whole-K/V kernel, keys padded
    only to a multiple of BLOCK_N (S 197 -> 208 at 16), one rescale of (BLOCK_M, Dh) per step."""
    scale = tl.cast(scale, tl.float32)
    pid_m, pid_nh = _block_and_head(seq, BLOCK_M)
    width, q_ptr, offs, _, stats = _qkv_head(qkv_ptr, pid_nh, seq, num_heads, head_dim, stride_n)
    rows, row_ok = _rows(pid_m * BLOCK_M, seq, BLOCK_M)  # query positions
    q0, q1 = _load_parts(q_ptr, rows, row_ok, stride_s, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_M, BLOCK_D|E)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    o0, o1 = _zero_parts(BLOCK_M, BLOCK_D, BLOCK_E)
    for start in range(0, seq, BLOCK_N):  # the first step has a valid key, so m is finite from then on
        keys, key_ok, k0, k1, v0, v1 = _load_rows(q_ptr + width, q_ptr + 2 * width, start, seq, stride_s,
                                                  stride_s, head_dim, BLOCK_N, BLOCK_D, BLOCK_E)
        s = _masked_scores(q0, q1, k0, k1, key_ok, scale, BLOCK_E, NATIVE)  # (BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m, tl.max(s, axis=1))  # (BLOCK_M,)
        alpha = tl.exp(m - m_new)  # 0 at the first step
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        o0 = o0 * alpha[:, None]
        if BLOCK_E > 0:
            o1 = o1 * alpha[:, None]
        o0, o1 = _acc_parts(o0, o1, p, v0, v1, BLOCK_E, NATIVE)
        m = m_new
    _store_forward(out_ptr + offs, lse_ptr + stats, o0, o1, l, m, rows, row_ok, width, head_dim, BLOCK_D, BLOCK_E)


@triton.jit
def _attention_bwd_kernel(qkv_ptr, dout_ptr, lse_ptr, dqkv_ptr, seq, num_heads, head_dim, stride_n, stride_s,
                          scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, NATIVE: tl.constexpr):
    """The fused backward, one program a head: K, V, dK, dV held, the queries walked BLOCK_M at a time."""
    scale = tl.cast(scale, tl.float32)
    # Tiles are named by (key part, head-dim part): k01 = main keys x extra dims. Tail-key tiles (k1*, v1*,
    # dk1*, dv1*) exist only when BLOCK_T > 0; the extra-dim tiles (k01, q1, dk01, ...) alias part 0 when
    # BLOCK_E = 0 and are then unused.
    width, q_ptr, offs, dqkv_offs, stats = _qkv_head(qkv_ptr, tl.program_id(0), seq, num_heads, head_dim, stride_n)
    do_ptr = dout_ptr + offs
    dq_ptr = dqkv_ptr + dqkv_offs
    keys0, key0_ok, k00, k01, v00, v01 = _load_rows(q_ptr + width, q_ptr + 2 * width, 0, seq, stride_s, stride_s,
                                                    head_dim, BLOCK_N, BLOCK_D, BLOCK_E)  # (BLOCK_N, BLOCK_D|E)
    dk00, dk01 = _zero_parts(BLOCK_N, BLOCK_D, BLOCK_E)
    dv00, dv01 = _zero_parts(BLOCK_N, BLOCK_D, BLOCK_E)
    if BLOCK_T > 0:
        keys1, key1_ok, k10, k11, v10, v11 = _load_rows(q_ptr + width, q_ptr + 2 * width, BLOCK_N, seq, stride_s,
                                                        stride_s, head_dim, BLOCK_T, BLOCK_D, BLOCK_E)
        dk10, dk11 = _zero_parts(BLOCK_T, BLOCK_D, BLOCK_E)
        dv10, dv11 = _zero_parts(BLOCK_T, BLOCK_D, BLOCK_E)
    for start in range(0, seq, BLOCK_M):
        rows, row_ok, q0, q1, do0, do1 = _load_rows(q_ptr, do_ptr, start, seq, stride_s, width, head_dim, BLOCK_M,
                                                    BLOCK_D, BLOCK_E)  # (BLOCK_M, BLOCK_D|E)
        lse = tl.load(lse_ptr + stats + rows, mask=row_ok, other=0.0)[:, None]  # (BLOCK_M, 1)
        p0 = _probs(q0, q1, k00, k01, lse, row_ok[:, None] & key0_ok[None, :], scale, BLOCK_E, NATIVE)
        dp0 = _scores(do0, do1, v00, v01, BLOCK_E, NATIVE)  # (BLOCK_M, BLOCK_N)
        delta = tl.sum(p0 * dp0, axis=1)  # (BLOCK_M,) = rowsum(dO * O): the whole row is here
        if BLOCK_T > 0:
            p1 = _probs(q0, q1, k10, k11, lse, row_ok[:, None] & key1_ok[None, :], scale, BLOCK_E, NATIVE)
            dp1 = _scores(do0, do1, v10, v11, BLOCK_E, NATIVE)  # (BLOCK_M, BLOCK_T)
            delta += tl.sum(p1 * dp1, axis=1)
        ds0 = p0 * (dp0 - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dv00, dv01 = _acc_parts(dv00, dv01, tl.trans(p0), do0, do1, BLOCK_E, NATIVE)  # (BLOCK_N, BLOCK_D|E)
        dk00, dk01 = _acc_parts(dk00, dk01, tl.trans(ds0), q0, q1, BLOCK_E, NATIVE)
        dq0, dq1 = _zero_parts(BLOCK_M, BLOCK_D, BLOCK_E)
        dq0, dq1 = _acc_parts(dq0, dq1, ds0, k00, k01, BLOCK_E, NATIVE)  # (BLOCK_M, BLOCK_D|E)
        if BLOCK_T > 0:
            ds1 = p1 * (dp1 - delta[:, None])  # (BLOCK_M, BLOCK_T)
            dv10, dv11 = _acc_parts(dv10, dv11, tl.trans(p1), do0, do1, BLOCK_E, NATIVE)  # (BLOCK_T, BLOCK_D|E)
            dk10, dk11 = _acc_parts(dk10, dk11, tl.trans(ds1), q0, q1, BLOCK_E, NATIVE)
            dq0, dq1 = _acc_parts(dq0, dq1, ds1, k10, k11, BLOCK_E, NATIVE)
        _store_parts(dq_ptr, dq0 * scale, dq1 * scale, rows, row_ok, 3 * width, head_dim, BLOCK_D, BLOCK_E)
    _store_dkdv(dq_ptr, width, dk00, dk01, dv00, dv01, scale, keys0, key0_ok, head_dim, BLOCK_D, BLOCK_E)
    if BLOCK_T > 0:
        _store_dkdv(dq_ptr, width, dk10, dk11, dv10, dv11, scale, keys1, key1_ok, head_dim, BLOCK_D, BLOCK_E)


@triton.jit
def _attention_bwd_delta_kernel(out_ptr, dout_ptr, delta_ptr, seq, num_heads, head_dim,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """The split backward's preprocess: ``delta = rowsum(dO * O)`` of BLOCK_M rows."""
    pid_m, pid_nh = _block_and_head(seq, BLOCK_M)
    rows, row_ok = _rows(pid_m * BLOCK_M, seq, BLOCK_M)
    _, _, width, offs = _head(pid_nh, seq, num_heads, head_dim)
    o0, o1 = _load_parts(out_ptr + offs, rows, row_ok, width, head_dim, BLOCK_D, BLOCK_E)  # (BLOCK_M, BLOCK_D|E)
    do0, do1 = _load_parts(dout_ptr + offs, rows, row_ok, width, head_dim, BLOCK_D, BLOCK_E)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), axis=1)  # (BLOCK_M,)
    if BLOCK_E > 0:
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), axis=1)
    tl.store(delta_ptr + pid_nh.to(tl.int64) * seq + rows, delta, mask=row_ok)


@triton.jit
def _attention_bwd_dkdv_kernel(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, seq, num_heads, head_dim, stride_n,
                               stride_s, scale, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_E: tl.constexpr, NATIVE: tl.constexpr):
    """The split backward's dK/dV: a program owns BLOCK_N keys and walks the queries BLOCK_M at a time, in the
    transposed orientation (keys x queries)."""
    scale = tl.cast(scale, tl.float32)
    pid_k, pid_nh = _block_and_head(seq, BLOCK_N)
    width, q_ptr, offs, dqkv_offs, stats = _qkv_head(qkv_ptr, pid_nh, seq, num_heads, head_dim, stride_n)
    do_ptr = dout_ptr + offs
    keys, key_ok, k0, k1, v0, v1 = _load_rows(q_ptr + width, q_ptr + 2 * width, pid_k * BLOCK_N, seq, stride_s,
                                              stride_s, head_dim, BLOCK_N, BLOCK_D, BLOCK_E)  # (BLOCK_N, BLOCK_D|E)
    dk0, dk1 = _zero_parts(BLOCK_N, BLOCK_D, BLOCK_E)
    dv0, dv1 = _zero_parts(BLOCK_N, BLOCK_D, BLOCK_E)
    for start in range(0, seq, BLOCK_M):
        rows, row_ok, q0, q1, do0, do1 = _load_rows(q_ptr, do_ptr, start, seq, stride_s, width, head_dim, BLOCK_M,
                                                    BLOCK_D, BLOCK_E)  # (BLOCK_M, BLOCK_D|E)
        lse = tl.load(lse_ptr + stats + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
        pt = _probs(k0, k1, q0, q1, lse[None, :], key_ok[:, None] & row_ok[None, :], scale, BLOCK_E, NATIVE)
        delta = tl.load(delta_ptr + stats + rows, mask=row_ok, other=0.0)
        dst = pt * (_scores(v0, v1, do0, do1, BLOCK_E, NATIVE) - delta[None, :])  # (BLOCK_N keys, BLOCK_M queries)
        dv0, dv1 = _acc_parts(dv0, dv1, pt, do0, do1, BLOCK_E, NATIVE)  # (BLOCK_N, BLOCK_D|E)
        dk0, dk1 = _acc_parts(dk0, dk1, dst, q0, q1, BLOCK_E, NATIVE)
    _store_dkdv(dqkv_ptr + dqkv_offs, width, dk0, dk1, dv0, dv1, scale, keys, key_ok, head_dim, BLOCK_D, BLOCK_E)


@triton.jit
def _attention_bwd_dq_kernel(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, seq, num_heads, head_dim, stride_n,
                             stride_s, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_E: tl.constexpr, NATIVE: tl.constexpr):
    """The split backward's dQ: a program owns BLOCK_M queries and walks the keys BLOCK_N at a time."""
    scale = tl.cast(scale, tl.float32)
    pid_m, pid_nh = _block_and_head(seq, BLOCK_M)
    width, q_ptr, offs, dqkv_offs, stats = _qkv_head(qkv_ptr, pid_nh, seq, num_heads, head_dim, stride_n)
    do_ptr = dout_ptr + offs
    rows, row_ok, q0, q1, do0, do1 = _load_rows(q_ptr, do_ptr, pid_m * BLOCK_M, seq, stride_s, width, head_dim,
                                                BLOCK_M, BLOCK_D, BLOCK_E)  # (BLOCK_M, BLOCK_D|E)
    lse = tl.load(lse_ptr + stats + rows, mask=row_ok, other=0.0)[:, None]  # (BLOCK_M, 1)
    delta = tl.load(delta_ptr + stats + rows, mask=row_ok, other=0.0)[:, None]
    dq0, dq1 = _zero_parts(BLOCK_M, BLOCK_D, BLOCK_E)
    for start in range(0, seq, BLOCK_N):
        keys, key_ok, k0, k1, v0, v1 = _load_rows(q_ptr + width, q_ptr + 2 * width, start, seq, stride_s,
                                                  stride_s, head_dim, BLOCK_N, BLOCK_D, BLOCK_E)  # (BLOCK_N, BLOCK_D|E)
        p = _probs(q0, q1, k0, k1, lse, row_ok[:, None] & key_ok[None, :], scale, BLOCK_E, NATIVE)
        ds = p * (_scores(do0, do1, v0, v1, BLOCK_E, NATIVE) - delta)  # (BLOCK_M queries, BLOCK_N keys)
        dq0, dq1 = _acc_parts(dq0, dq1, ds, k0, k1, BLOCK_E, NATIVE)
    _store_parts(dqkv_ptr + dqkv_offs, dq0 * scale, dq1 * scale, rows, row_ok, 3 * width, head_dim, BLOCK_D, BLOCK_E)


def _native(qkv: torch.Tensor) -> bool:
    return qkv.dtype != torch.float32 and not interpreter_on()


def attention(qkv: torch.Tensor, num_heads: int,
              plan: AttentionPlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastmae::attention``: ``qkv (N, S, 3*H*Dh)`` -> ``(out (N, S, H*Dh)`` in qkv's dtype, ``lse (N, H, S)``
    fp32), tiled by ``plan`` (default: :func:`default_plan`)."""
    if qkv.stride(-1) != 1:  # the Linear's output always has it; anything else is copied once
        qkv = qkv.contiguous()
    n, seq, packed = qkv.shape
    head_dim = packed // (3 * num_heads)
    plan = plan or default_plan(seq, head_dim)
    plan.check(seq, head_dim)
    out = torch.empty((n, seq, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)  # (N, S, H*Dh)
    lse = torch.empty((n, num_heads, seq), dtype=torch.float32, device=qkv.device)  # (N, H, S)
    (block_n, block_t), (block_d, block_e) = plan.key_parts, plan.dim_parts
    if n * seq > 0 and plan.fwd_loop:
        _attention_fwd_loop_kernel[(triton.cdiv(seq, plan.fwd_block_m) * n * num_heads,)](
            qkv, out, lse, seq, num_heads, head_dim, qkv.stride(0), qkv.stride(1), head_dim**-0.5,
            BLOCK_M=plan.fwd_block_m, BLOCK_N=plan.fwd_loop, BLOCK_D=block_d, BLOCK_E=block_e, NATIVE=_native(qkv),
            num_warps=plan.fwd_warps)
    elif n * seq > 0:
        _attention_fwd_kernel[(triton.cdiv(seq, plan.fwd_block_m) * n * num_heads,)](
            qkv, out, lse, seq, num_heads, head_dim, qkv.stride(0), qkv.stride(1), head_dim**-0.5,
            BLOCK_M=plan.fwd_block_m, BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_E=block_e,
            NATIVE=_native(qkv), num_warps=plan.fwd_warps)
    return out, lse


def attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       num_heads: int, plan: AttentionPlan | None = None) -> torch.Tensor:
    """``fastmae::attention_backward``: ``grad_out (N, S, H*Dh)``, ``qkv (N, S, 3*H*Dh)``, ``out (N, S, H*Dh)``
    (read by the split form only), ``lse (N, H, S)`` fp32 -> ``d(qkv) (N, S, 3*H*Dh)`` in qkv's dtype, tiled by
    ``plan`` (default: :func:`default_plan`)."""
    grad_out, out = grad_out.contiguous(), out.contiguous()
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    n, seq, packed = qkv.shape
    head_dim = packed // (3 * num_heads)
    plan = plan or default_plan(seq, head_dim)
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
        _attention_bwd_kernel[(nh,)](
            qkv, grad_out, lse, dqkv, seq, num_heads, head_dim, *strides_scale,
            BLOCK_M=plan.bwd_block_m, BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_E=block_e,
            NATIVE=native, num_warps=plan.bwd_warps, num_stages=1)
        return dqkv
    delta = torch.empty((n, num_heads, seq), dtype=torch.float32, device=qkv.device)  # (N, H, S)
    _attention_bwd_delta_kernel[(triton.cdiv(seq, DELTA_BLOCK) * nh,)](
        out, grad_out, delta, seq, num_heads, head_dim, BLOCK_M=DELTA_BLOCK, BLOCK_D=block_d, BLOCK_E=block_e,
        num_warps=4)
    _attention_bwd_dkdv_kernel[(triton.cdiv(seq, plan.dkdv_block) * nh,)](
        qkv, grad_out, lse, delta, dqkv, seq, num_heads, head_dim, *strides_scale,
        BLOCK_N=plan.dkdv_block, BLOCK_M=plan.dkdv_step, BLOCK_D=block_d, BLOCK_E=block_e, NATIVE=native,
        num_warps=plan.dkdv_warps)
    _attention_bwd_dq_kernel[(triton.cdiv(seq, plan.dq_block) * nh,)](
        qkv, grad_out, lse, delta, dqkv, seq, num_heads, head_dim, *strides_scale,
        BLOCK_M=plan.dq_block, BLOCK_N=plan.dq_step, BLOCK_D=block_d, BLOCK_E=block_e, NATIVE=native,
        num_warps=plan.dq_warps)
    return dqkv


# argument types besides the derived ones (pointers in the dtype under test, i32 integers): fp32 statistics and scale
_LSE = {"lse_ptr": "*fp32", "scale": "fp32"}  # the forwards, the fused backward
_DELTA = {"delta_ptr": "*fp32"}  # the delta preprocess
_SPLIT = {**_LSE, **_DELTA}  # dK/dV, dQ


def aot_kernels(plan: AttentionPlan) -> list[AotKernel]:
    """Every kernel launch of ``plan``, forward and backward, for ``python -m fastmae.kernels.aot``."""
    (block_n, block_t), (block_d, block_e) = plan.key_parts, plan.dim_parts
    parts = {"BLOCK_N": block_n, "BLOCK_T": block_t, "BLOCK_D": block_d, "BLOCK_E": block_e, "NATIVE": True}
    label = f"N{block_n}+{block_t}-D{block_d}+{block_e}"
    if plan.fwd_loop:
        kernels = [AotKernel(fn=_attention_fwd_loop_kernel, overrides=_LSE,
                             constexprs={"BLOCK_M": plan.fwd_block_m, "BLOCK_N": plan.fwd_loop, "BLOCK_D": block_d,
                                         "BLOCK_E": block_e, "NATIVE": True},
                             num_warps=plan.fwd_warps, label=f"M{plan.fwd_block_m}-N{plan.fwd_loop}-D{block_d}+{block_e}")]
    else:
        kernels = [AotKernel(fn=_attention_fwd_kernel, overrides=_LSE,
                             constexprs={"BLOCK_M": plan.fwd_block_m, **parts}, num_warps=plan.fwd_warps,
                             label=f"M{plan.fwd_block_m}-{label}")]
    if plan.bwd_fused:
        return [*kernels, AotKernel(fn=_attention_bwd_kernel, overrides=_LSE,
                                    constexprs={"BLOCK_M": plan.bwd_block_m, **parts}, num_warps=plan.bwd_warps,
                                    num_stages=1, label=f"M{plan.bwd_block_m}-{label}")]
    dims = {"BLOCK_D": block_d, "BLOCK_E": block_e}
    return [
        *kernels,
        AotKernel(fn=_attention_bwd_delta_kernel, overrides=_DELTA, constexprs={"BLOCK_M": DELTA_BLOCK, **dims},
                  num_warps=4, label=f"D{block_d}+{block_e}"),
        AotKernel(fn=_attention_bwd_dkdv_kernel, overrides=_SPLIT,
                  constexprs={"BLOCK_N": plan.dkdv_block, "BLOCK_M": plan.dkdv_step, **dims, "NATIVE": True},
                  num_warps=plan.dkdv_warps, label=f"N{plan.dkdv_block}-M{plan.dkdv_step}-D{block_d}+{block_e}"),
        AotKernel(fn=_attention_bwd_dq_kernel, overrides=_SPLIT,
                  constexprs={"BLOCK_M": plan.dq_block, "BLOCK_N": plan.dq_step, **dims, "NATIVE": True},
                  num_warps=plan.dq_warps, label=f"M{plan.dq_block}-N{plan.dq_step}-D{block_d}+{block_e}"),
    ]


# MAE: ViT-B/L encoder S = 50, Dh = 64; ViT-H encoder S = 65, Dh = 80; decoder S = 197 / 257, Dh = 32.
MAE_SHAPES = ((50, 64), (65, 80), (197, 32), (257, 32))
# and two corners of what the op accepts: the auto pick's widest heads at its longest S, the op's largest tile
CORNER_SHAPES = ((257, 80), (512, 128))
AOT_KERNELS = [k for s, d in MAE_SHAPES + CORNER_SHAPES for k in aot_kernels(default_plan(s, d))]
