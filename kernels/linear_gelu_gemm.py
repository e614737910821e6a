"""linear_gelu as Triton GEMMs with fused epilogue/prologue: the ``triton-gemm`` backend (named only).

``out = gelu(x @ W^T + b)`` with the exact (erf) GELU, ``x (M, K)`` (the rows of ``x (..., K)``), ``W (N, K)``,
``b (N,)``. The ``triton`` backend (kernels/linear_gelu.py) leaves the GEMMs to cuBLAS and runs the bias +
GELU as separate passes; here the elementwise work rides inside the GEMMs. The custom ops
``fastmae::linear_gelu`` / ``fastmae::linear_gelu_backward`` (fastmae/ops/linear_gelu.py) call
:func:`linear_gelu` and :func:`linear_gelu_backward`.

What is saved (recompute-friendly): the forward's epilogue stores ``out`` and ``gate = gelu'(z) = Phi(z) +
z * phi(z)`` (``z = x @ W^T + b``, ``Phi``/``phi`` the normal cdf/density), both ``(M, N)`` in x's dtype; the
backward saves nothing else. Storing the pre-activation ``z`` instead costs the same bytes, but each backward
GEMM re-reads every element of its A operand once per output-column tile, so erf and exp (~25 CUDA-core
instructions) would be re-evaluated there ``K / BLOCK_K`` times, each against only ``2 * 128`` tensor-core
FLOPs (on an H100, ~990 bf16 TFLOP/s against ~34 T fp32 instructions/s: ~3x the MMA's time); with ``gate``
the prologue is ``dz = g * gate`` (two conversions, a multiply, a rounding: ~half the MMA's time, which
Hopper's asynchronous wgmma can overlap).

Kernels (``BLOCK_*`` name the problem's dimensions M rows, N features, K input features; every grid is 1-D,
walked ``GROUP`` output-row tiles at a time so neighbouring programs share operand tiles in L2):

- forward, grid ``cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)``: ``acc (BLOCK_M, BLOCK_N) += x_tile @ W_tile^T`` over K
  (fp32 accumulate), then the epilogue adds the bias and stores ``out`` and ``gate``.
- grad x, grid ``cdiv(M, BLOCK_M) * cdiv(K, BLOCK_K)``: ``dx = dz @ W`` over N; the prologue forms each
  ``dz`` tile from the ``g`` and ``gate`` tiles in fp32 and rounds it to the operand dtype.
- grad W and bias, grid ``cdiv(N, BLOCK_N) * max(1, cdiv(K, BLOCK_K))``: ``dW = dz^T @ x`` over M, the same
  prologue; each program also adds its fp32 ``dz`` tiles elementwise into a ``(BLOCK_M, BLOCK_N)`` register
  tile (one add per element, no per-step reduction that would stall the pipeline) and programs of the first
  K column reduce it once and store ``grad_bias`` (the sum of fp32 ``dz``, before rounding, as autograd sums
  it through the fp32 reference). Every program walks all of M in a fixed order: no split-K, no atomics, so
  results are bit-identical run to run.

Bytes besides the operands' compulsory reads (``e`` the element size; R x F = M x N, the hidden size):
  torch backend (cuBLAS, bias in its epilogue, then aten GELU): forward writes z, GELU reads z, writes out
    (3 RFe); backward: gelu_backward reads g, z, writes dz (3 RFe), the bias gradient reads dz (1 RFe), the
    two cuBLAS GEMMs read dz (2 RFe): 9 RFe.
  triton backend: forward writes h, bias_gelu reads h, writes out (3 RFe); backward reads g, h, writes dz
    (3 RFe, bias partials on the way), the two GEMMs read dz (2 RFe): 8 RFe.
  triton-gemm (this file): forward writes out and gate (2 RFe); each backward GEMM reads g and gate as its
    A operand (2 x 2 RFe): 6 RFe, and one launch fewer per direction (3 kernels in all).
At ViT-L's fc1 (R = 50 * batch, K = 1024, N = 4096, bf16) and batch 256, RFe = 105 MB: 2 to 3 RFe saved is
0.2 to 0.3 GB per layer and step, ~50 to 80 us at ~4 TB/s, against ~0.5 ms of GEMM (322 GFLOP). So this only
wins if these GEMMs run within ~10% of cuBLAS's rate. The price: the A operand of both backward GEMMs is two
tensors (twice its L2/shared-memory traffic); the prologue's conversions and multiply run on CUDA cores
inside the main loop; the forward's epilogue (erf + exp, ~35 instructions per output element, against
``2 * K`` = 2048 tensor-core FLOPs per element at K = 1024: about half the main loop's time) is not overlapped
with the next tile's MMAs (no persistent kernel), while the separate bias_gelu pass overlaps the same math
with its memory traffic; the grad-W kernel's bias accumulator holds BLOCK_M x BLOCK_N / threads (32) more
registers per thread.
NOT MEASURED (no GPU where this was written): the backend stays named-only, never chosen by priority, until
a GPU run (bench/test_bench_ops.py, row linear_gelu-triton-gemm) shows it faster than cuBLAS + the fused
elementwise kernels (the ``triton`` backend) and the ``torch`` backend.

Tiles, one fixed configuration per kernel and dtype class (no runtime autotuning: the same program on every
call): bf16/fp16 output tiles of 128 x 128 with 64-deep reduction steps, 8 warps, 3 stages. Compiled ahead of
time (``python -m fastmae.kernels.aot``, N and K multiples of 16) they use 160 to 216 registers per thread, no
spills, and 64 to 112 KiB of shared memory (sm_80 / sm_90: forward 64 / 96, grad x and grad W 96 / 112 KiB),
within an A100's 163 KiB and an H100's 227 KiB. N or K not a multiple of 16 (no MAE width) makes the JIT
compile a variant whose tile loads cannot be pipelined (row starts not 16-byte aligned): correct, slow.
fp32 (tests, and fp32 models; tf32 only where torch allows it for matmuls): 64 x 64 outputs, 32-deep steps,
4 warps (8 for grad x, which spills at 4 on sm_80). Under the interpreter (tests) smaller tiles and GROUP 2, so
the tests' odd shapes cover several tiles, a ragged group and ragged edges. Operands are made contiguous by
the launchers (a no-op for nn.Linear's tensors): the kernels index rows with implied strides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastmae.kernels._common import interpreter_on
from fastmae.kernels.aot import AotKernel

SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch configuration: ``block_m`` rows, ``block_n`` features, ``block_k`` input features (two
    of them the output tile, the third the reduction step), ``group`` output-row tiles per L2 group."""

    block_m: int
    block_n: int
    block_k: int
    group: int
    num_warps: int
    num_stages: int

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP": self.group}


