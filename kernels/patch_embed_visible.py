"""patch_embed_visible in Triton: the patch embedding of the kept patches only, as one gathered GEMM.

Fused (forward): patchify + gather of the kept patches + ``(N*K, C*p*p) @ (C*p*p, D)`` + bias + the
kept rows of ``pos_embed``. The A tiles are read straight from ``imgs (N, C, H, W)`` (any N, C, H
strides; a copy only when W is not contiguous, e.g. channels-last):
row ``m = n*K + k`` of A is patch ``ids_keep[n, k]`` (row-major over the ``(H/p, W/p)`` grid), column
``r = (c*p + i)*p + j`` is pixel ``imgs[n, c, ph*p + i, pw*p + j]``, the conv weight's ``(c, i, j)``
order, so no patchified copy of the image exists. Grid: one program per ``BLOCK_M x BLOCK_N`` output
tile, the D tiles of one row block adjacent in launch order (they share the gathered A rows in L2).

Backward: ``grad_weight (D, C*p*p) = grad_out^T @ A`` with A gathered the same way, and
``grad_bias = grad_out.sum(rows)`` fused into the programs of the first ``C*p*p`` tile. Grid: one
program per ``BLOCK_D x BLOCK_R`` tile of grad_weight and per split of the rows; the splits write fp32
partials that ``torch.sum`` adds in a fixed order (no atomics: bit-identical run to run). The split
count makes about ``_TARGET_PROGRAMS`` programs (two per SM on an H100) with at least ``_MIN_ROWS``
rows each. Images and ``pos_embed`` get no gradient (the backend's supports rule refuses them).

Numerics: operands are fed to ``tl.dot`` in the input dtype (bf16/fp16 tensor cores; fp32 with
``input_precision="ieee"``, like torch without TF32) with fp32 accumulation; under the interpreter,
which has no bf16 arithmetic, they are cast to fp32 first (bf16/fp16 products are exact in fp32, so
only the summation order differs). As in the reference (``F.linear`` in the input dtype X, then
``+ pos``), ``acc + bias`` is rounded to X before pos is added and the sum is stored in
``promote(X, pos dtype)``; the backward rounds ``grad_out`` to X first, as ``F.linear``'s backward
sees it. Under autocast, the entry point casts imgs, weight and bias to the autocast dtype, as
autocast does for ``F.linear``.

Bytes moved, e = element size of X, o = of the output, q = of pos, P = C*p*p, M = N*K:
  forward  ~ M*P*e (kept pixels) + D*P*e (weight) + M*D*q (pos rows) + M*8 (ids) + M*D*o (out)
  backward ~ M*D*o (grad_out) + M*P*e (kept pixels) + 2*S*(D*P + D)*4 (fp32 partials, S splits)
           + D*P*e (grad_weight)
(plus L2 re-reads of A and grad_out: each is read once per D tile / P tile.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._common import interpreter_on
from fastmae.kernels.aot import AotKernel

# Tiles: zero register spills on sm_80/sm_90 in bf16/fp16 even without the JIT's alignment hints
# (unaligned views: one scalar load per element), 104-170 registers with them; 8 warps each.
_FWD_BLOCK_M = 64  # forward: rows (kept patches) per tile
_FWD_BLOCK_K = 32  # forward: reduction step over C*p*p (masked tail for p=14: 588 = 18*32 + 12)
_BWD_BLOCK_M = 32  # backward: rows reduced per step
_BWD_BLOCK_R = 64  # backward: C*p*p columns of grad_weight per tile
_NUM_WARPS = 8
_NUM_STAGES = 3
_TARGET_PROGRAMS = 256  # backward: splits of the rows until about this many programs run
_MIN_ROWS = 256  # backward: fewest rows per split (more splits cost fp32 partial traffic)


@triton.jit
def _patch_embed_fwd_kernel(
    imgs_ptr, ids_ptr, w_ptr, b_ptr, pos_ptr, out_ptr,
    M, K, GRID_W, D,
    s_in, s_ic, s_ih,  # imgs (N, C, H, W) strides; W's is 1
    s_idn, s_idk,  # ids_keep (N, K) strides
    s_pl,  # pos_embed (1, L+1, D) row stride; D's is 1
    C: tl.constexpr, P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """out[m, d] = round_X(sum_r A[m, r] * W[d, r] + bias[d]) + pos[1 + ids[m], d] for one (BLOCK_M, BLOCK_N) tile."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) = n*K + k
    row_ok = rows < M
    n = rows // K
    patch = tl.load(ids_ptr + n * s_idn + (rows % K) * s_idk, mask=row_ok, other=0).to(tl.int64)  # (BLOCK_M,)
    a_row = n.to(tl.int64) * s_in + (patch // GRID_W) * (P * s_ih) + (patch % GRID_W) * P  # patch corner
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output channels d
    col_ok = cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, C * P * P, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) = (c*p + i)*p + j
        r_ok = r < C * P * P
        c, i, j = r // (P * P), (r // P) % P, r % P
        a = tl.load(imgs_ptr + a_row[:, None] + (c * s_ic + i * s_ih + j)[None, :],
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + r[:, None] + (cols * (C * P * P))[None, :],
                    mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N) = W^T tile
        if DOT_FP32:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision="ieee")
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
    tokens = (acc + bias[None, :]).to(imgs_ptr.dtype.element_ty).to(tl.float32)  # F.linear's output dtype
    ok = row_ok[:, None] & col_ok[None, :]
    pos = tl.load(pos_ptr + (patch + 1)[:, None] * s_pl + cols[None, :], mask=ok, other=0.0)
    out = tokens + pos.to(tl.float32)  # (BLOCK_M, BLOCK_N)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _patch_embed_bwd_kernel(
    g_ptr, imgs_ptr, ids_ptr, dw_ptr, db_ptr,
    M, K, GRID_W, D, CHUNK,
    s_in, s_ic, s_ih,  # imgs (N, C, H, W) strides; W's is 1
    s_idn, s_idk,  # ids_keep (N, K) strides
    C: tl.constexpr, P: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Rows [split*CHUNK, (split+1)*CHUNK) of grad_out^T @ A for one (BLOCK_D, BLOCK_R) tile -> fp32 partials
    dw[split] (D, C*p*p); the programs of the first r tile also write db[split] (D,) = the rows' sum."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_r = tl.cdiv(C * P * P, BLOCK_R)
    pid_d = pid // num_r
    pid_r = pid % num_r
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) output channels d
    d_ok = ds < D
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) = (c*p + i)*p + j
    r_ok = r < C * P * P
    c, i, j = r // (P * P), (r // P) % P, r % P
    a_col = c * s_ic + i * s_ih + j  # (BLOCK_R,)
    acc = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    m_start = split * CHUNK
    m_end = tl.minimum(m_start + CHUNK, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,) = n*K + k
        row_ok = rows < m_end
        n = rows // K
        patch = tl.load(ids_ptr + n * s_idn + (rows % K) * s_idk, mask=row_ok, other=0).to(tl.int64)  # (BLOCK_M,)
        a_row = n.to(tl.int64) * s_in + (patch // GRID_W) * (P * s_ih) + (patch % GRID_W) * P
        g_t = tl.load(g_ptr + rows.to(tl.int64)[None, :] * D + ds[:, None],
                      mask=d_ok[:, None] & row_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_M) = grad_out^T tile
        g_t = g_t.to(imgs_ptr.dtype.element_ty)  # the gradient F.linear's backward sees, in its input dtype
        a = tl.load(imgs_ptr + a_row[:, None] + a_col[None, :],
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_R)
        if pid_r == 0:
            bias_acc += tl.sum(g_t.to(tl.float32), axis=1)
        if DOT_FP32:
            g_t, a = g_t.to(tl.float32), a.to(tl.float32)
        acc = tl.dot(g_t, a, acc, input_precision="ieee")
    dw_offsets = (split * D + ds)[:, None].to(tl.int64) * (C * P * P) + r[None, :]
    tl.store(dw_ptr + dw_offsets, acc, mask=d_ok[:, None] & r_ok[None, :])
    if pid_r == 0:
        tl.store(db_ptr + split * D + ds, bias_acc, mask=d_ok)


def _block_n(d: int) -> int:
    """Output channels per tile: 128 for the ViT widths (multiples of 128), else 64 (masked tail)."""
    return 128 if d % 128 == 0 else 64


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (what the kernels index), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_fp32(imgs: torch.Tensor) -> bool:
    """Feed tl.dot fp32 operands: for fp32 inputs, and always under the interpreter (no bf16 arithmetic)."""
    return interpreter_on() or imgs.dtype == torch.float32


def patch_embed_visible(
    imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """``fastmae::patch_embed_visible``: ``imgs (N, C, H, W)``, ``ids_keep (N, K)``, ``weight (D, C, p, p)``,
    ``bias (D,)``, ``pos_embed (1, L+1, D)`` -> ``(N, K, D)`` in ``promote(imgs.dtype, pos_embed.dtype)``; imgs, weight and bias share one dtype."""
    imgs, weight, pos_embed = _unit_last_stride(imgs), weight.contiguous(), _unit_last_stride(pos_embed)
    bias = _unit_last_stride(bias)
    n, c, _, ww = imgs.shape
    d, _, p, _ = weight.shape
    k = ids_keep.shape[1]
    out = torch.empty((n, k, d), dtype=torch.promote_types(imgs.dtype, pos_embed.dtype), device=imgs.device)
    m = n * k  # rows of the GEMM
    if m == 0:
        return out
    block_n = _block_n(d)
    grid = (triton.cdiv(m, _FWD_BLOCK_M) * triton.cdiv(d, block_n),)
    _patch_embed_fwd_kernel[grid](
        imgs, ids_keep, weight, bias, pos_embed, out,
        m, k, ww // p, d,
        *imgs.stride()[:3], *ids_keep.stride(), pos_embed.stride(1),
        C=c, P=p, BLOCK_M=_FWD_BLOCK_M, BLOCK_N=block_n, BLOCK_K=_FWD_BLOCK_K, DOT_FP32=_dot_fp32(imgs),
        num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )
    return out


def patch_embed_visible_backward(
    grad_out: torch.Tensor, imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastmae::patch_embed_visible_backward``: ``grad_out (N, K, D)`` (any strides) -> ``grad_weight (D, C, p, p)``, ``grad_bias (D,)`` in weight's dtype."""
    grad_out, imgs = grad_out.contiguous(), _unit_last_stride(imgs)  # grad_out may be expanded, e.g. from .sum()
    n, c, _, ww = imgs.shape
    d, _, p, _ = weight.shape
    k = ids_keep.shape[1]
    m, cpp = n * k, c * p * p  # GEMM reduction length, columns of grad_weight
    block_d = _block_n(d)
    tiles = triton.cdiv(d, block_d) * triton.cdiv(cpp, _BWD_BLOCK_R)
    splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, tiles), triton.cdiv(m, _MIN_ROWS)))
    chunk = triton.cdiv(triton.cdiv(max(m, 1), splits), _BWD_BLOCK_M) * _BWD_BLOCK_M  # rows per split: k*BLOCK_M
    splits = max(1, triton.cdiv(m, chunk))  # no empty split
    alloc = torch.empty if m else torch.zeros  # no rows: the gradients are zero
    dw_part = alloc((splits, d, cpp), dtype=torch.float32, device=imgs.device)  # (S, D, C*p*p)
    db_part = alloc((splits, d), dtype=torch.float32, device=imgs.device)  # (S, D)
    if m:
        _patch_embed_bwd_kernel[(tiles, splits)](
            grad_out, imgs, ids_keep, dw_part, db_part,
            m, k, ww // p, d, chunk,
            *imgs.stride()[:3], *ids_keep.stride(),
            C=c, P=p, BLOCK_D=block_d, BLOCK_R=_BWD_BLOCK_R, BLOCK_M=_BWD_BLOCK_M, DOT_FP32=_dot_fp32(imgs),
            num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
        )
    grad_weight = dw_part.sum(0).to(weight.dtype).view(d, c, p, p)  # (D, C*p*p) -> (D, C, p, p)
    grad_bias = db_part.sum(0).to(weight.dtype)  # (D,)
    return grad_weight, grad_bias


