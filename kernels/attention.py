"""attention in Triton: softmax((q @ k^T) * Dh**-0.5) @ v per head, read in place from the packed qkv.

``qkv (N, S, 3*H*Dh)`` is the qkv Linear's output (last dim packed as ``(3, H, Dh)``, unit stride);
q, k and v of head ``h`` are read with strides (no transposes, no copies); the output is written as
``(N, S, H*Dh)``, ready for the projection, and the gradient as ``d(qkv) (N, S, 3*H*Dh)``.

Forward, grid ``(cdiv(S, BLOCK_M), N*H)``: S <= MAX_S, so a program holds the whole K and V of its
head (``BLOCK_N = next_pow2(S)``) and ``BLOCK_M`` query rows (64; 16 at BLOCK_N = 512, where 32 spills):
one fp32 score tile, an exact (not online) softmax in fp32, ``P @ V``, and the logsumexp
``lse (N, H, S)`` fp32 saved for the backward. Head dims up to 128 (``BLOCK_D = next_pow2(Dh)``, 80
with masked loads).

Backward, no atomics, two forms chosen by the tile ``BLOCK_N * BLOCK_D``:
  * fused (tile <= 256*32: ViT-B/L's encoder, S <= 64 at Dh 64, and decoder, S <= 256 at Dh 32), grid
    ``(N*H,)``: one program per head holds K, V, dK and dV and walks the queries ``BLOCK_M`` at a time
    (32, or 16 for the larger tiles), recomputing ``P`` from the lse; each query block's row of ``P`` is
    whole, so ``delta = rowsum(P * dP)`` (equal to ``rowsum(dO * O)``) needs neither O nor a pre-pass,
    and dQ is written straight away. One launch, q/k/v/dO each read once.
  * split (larger tiles: ViT-H's Dh 80 padded to 128, and S = 257 padded to 512), flash-attention-2's
    three launches: ``delta = rowsum(dO * O)`` ``(N, H, S)``, grid ``(cdiv(S, 64), N*H)``; dK/dV, grid
    ``(cdiv(S, 32), N*H)``, a program owns 32 keys and walks all queries 32 at a time; dQ, grid
    ``(cdiv(S, 64), N*H)``, a program owns 64 queries (32 at Dh > 64) and walks all keys as many at a time.
  Both write ``d(qkv)`` in the packed layout; tile sizes are the largest without spills on sm_80/sm_90.

Matmuls accumulate in fp32; softmax, its statistics and the gradients' elementwise math are fp32.
fp32 inputs use exact fp32 products (``input_precision="ieee"``). bf16/fp16 inputs on a GPU feed the
tensor cores in their own dtype, with P and dS rounded to it before their matmuls (as flash-attention
does); under the interpreter (whose bf16 ``tl.dot`` is wrong in Triton 3.8) they are multiplied in fp32.

Bytes moved (``e``: element size of qkv; ``T = N*S*H*Dh``; ``c(b) = cdiv(S, b)``):
  forward  = T*e (q) + c(BLOCK_M)*2*T*e (k, v per query block) + T*e (out) + 4*N*H*S (lse)
  fused backward = 4*T*e (q, k, v, dO) + 4*N*H*S (lse) + 3*T*e (dqkv)
  split backward = 2*T*e + 4*N*H*S (delta)
             + 2*T*e + c(32)*(2*T*e + 8*N*H*S) + 2*T*e (dK/dV: k, v; q, dO, lse, delta per key block)
             + 2*T*e + 8*N*H*S + c(64)*2*T*e + T*e (dQ: q, dO, stats; k, v per query block)
  (at MAE's S <= 257 the re-reads of one head's q/k/v/dO, <= 66 KB, hit L2.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._common import interpreter_on, wrap_triton
from fastmae.kernels.aot import AotKernel

MAX_S = 512  # the whole K/V of a head in one tile
MAX_HEAD_DIM = 128
FUSED_BWD_MAX_TILE = 256 * 32  # BLOCK_N * BLOCK_D up to which one program per head does the whole backward
DELTA_BLOCK = 64  # split backward: rows per program of the delta preprocess
DKDV_BLOCK = 32  # split backward: keys per dK/dV program, and queries per step of its loop
DQ_BLOCK = 64  # split backward: queries per dQ program, and keys per step of its loop (32 at BLOCK_D 128)


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
    BLOCK_D: tl.constexpr,
    NATIVE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // num_heads).to(tl.int64)
    h = pid_nh % num_heads
    width = num_heads * head_dim  # H*Dh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
    keys = tl.arange(0, BLOCK_N)  # (BLOCK_N,) all key positions
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = rows < seq
    key_ok = keys < seq
    dim_ok = dims < head_dim
    base = qkv_ptr + n * stride_n + h * head_dim
    q = tl.load(base + rows[:, None] * stride_s + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    kv_offs = keys[:, None] * stride_s + dims[None, :]  # (BLOCK_N, BLOCK_D)
    kv_ok = key_ok[:, None] & dim_ok[None, :]
    k = tl.load(base + width + kv_offs, mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(base + 2 * width + kv_offs, mask=kv_ok, other=0.0)
    s = _dot(q, tl.trans(k), NATIVE) * scale  # (BLOCK_M, BLOCK_N)
    s = tl.where(key_ok[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)  # (BLOCK_M,)
    p = tl.exp(s - m[:, None])
    l = tl.sum(p, axis=1)  # (BLOCK_M,)
    o = _dot(p, v, NATIVE) / l[:, None]  # (BLOCK_M, BLOCK_D)
    out_offs = n * seq * width + rows[:, None] * width + h * head_dim + dims[None, :]
    tl.store(out_ptr + out_offs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + pid_nh.to(tl.int64) * seq + rows, m + tl.log(l), mask=row_ok)


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
    BLOCK_D: tl.constexpr,
    NATIVE: tl.constexpr,
):
    pid_nh = tl.program_id(0)
    n = (pid_nh // num_heads).to(tl.int64)
    h = pid_nh % num_heads
    width = num_heads * head_dim  # H*Dh
    keys = tl.arange(0, BLOCK_N)  # (BLOCK_N,) all key positions
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    key_ok = keys < seq
    dim_ok = dims < head_dim
    kv_ok = key_ok[:, None] & dim_ok[None, :]
    base = qkv_ptr + n * stride_n + h * head_dim
    kv_offs = keys[:, None] * stride_s + dims[None, :]  # (BLOCK_N, BLOCK_D)
    k = tl.load(base + width + kv_offs, mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(base + 2 * width + kv_offs, mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    stats = pid_nh.to(tl.int64) * seq
    dout_base = dout_ptr + n * seq * width + h * head_dim
    grad_base = dqkv_ptr + n * seq * 3 * width + h * head_dim
    for start in range(0, seq, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
        row_ok = rows < seq
        q_ok = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(base + rows[:, None] * stride_s + dims[None, :], mask=q_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(dout_base + rows[:, None] * width + dims[None, :], mask=q_ok, other=0.0)
        lse = tl.load(lse_ptr + stats + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
        s = _dot(q, tl.trans(k), NATIVE) * scale  # (BLOCK_M, BLOCK_N)
        p = tl.where(row_ok[:, None] & key_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), NATIVE)  # (BLOCK_M, BLOCK_N)
        delta = tl.sum(p * dp, axis=1)  # (BLOCK_M,) = rowsum(dO * O): the whole row is here
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dv += _dot(tl.trans(p), do, NATIVE)  # (BLOCK_N, BLOCK_D)
        dk += _dot(tl.trans(ds), q, NATIVE)
        dq = _dot(ds, k, NATIVE) * scale  # (BLOCK_M, BLOCK_D)
        tl.store(grad_base + rows[:, None] * 3 * width + dims[None, :], dq.to(dqkv_ptr.dtype.element_ty),
                 mask=q_ok)
    offs = keys[:, None] * 3 * width + dims[None, :]  # (BLOCK_N, BLOCK_D)
    tl.store(grad_base + width + offs, (dk * scale).to(dqkv_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(grad_base + 2 * width + offs, dv.to(dqkv_ptr.dtype.element_ty), mask=kv_ok)


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
):
    pid_nh = tl.program_id(1)
    n = (pid_nh // num_heads).to(tl.int64)
    h = pid_nh % num_heads
    width = num_heads * head_dim
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = rows < seq
    ok = row_ok[:, None] & (dims < head_dim)[None, :]
    offs = n * seq * width + rows[:, None] * width + h * head_dim + dims[None, :]  # (BLOCK_M, BLOCK_D)
    o = tl.load(out_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_nh.to(tl.int64) * seq + rows, tl.sum(o * do, axis=1), mask=row_ok)


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
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NATIVE: tl.constexpr,
):
    pid_nh = tl.program_id(1)
    n = (pid_nh // num_heads).to(tl.int64)
    h = pid_nh % num_heads
    width = num_heads * head_dim
    keys = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) this program's keys
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    key_ok = keys < seq
    dim_ok = dims < head_dim
    kv_ok = key_ok[:, None] & dim_ok[None, :]
    base = qkv_ptr + n * stride_n + h * head_dim
    kv_offs = keys[:, None] * stride_s + dims[None, :]  # (BLOCK, BLOCK_D)
    k = tl.load(base + width + kv_offs, mask=kv_ok, other=0.0)
    v = tl.load(base + 2 * width + kv_offs, mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    stats = pid_nh.to(tl.int64) * seq
    for start in range(0, seq, BLOCK):
        rows = start + tl.arange(0, BLOCK)  # (BLOCK,) query positions
        row_ok = rows < seq
        q_ok = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(base + rows[:, None] * stride_s + dims[None, :], mask=q_ok, other=0.0)
        do = tl.load(dout_ptr + n * seq * width + rows[:, None] * width + h * head_dim + dims[None, :],
                     mask=q_ok, other=0.0)  # (BLOCK, BLOCK_D)
        lse = tl.load(lse_ptr + stats + rows, mask=row_ok, other=0.0)  # (BLOCK,)
        delta = tl.load(delta_ptr + stats + rows, mask=row_ok, other=0.0)
        st = _dot(k, tl.trans(q), NATIVE) * scale  # (BLOCK keys, BLOCK queries)
        pt = tl.where(key_ok[:, None] & row_ok[None, :], tl.exp(st - lse[None, :]), 0.0)
        dv += _dot(pt, do, NATIVE)
        dpt = _dot(v, tl.trans(do), NATIVE)  # (BLOCK keys, BLOCK queries)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst, q, NATIVE)
    offs = n * seq * 3 * width + keys[:, None] * 3 * width + h * head_dim + dims[None, :]
    tl.store(dqkv_ptr + width + offs, (dk * scale).to(dqkv_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(dqkv_ptr + 2 * width + offs, dv.to(dqkv_ptr.dtype.element_ty), mask=kv_ok)


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
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NATIVE: tl.constexpr,
):
    pid_nh = tl.program_id(1)
    n = (pid_nh // num_heads).to(tl.int64)
    h = pid_nh % num_heads
    width = num_heads * head_dim
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) this program's queries
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = rows < seq
    dim_ok = dims < head_dim
    q_ok = row_ok[:, None] & dim_ok[None, :]
    base = qkv_ptr + n * stride_n + h * head_dim
    q = tl.load(base + rows[:, None] * stride_s + dims[None, :], mask=q_ok, other=0.0)
    do = tl.load(dout_ptr + n * seq * width + rows[:, None] * width + h * head_dim + dims[None, :],
                 mask=q_ok, other=0.0)  # (BLOCK, BLOCK_D)
    stats = pid_nh.to(tl.int64) * seq
    lse = tl.load(lse_ptr + stats + rows, mask=row_ok, other=0.0)  # (BLOCK,)
    delta = tl.load(delta_ptr + stats + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    for start in range(0, seq, BLOCK):
        keys = start + tl.arange(0, BLOCK)  # (BLOCK,) key positions
        key_ok = keys < seq
        kv_ok = key_ok[:, None] & dim_ok[None, :]
        kv_offs = keys[:, None] * stride_s + dims[None, :]  # (BLOCK, BLOCK_D)
        k = tl.load(base + width + kv_offs, mask=kv_ok, other=0.0)
        v = tl.load(base + 2 * width + kv_offs, mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), NATIVE) * scale  # (BLOCK queries, BLOCK keys)
        p = tl.where(row_ok[:, None] & key_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), NATIVE)
        dq += _dot(p * (dp - delta[:, None]), k, NATIVE)
    offs = n * seq * 3 * width + rows[:, None] * 3 * width + h * head_dim + dims[None, :]
    tl.store(dqkv_ptr + offs, (dq * scale).to(dqkv_ptr.dtype.element_ty), mask=q_ok)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _fwd_blocks(seq: int, head_dim: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` of the forward (no spills on sm_80/sm_90 at the AOT configs)."""
    block_n = max(16, triton.next_power_of_2(seq))
    block_m = 16 if block_n >= 512 else 64
    return block_m, block_n, 4 if block_n <= 128 and _block_d(head_dim) <= 64 else 8