# kernel -> tiles; "fwd": out (M, N) reduce K; "dx": dx (M, K) reduce N; "dw": dW (N, K) reduce M
GPU_TILES = {"fwd": Tiles(128, 128, 64, 8, 8, 3), "dx": Tiles(128, 64, 128, 8, 8, 3),
             "dw": Tiles(64, 128, 128, 8, 8, 3)}
GPU_FP32_TILES = {"fwd": Tiles(64, 64, 32, 8, 4, 3), "dx": Tiles(64, 32, 64, 8, 8, 3),
                  "dw": Tiles(32, 64, 64, 8, 4, 3)}
INTERPRETER_TILES = {"fwd": Tiles(32, 64, 32, 2, 4, 1), "dx": Tiles(32, 64, 32, 2, 4, 1),
                     "dw": Tiles(32, 64, 32, 2, 4, 1)}


@triton.jit
def _grouped(pid, tiles_a, tiles_b, GROUP: tl.constexpr):
    """``(pid_a, pid_b)`` of program ``pid`` in a ``tiles_a x tiles_b`` grid walked ``GROUP`` a-tiles at a time
    (the last group may be ragged): consecutive programs share b-tiles and a-tiles in L2."""
    per_group = GROUP * tiles_b
    first_a = (pid // per_group) * GROUP
    size = tl.minimum(tiles_a - first_a, GROUP)
    return first_a + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _linear_gelu_fwd_kernel(
    x_ptr,  # (M, K) contiguous
    w_ptr,  # (N, K) contiguous, x's dtype
    bias_ptr,  # (N,)
    out_ptr,  # (M, N) gelu(z), x's dtype
    gate_ptr,  # (M, N) gelu'(z), x's dtype
    num_rows,  # M
    features,  # N
    d_in,  # K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    DOT_FP32: tl.constexpr,  # dot in fp32 (the interpreter's numpy matmul cannot multiply bf16)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
):
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(num_rows, BLOCK_M), tl.cdiv(features, BLOCK_N), GROUP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    ks = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    row_ok = rows < num_rows
    col_ok = cols < features
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * d_in + ks[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * d_in + ks[:, None]  # (BLOCK_K, BLOCK_N): a tile of W^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        k_ok = ks < d_in - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    z = acc + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]  # (BLOCK_M, BLOCK_N)
    cdf = 0.5 * (1.0 + tl.math.erf(z * SQRT1_2))
    pdf = tl.exp(-0.5 * z * z) * INV_SQRT_2PI
    offs = rows.to(tl.int64)[:, None] * features + cols[None, :]  # (BLOCK_M, BLOCK_N)
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + offs, (z * cdf).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(gate_ptr + offs, (cdf + z * pdf).to(gate_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _linear_gelu_bwd_dx_kernel(
    g_ptr,  # (M, N) gradient of out, contiguous
    gate_ptr,  # (M, N) gelu'(z)
    w_ptr,  # (N, K) contiguous
    dx_ptr,  # (M, K) gradient of x, W's dtype
    num_rows,  # M
    features,  # N
    d_in,  # K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_k = _grouped(tl.program_id(0), tl.cdiv(num_rows, BLOCK_M), tl.cdiv(d_in, BLOCK_K), GROUP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    kcols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    ns = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < num_rows
    k_ok = kcols < d_in
    hidden = rows.to(tl.int64)[:, None] * features + ns[None, :]  # (BLOCK_M, BLOCK_N)
    g_ptrs = g_ptr + hidden
    gate_ptrs = gate_ptr + hidden
    w_ptrs = w_ptr + ns.to(tl.int64)[:, None] * d_in + kcols[None, :]  # (BLOCK_N, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, features, BLOCK_N):
        n_ok = ns < features - n0
        ok = row_ok[:, None] & n_ok[None, :]
        g = tl.load(g_ptrs, mask=ok, other=0.0).to(tl.float32)  # 0 outside the valid part
        dz = g * tl.load(gate_ptrs, mask=ok, other=0.0).to(tl.float32)  # dz = g * gelu'(z)
        a = dz.to(w_ptr.dtype.element_ty)  # (BLOCK_M, BLOCK_N) rounded to the operand dtype, as cuBLAS takes dh
        b = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        g_ptrs += BLOCK_N
        gate_ptrs += BLOCK_N
        w_ptrs += BLOCK_N * d_in
    offs = rows.to(tl.int64)[:, None] * d_in + kcols[None, :]  # (BLOCK_M, BLOCK_K)
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _linear_gelu_bwd_dw_kernel(
    g_ptr,  # (M, N) gradient of out, contiguous
    gate_ptr,  # (M, N) gelu'(z)
    x_ptr,  # (M, K) contiguous
    dw_ptr,  # (N, K) gradient of W, x's dtype
    dbias_ptr,  # (N,) gradient of the bias, in its dtype
    num_rows,  # M
    features,  # N
    d_in,  # K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    k_tiles = tl.maximum(tl.cdiv(d_in, BLOCK_K), 1)  # K = 0 still has programs: they write the bias gradient
    pid_n, pid_k = _grouped(tl.program_id(0), tl.cdiv(features, BLOCK_N), k_tiles, GROUP)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    kcols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    ms = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    col_ok = cols < features
    k_ok = kcols < d_in
    hidden = ms.to(tl.int64)[:, None] * features + cols[None, :]  # (BLOCK_M, BLOCK_N)
    g_ptrs = g_ptr + hidden
    gate_ptrs = gate_ptr + hidden
    x_ptrs = x_ptr + ms.to(tl.int64)[:, None] * d_in + kcols[None, :]  # (BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for m0 in range(0, num_rows, BLOCK_M):
        m_ok = ms < num_rows - m0
        ok = m_ok[:, None] & col_ok[None, :]
        g = tl.load(g_ptrs, mask=ok, other=0.0).to(tl.float32)  # 0 outside the valid part
        dz = g * tl.load(gate_ptrs, mask=ok, other=0.0).to(tl.float32)  # dz = g * gelu'(z)
        db_acc += dz
        a = tl.trans(dz.to(x_ptr.dtype.element_ty))  # (BLOCK_N, BLOCK_M)
        b = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        g_ptrs += BLOCK_M * features
        gate_ptrs += BLOCK_M * features
        x_ptrs += BLOCK_M * d_in
    offs = cols.to(tl.int64)[:, None] * d_in + kcols[None, :]  # (BLOCK_N, BLOCK_K)
    tl.store(dw_ptr + offs, acc.to(dw_ptr.dtype.element_ty), mask=col_ok[:, None] & k_ok[None, :])
    if pid_k == 0:
        tl.store(dbias_ptr + cols, tl.sum(db_acc, axis=0).to(dbias_ptr.dtype.element_ty), mask=col_ok)


def _tiles(kernel: str, dtype: torch.dtype) -> Tiles:
    if interpreter_on():
        return INTERPRETER_TILES[kernel]
    return (GPU_FP32_TILES if dtype == torch.float32 else GPU_TILES)[kernel]


def _dot_options(dtype: torch.dtype) -> dict[str, object]:
    """The dot's constexprs: fp32 operands in the interpreter (no bf16 matmul there); fp32 inputs in IEEE fp32
    unless torch allows tf32 for matmuls (as F.linear)."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreter_on()
    return {"DOT_FP32": interpreter_on(), "DOT_PRECISION": "tf32" if tf32 else "ieee"}


def _check_dtypes(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype != weight.dtype:
        raise TypeError(f"linear_gelu (triton-gemm): x and weight must share a dtype, got {x.dtype} and "
                        f"{weight.dtype}")


def _launch(fn: object, kernel: str, programs: int, dtype: torch.dtype, *args: object) -> None:
    tiles = _tiles(kernel, dtype)
    if programs > 0:
        fn[(programs,)](*args, **tiles.constexprs(), **_dot_options(dtype), num_warps=tiles.num_warps,
                        num_stages=tiles.num_stages)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastmae::linear_gelu``: ``x (..., K)``, ``weight (N, K)`` (x's dtype), ``bias (N,)`` (any float dtype)
    -> ``(out, gate)``, both ``(..., N)`` in x's dtype: ``out = gelu(x @ weight^T + bias)``, ``gate`` its
    derivative at the same point, what the backward needs."""
    _check_dtypes(x, weight)
    d_in, features = x.shape[-1], weight.shape[0]
    num_rows = math.prod(x.shape[:-1])  # M
    x2 = x.reshape(num_rows, d_in).contiguous()  # (M, K)
    out = torch.empty((*x.shape[:-1], features), dtype=x.dtype, device=x.device)  # (..., N)
    gate = torch.empty_like(out)
    tiles = _tiles("fwd", x.dtype)
    programs = triton.cdiv(num_rows, tiles.block_m) * triton.cdiv(features, tiles.block_n)
    _launch(_linear_gelu_fwd_kernel, "fwd", programs, x.dtype, x2, weight.contiguous(), bias.contiguous(), out,
            gate, num_rows, features, d_in)
    return out, gate


def linear_gelu_backward(grad: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fastmae::linear_gelu_backward``: ``grad (..., N)`` of out, ``gate (..., N)`` (the forward's), ``x (...,
    K)``, ``weight (N, K)``, ``bias (N,)`` -> ``(grad_x (..., K)``, ``grad_weight (N, K)`` in x's dtype,
    ``grad_bias (N,)`` in the bias's dtype)."""
    _check_dtypes(x, weight)
    d_in, features = x.shape[-1], weight.shape[0]
    num_rows = math.prod(x.shape[:-1])  # M
    x2 = x.reshape(num_rows, d_in).contiguous()  # (M, K)
    g2 = grad.reshape(num_rows, features).contiguous()  # (M, N)
    gate2 = gate.reshape(num_rows, features).contiguous()  # (M, N)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (..., K)
    grad_weight = torch.empty((features, d_in), dtype=x.dtype, device=x.device)
    grad_bias = torch.empty((features,), dtype=bias.dtype, device=x.device)
    dx, dw = _tiles("dx", x.dtype), _tiles("dw", x.dtype)
    _launch(_linear_gelu_bwd_dx_kernel, "dx", triton.cdiv(num_rows, dx.block_m) * triton.cdiv(d_in, dx.block_k),
            x.dtype, g2, gate2, weight.contiguous(), grad_x, num_rows, features, d_in)
    _launch(_linear_gelu_bwd_dw_kernel, "dw",
            triton.cdiv(features, dw.block_n) * max(1, triton.cdiv(d_in, dw.block_k)),
            x.dtype, g2, gate2, x2, grad_weight, grad_bias, num_rows, features, d_in)
    return grad_x, grad_weight, grad_bias


def _aot() -> list[AotKernel]:
    """The bf16/fp16 GPU configurations, with the bias in x's dtype and, as under autocast (the fp32
    fc1.bias), in fp32; N and K multiples of 16 (every MAE width), as the JIT specialises them there."""
    def config(fn: object, name: str, overrides: dict[str, str] | None = None, label: str = "") -> AotKernel:
        tiles = GPU_TILES[name]
        return AotKernel(fn=fn, constexprs={**tiles.constexprs(), "DOT_FP32": False, "DOT_PRECISION": "ieee"},
                         overrides=overrides or {}, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                         label=label, divisible_by_16=("features", "d_in"))

    kernels = [config(_linear_gelu_bwd_dx_kernel, "dx")]
    for label, bias_type in (("", "*{dtype}"), ("autocast", "*fp32")):
        kernels += [config(_linear_gelu_fwd_kernel, "fwd", {"bias_ptr": bias_type}, label),
                    config(_linear_gelu_bwd_dw_kernel, "dw", {"dbias_ptr": bias_type}, label)]
    return kernels


AOT_KERNELS = _aot()