def _aot(fn: object, label: str, overrides: dict[str, str], **constexprs: object) -> AotKernel:
    return AotKernel(fn=fn, overrides=overrides, constexprs=constexprs, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
                     label=label)


_FWD_TYPES = {"ids_ptr": "*i64", "pos_ptr": "*fp32", "out_ptr": "*fp32"}
_BWD_TYPES = {"g_ptr": "*fp32", "ids_ptr": "*i64", "dw_ptr": "*fp32", "db_ptr": "*fp32"}
# ViT-B/16, ViT-L/16 (p=16, D in {768, 1024}) and ViT-H/14 (p=14, D=1280): every width a multiple of 128.
AOT_KERNELS = [
    _aot(_patch_embed_fwd_kernel, f"p{p}", _FWD_TYPES, C=3, P=p, BLOCK_M=_FWD_BLOCK_M, BLOCK_N=128,
         BLOCK_K=_FWD_BLOCK_K, DOT_FP32=False)
    for p in (16, 14)
] + [
    _aot(_patch_embed_bwd_kernel, f"p{p}", _BWD_TYPES, C=3, P=p, BLOCK_D=128, BLOCK_R=_BWD_BLOCK_R,
         BLOCK_M=_BWD_BLOCK_M, DOT_FP32=False)
    for p in (16, 14)
]