def _fused_backward(seq: int, head_dim: int) -> bool:
    """Whether one program per head can hold K, V and their fp32 gradients (MAE's ViT-B/L shapes): the
    backward is then one launch, several times faster than SDPA's kernels at these shapes."""
    return max(16, triton.next_power_of_2(seq)) * _block_d(head_dim) <= FUSED_BWD_MAX_TILE


def _fused_bwd_blocks(seq: int, head_dim: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` of the fused backward (8 warps, one stage: no spills on sm_80/sm_90)."""
    block_n = max(16, triton.next_power_of_2(seq))
    return (32 if block_n * _block_d(head_dim) <= 64 * 64 else 16), block_n


def _dkdv_warps(block_d: int) -> int:
    return 8 if block_d >= 128 else 4


def _dq_warps(block_d: int) -> int:
    return 8 if block_d >= 64 else 4


def _dq_block(block_d: int) -> int:
    """Queries per dQ program: 64, or 32 at BLOCK_D 128 (64 spills there with Triton 3.6's ptxas on sm_90)."""
    return DQ_BLOCK // 2 if block_d >= 128 else DQ_BLOCK


@torch.library.triton_op("fastmae_triton::attention", mutates_args=())
def attention_op(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``qkv (N, S, 3*H*Dh)`` with unit last stride -> ``(out (N, S, H*Dh)`` in qkv's dtype,
    ``lse (N, H, S)`` fp32)."""
    n, seq, packed = qkv.shape
    head_dim = packed // (3 * num_heads)
    out = torch.empty((n, seq, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)  # (N, S, H*Dh)
    lse = torch.empty((n, num_heads, seq), dtype=torch.float32, device=qkv.device)  # (N, H, S)
    block_m, block_n, num_warps = _fwd_blocks(seq, head_dim)
    native = qkv.dtype != torch.float32 and not interpreter_on()
    if n * seq > 0:
        wrap_triton(_attention_fwd_kernel)[(triton.cdiv(seq, block_m), n * num_heads)](
            qkv, out, lse, seq, num_heads, head_dim, qkv.stride(0), qkv.stride(1), head_dim**-0.5,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim), NATIVE=native, num_warps=num_warps)
    return out, lse


@torch.library.triton_op("fastmae_triton::attention_backward", mutates_args=())
def attention_backward_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          num_heads: int) -> torch.Tensor:
    """Contiguous ``grad_out (N, S, H*Dh)``, ``qkv (N, S, 3*H*Dh)`` (unit last stride), contiguous
    ``out (N, S, H*Dh)`` (read by the split backward only), ``lse (N, H, S)`` fp32 -> ``d(qkv) (N, S, 3*H*Dh)``
    in qkv's dtype."""
    n, seq, packed = qkv.shape
    head_dim = packed // (3 * num_heads)
    dqkv = torch.empty((n, seq, packed), dtype=qkv.dtype, device=qkv.device)  # (N, S, 3*H*Dh)
    if n * seq == 0:
        return dqkv
    block_d = _block_d(head_dim)
    nh = n * num_heads
    scale = head_dim**-0.5
    native = qkv.dtype != torch.float32 and not interpreter_on()
    if _fused_backward(seq, head_dim):
        block_m, block_n = _fused_bwd_blocks(seq, head_dim)
        wrap_triton(_attention_bwd_kernel)[(nh,)](
            qkv, grad_out, lse, dqkv, seq, num_heads, head_dim, qkv.stride(0), qkv.stride(1), scale,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, NATIVE=native, num_warps=8, num_stages=1)
        return dqkv
    delta = torch.empty((n, num_heads, seq), dtype=torch.float32, device=qkv.device)  # (N, H, S)
    wrap_triton(_attention_bwd_delta_kernel)[(triton.cdiv(seq, DELTA_BLOCK), nh)](
        out, grad_out, delta, seq, num_heads, head_dim, BLOCK_M=DELTA_BLOCK, BLOCK_D=block_d, num_warps=4)
    wrap_triton(_attention_bwd_dkdv_kernel)[(triton.cdiv(seq, DKDV_BLOCK), nh)](
        qkv, grad_out, lse, delta, dqkv, seq, num_heads, head_dim, qkv.stride(0), qkv.stride(1), scale,
        BLOCK=DKDV_BLOCK, BLOCK_D=block_d, NATIVE=native, num_warps=_dkdv_warps(block_d))
    wrap_triton(_attention_bwd_dq_kernel)[(triton.cdiv(seq, _dq_block(block_d)), nh)](
        qkv, grad_out, lse, delta, dqkv, seq, num_heads, head_dim, qkv.stride(0), qkv.stride(1), scale,
        BLOCK=_dq_block(block_d), BLOCK_D=block_d, NATIVE=native, num_warps=_dq_warps(block_d))
    return dqkv


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
_SIG_FWD = {"qkv_ptr": "*{dtype}", "out_ptr": "*{dtype}", "lse_ptr": "*fp32", **_COMMON, **_STRIDES,
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "NATIVE": "constexpr"}
_SIG_BWD_FUSED = {"qkv_ptr": "*{dtype}", "dout_ptr": "*{dtype}", "lse_ptr": "*fp32", "dqkv_ptr": "*{dtype}",
                  **_COMMON, **_STRIDES,
                  "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "NATIVE": "constexpr"}
_SIG_DELTA = {"out_ptr": "*{dtype}", "dout_ptr": "*{dtype}", "delta_ptr": "*fp32", **_COMMON,
              "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"}
_SIG_BWD_SPLIT = {"qkv_ptr": "*{dtype}", "dout_ptr": "*{dtype}", "lse_ptr": "*fp32", "delta_ptr": "*fp32",
                  "dqkv_ptr": "*{dtype}", **_COMMON, **_STRIDES,
                  "BLOCK": "constexpr", "BLOCK_D": "constexpr", "NATIVE": "constexpr"}


def _aot_fwd(seq: int, head_dim: int) -> AotKernel:
    block_m, block_n, num_warps = _fwd_blocks(seq, head_dim)
    block_d = _block_d(head_dim)
    return AotKernel(fn=_attention_fwd_kernel, signature=_SIG_FWD,
                     constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "NATIVE": True},
                     num_warps=num_warps, label=f"N{block_n}-D{block_d}")


def _aot_bwd(seq: int, head_dim: int) -> list[AotKernel]:
    block_d = _block_d(head_dim)
    if _fused_backward(seq, head_dim):
        block_m, block_n = _fused_bwd_blocks(seq, head_dim)
        return [AotKernel(fn=_attention_bwd_kernel, signature=_SIG_BWD_FUSED,
                          constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "NATIVE": True},
                          num_warps=8, num_stages=1, label=f"N{block_n}-D{block_d}")]
    label = f"D{block_d}"
    return [
        AotKernel(fn=_attention_bwd_delta_kernel, signature=_SIG_DELTA,
                  constexprs={"BLOCK_M": DELTA_BLOCK, "BLOCK_D": block_d}, num_warps=4, label=label),
        AotKernel(fn=_attention_bwd_dkdv_kernel, signature=_SIG_BWD_SPLIT,
                  constexprs={"BLOCK": DKDV_BLOCK, "BLOCK_D": block_d, "NATIVE": True},
                  num_warps=_dkdv_warps(block_d), label=label),
        AotKernel(fn=_attention_bwd_dq_kernel, signature=_SIG_BWD_SPLIT,
                  constexprs={"BLOCK": _dq_block(block_d), "BLOCK_D": block_d, "NATIVE": True},
                  num_warps=_dq_warps(block_d), label=label),
    ]


# MAE: ViT-B/L encoder S = 50, Dh = 64; ViT-H encoder S = 65, Dh = 80; decoder S = 197 / 257, Dh = 32.
MAE_SHAPES = ((50, 64), (65, 80), (197, 32), (257, 32))
AOT_KERNELS = [*(_aot_fwd(s, d) for s, d in MAE_SHAPES), *(k for s, d in MAE_SHAPES for k in _aot_bwd(s, d))]
