import pytest
import torch

from fastmae import ops
from fastmae.ops.unshuffle import unshuffle_reference
from numerics import assert_rel_close, rel_err


@pytest.mark.parametrize("n,num_patches,len_keep,dd", [(1, 196, 49, 32), (3, 256, 64, 16), (5, 24, 6, 8),
                                                       (2, 16, 0, 8)])  # K = 0: the cls token only
def test_reference_places_every_token(n: int, num_patches: int, len_keep: int, dd: int) -> None:
    g = torch.Generator().manual_seed(num_patches)
    noise = torch.rand(n, num_patches, generator=g)
    ids_keep, ids_restore, mask = ops.random_masking(noise, len_keep)
    x = torch.randn(n, 1 + len_keep, dd, generator=g, requires_grad=True)
    mask_token = torch.randn(1, 1, dd, generator=g, requires_grad=True)
    pos = torch.randn(1, num_patches + 1, dd, generator=g)
    out = unshuffle_reference(x, ids_restore, mask_token, pos)
    assert out.shape == (n, num_patches + 1, dd)
    body = out[:, 1:] - pos[:, 1:]  # (N, L, Dd) without pos
    assert torch.allclose(out[:, 0], x[:, 0] + pos[0, 0])  # cls first, pos row 0 added
    for i in range(n):
        assert torch.allclose(body[i, ids_keep[i]], x[i, 1:], atol=1e-6)  # visible tokens at their patches
        removed = mask[i].bool()
        assert torch.allclose(body[i, removed], mask_token[0].expand(int(removed.sum()), dd), atol=1e-6)
    # gradients: each visible row gets its own output row's gradient, the mask token the sum over removed rows
    upstream = torch.randn_like(out)
    gx, gm = torch.autograd.grad(out, (x, mask_token), upstream)
    assert torch.allclose(gx[:, 0], upstream[:, 0])
    assert torch.allclose(gx[:, 1:], upstream[:, 1:].gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, dd)))
    assert_rel_close(gm.reshape(dd), (upstream[:, 1:] * mask.unsqueeze(-1)).sum((0, 1)), 1e-6, "mask token grad")


def test_public_validates() -> None:
    ids_restore = torch.arange(4).expand(2, 4)
    x, tok, pos = torch.randn(2, 3, 8), torch.randn(1, 1, 8), torch.randn(1, 5, 8)
    assert ops.unshuffle(x, ids_restore, tok, pos).shape == (2, 5, 8)
    assert ops.unshuffle(x[:, :1], ids_restore, tok, pos).shape == (2, 5, 8)  # K = 0: the cls token only
    with pytest.raises(ValueError, match="cls plus 0..L=4 kept tokens"):
        ops.unshuffle(torch.randn(2, 6, 8), ids_restore, tok, pos)
    with pytest.raises(ValueError, match=r"mask_token must have shape \(1, 1, 8\)"):
        ops.unshuffle(x, ids_restore, torch.randn(1, 1, 4), pos)
    with pytest.raises(ValueError, match=r"ids_restore must have shape \(2, \*\)"):
        ops.unshuffle(x, ids_restore[:1], tok, pos)


# --- kernel backends (triton: the interpreter here; cuda: fastmae._C's CPU implementation here) --------------
# tests/ops/test_backends.py checks every backend against the reference on the op's cases (fp32 on CPU,
# bf16/fp16 on a GPU), determinism, the fake and opcheck; these test what those cases do not reach.

from fastmae.ops._kernels import KERNEL_BACKENDS  # noqa: E402
from fastmae.ops.unshuffle import unshuffle_backward_op  # noqa: E402

OP = ops.OPS["unshuffle"]
KERNELS = [b.name for b in OP.backends if b.name in KERNEL_BACKENDS]
LOW_PRECISION = [torch.bfloat16, torch.float16]
# Storing an fp32 value to bf16/fp16 rounds once. On a GPU and in fastmae._C that is round-to-nearest-even
# (relative error <= half an ulp: 2^-9 bf16, 2^-12 fp16). Triton 3.8's interpreter rounds fp16 the same way
# (numpy) but truncates fp32 -> bf16 (its cast passes no rounding mode): error < one ulp, <= 2^-7 relative.
# These bounds hold per element, so they bound the norm-wise relative error too; fp16 gets a factor 2 margin.
CAST_TOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-11}


def _inputs(n: int, num_patches: int, len_keep: int, dd: int, x_dtype: torch.dtype = torch.float32,
            table_dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``x (N, 1+K, Dd)``, ``ids_restore (N, L)``, ``mask_token (1, 1, Dd)`` and ``pos (1, L+1, Dd)``;
    x and the mask token require grad."""
    g = torch.Generator().manual_seed(seed)
    _, ids_restore, _ = ops.random_masking(torch.rand(n, num_patches, generator=g), len_keep)
    x = torch.randn(n, 1 + len_keep, dd, generator=g).to(device, x_dtype).requires_grad_()
    mask_token = torch.randn(1, 1, dd, generator=g).to(device, table_dtype).requires_grad_()
    pos = torch.randn(1, num_patches + 1, dd, generator=g).to(device, table_dtype)
    return x, ids_restore.to(device), mask_token, pos


def _run(backend: str, x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor,
         upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, grad_x, grad_mask_token)`` of one backend for the upstream gradient ``upstream``."""
    out = ops.unshuffle(x, ids_restore, mask_token, pos, backend=backend)
    grad_x, grad_tok = torch.autograd.grad(out, (x, mask_token), upstream.to(out.dtype))
    return out, grad_x, grad_tok


def _upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """fp32 leaf copies (same values) of floating tensors; integer tensors as they are."""
    return [t.detach().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in tensors]


def _assert_exact(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], tok_tol: float) -> None:
    """The output (a copy plus one fp32 add, rounded once) and x's gradient (a permutation of the upstream rows)
    exactly the reference's; the mask token's gradient, a sum in another order, within ``tok_tol``."""
    assert all(g.dtype == w.dtype for g, w in zip(got, want))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert_rel_close(got[2], want[2], tok_tol, "mask token grad")


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("n,num_patches,len_keep,dd", [
    (2, 196, 49, 12),  # width not a multiple of 8: the CUDA kernels' scalar path
    (2, 16, 4, 1040),  # wider than one column tile (CUDA: 64 threads x 8; triton: 256 columns)
    (3, 24, 6, 8),  # 4 x 6 grid, tiny width
    (2, 16, 15, 16),  # almost nothing removed
    (1, 16, 16, 8),  # nothing removed: the mask token's gradient is zero
])
def test_widths_and_kept_counts_exactly_as_reference(backend: str, n: int, num_patches: int, len_keep: int,
                                                     dd: int) -> None:
    args = _inputs(n, num_patches, len_keep, dd, seed=num_patches + dd)
    upstream = torch.randn(n, num_patches + 1, dd, generator=torch.Generator().manual_seed(1))
    _assert_exact(_run(backend, *args, upstream), _run("reference", *args, upstream), 1e-5)


def _assert_same_rounding(backend: str, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal, except that the interpreter's bf16 stores truncate where torch rounds: one ulp apart at most."""
    if backend == "triton" and got.dtype == torch.bfloat16 and not torch.cuda.is_available():
        torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-7, atol=0.0, msg=what)
    else:
        assert torch.equal(got, want), what


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("x_dtype,table_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),  # uniform
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),  # autocast: fp32 tables, fp32 output
    (torch.float16, torch.bfloat16),  # promotes to fp32
], ids=["bf16", "fp16", "bf16-autocast", "fp16-autocast", "fp16-bf16"])
def test_low_precision_on_cpu(backend: str, x_dtype: torch.dtype, table_dtype: torch.dtype) -> None:
    """bf16/fp16 tokens with tables in the same dtype, in fp32 as under autocast, or in the other one."""
    n, num_patches, len_keep, dd = 2, 196, 49, 512
    args = _inputs(n, num_patches, len_keep, dd, x_dtype, table_dtype, seed=3)
    upstream = torch.randn(n, num_patches + 1, dd, generator=torch.Generator().manual_seed(2))
    out, gx, gt = _run(backend, *args, upstream)
    same_out, same_gx, same_gt = _run("reference", *args, upstream)  # the reference on the same inputs
    assert out.dtype == same_out.dtype == torch.promote_types(x_dtype, table_dtype)
    assert gx.dtype == x_dtype and gt.dtype == table_dtype
    _assert_same_rounding(backend, out, same_out, "output")  # both add in fp32 and round once
    _assert_same_rounding(backend, gx, same_gx, "grad x")  # both round the upstream rows once to x's dtype
    # the mask-token gradient: an fp32 sum (in another order: 1e-5) rounded once to the mask token's dtype
    # (the reference may round the upstream rows to the promoted dtype first: the same bound covers it)
    tok_tol = 1e-5 + CAST_TOL.get(table_dtype, 0.0)
    assert_rel_close(gt, same_gt, tok_tol, "mask token grad")
    # against the fp32 reference on the same (upcast) values and the same upstream gradient:
    want_out, want_gx, want_gt = _run("reference", *_upcast(*args), upstream.to(out.dtype).float())
    assert_rel_close(out, want_out, CAST_TOL.get(out.dtype, 0.0), "output")
    assert_rel_close(gx, want_gx, CAST_TOL[x_dtype] if out.dtype != x_dtype else 0.0, "grad x")  # same dtype: a copy
    assert_rel_close(gt, want_gt, tok_tol, "mask token grad")


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_int32_ids_noncontiguous_inputs_and_upstream(backend: str) -> None:
    n, num_patches, len_keep, dd = 3, 24, 6, 16
    x, ids_restore, mask_token, pos = _inputs(n, num_patches, len_keep, dd, seed=5)
    x_t = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # same values, strided
    pos_t = pos.transpose(1, 2).contiguous().transpose(1, 2)
    assert not x_t.is_contiguous() and not pos_t.is_contiguous()
    outs = {}
    for name in (backend, "reference"):
        out = ops.unshuffle(x_t, ids_restore.int(), mask_token, pos_t, backend=name)
        grads = torch.autograd.grad(out.sum(), (x_t, mask_token))  # the upstream gradient is an expanded 1
        outs[name] = (out, *grads)
    _assert_exact(outs[backend], outs["reference"], 1e-6)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_mask_token_only_needs_grad_and_fixed_order(backend: str) -> None:
    x, ids_restore, mask_token, pos = _inputs(2, 24, 6, 8, seed=6)
    x = x.detach()
    (gt,) = torch.autograd.grad(ops.unshuffle(x, ids_restore, mask_token, pos, backend=backend).sum(), mask_token)
    assert_rel_close(gt, torch.full_like(gt, 2 * (24 - 6)), 1e-6, "mask token grad")  # N*(L-K) rows of ones
    # the mask-token gradient does not depend on the number of threads (per-sample sums, then in sample order)
    grad = torch.randn(3, 197, 64, generator=torch.Generator().manual_seed(8))
    _, ids_restore, _ = ops.random_masking(torch.rand(3, 196, generator=torch.Generator().manual_seed(9)), 49)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = unshuffle_backward_op(grad, ids_restore, 49, torch.float32, torch.float32, backend)
    finally:
        torch.set_num_threads(threads)
    many = unshuffle_backward_op(grad, ids_restore, 49, torch.float32, torch.float32, backend)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_supports_refuses(backend: str, without_interpreter: object) -> None:
    rules = OP.backend(backend)
    x, ids_restore, mask_token, pos = _inputs(2, 24, 6, 8)
    assert rules.why_not((x, ids_restore, mask_token, pos), OP.arg_names) is None
    assert OP.select((x, ids_restore, mask_token, pos)).name == "reference"  # CPU: not by priority
    refused = {
        f"{backend} gives no gradient for pos_embed": (x, ids_restore, mask_token, pos.clone().requires_grad_()),
        f"{backend} takes fp32/bf16/fp16, got x torch.float64": (x.detach().double(), ids_restore,
                                                                 mask_token.detach().double(), pos.double()),
    }
    assert "tensors on several devices" in rules.why_not((x, ids_restore, mask_token, pos.to("meta")), OP.arg_names)
    for reason, args in refused.items():
        assert reason in (rules.why_not(args, OP.arg_names) or ""), reason
        with pytest.raises(ops.BackendUnavailableError, match=reason):
            ops.unshuffle(*args, backend=backend)
    # meta tensors (tracing): the fake gives the output's shape and promoted dtype
    meta = (x.detach().to("meta", torch.bfloat16), ids_restore.to("meta"), mask_token.detach().to("meta"),
            pos.to("meta"))
    out = ops.unshuffle(*meta, backend=backend)
    assert out.device.type == "meta" and out.shape == (2, 25, 8) and out.dtype == torch.float32
    if backend == "triton":  # without the interpreter, CPU tensors are refused with a reason naming it
        assert "interpreter" in without_interpreter(rules).why_not((x, ids_restore, mask_token, pos), OP.arg_names)


def test_cuda_direct_call_errors() -> None:
    """fastmae._C's own checks (RuntimeError naming expected and given), for calls that reach it past the op's
    rules. Both of its ops have a CPU implementation, so no call is CUDA-only."""
    if OP.backend("cuda").available() is not None:
        pytest.skip(f"fastmae._C cannot run here: {OP.backend('cuda').available()}")
    x, ids_restore, mask_token, pos = (t.detach() for t in _inputs(2, 24, 6, 8))
    forward, backward = torch.ops.fastmae_C.unshuffle, torch.ops.fastmae_C.unshuffle_backward
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16, got Double"):
        forward(x.double(), ids_restore, mask_token, pos)
    with pytest.raises(RuntimeError, match=r"pos_embed must have shape \(1, L\+1=25, Dd=8\), got \[1, 24, 8\]"):
        forward(x, ids_restore, mask_token, pos[:, 1:])
    with pytest.raises(RuntimeError, match="ids_restore must be int64 or int32, got Float"):
        forward(x, ids_restore.float(), mask_token, pos)
    with pytest.raises(RuntimeError, match=r"ids_restore values must lie in \[0, L=24\), got 24"):
        forward(x, torch.full_like(ids_restore, 24), mask_token, pos)
    grad = torch.randn(2, 25, 8)
    with pytest.raises(RuntimeError, match=r"len_keep must lie in \[0, L=24\], got 25"):
        backward(grad, ids_restore, 25, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="x_dtype must be float32, bfloat16 or float16, got Double"):
        backward(grad, ids_restore, 6, torch.float64, torch.float32)
    with pytest.raises(RuntimeError, match=r"grad_out must have L\+1=25 rows"):
        backward(grad[:, 1:], ids_restore, 6, torch.float32, torch.float32)


# --- on a GPU (skipped without CUDA): the kernels in fp32 and low precision, bit for bit as torch's rounding ------

GPU_SHAPES = [
    (1, 196, 49, 512),  # ViT-B/L decoder, patch 16 at 224 px
    (3, 256, 64, 512),  # ViT-H decoder, patch 14 at 224 px
    (3, 192, 48, 32),  # non-square 12 x 16 grid
    (2, 196, 49, 12),  # width not a multiple of 8: the CUDA kernels' scalar path
    (2, 16, 4, 1040),  # wider than one column tile
    (1, 16, 16, 8),  # nothing removed: the mask token's gradient is zero
    (2, 16, 0, 8),  # nothing kept: the cls token only
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("n,num_patches,len_keep,dd", GPU_SHAPES)
def test_gpu_fp32_exactly_as_reference_and_deterministic(backend: str, n: int, num_patches: int, len_keep: int,
                                                         dd: int) -> None:
    args = _inputs(n, num_patches, len_keep, dd, device="cuda", seed=num_patches + dd)
    upstream = torch.randn(n, num_patches + 1, dd, device="cuda")
    got = _run(backend, *args, upstream)
    _assert_exact(got, _run("reference", *args, upstream), 1e-5)
    again = _run(backend, *args, upstream)
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # no atomics: bit-identical run to run


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("autocast", [False, True], ids=["uniform", "autocast"])
def test_gpu_low_precision_rounds_as_torch(backend: str, dtype: torch.dtype, autocast: bool) -> None:
    """GPU stores round to nearest, as torch's: the output and x's gradient equal the reference's on the same
    low-precision inputs (tables in the same dtype, or fp32 as under autocast), bit for bit."""
    x32, ids_restore, tok32, pos32 = _inputs(8, 196, 49, 512, device="cuda", seed=196)
    table_dtype = torch.float32 if autocast else dtype
    low = (x32.detach().to(dtype).requires_grad_(), ids_restore, tok32.detach().to(table_dtype).requires_grad_(),
           pos32.to(table_dtype))
    upstream = torch.randn(8, 197, 512, device="cuda")
    _assert_exact(_run(backend, *low, upstream), _run("reference", *low, upstream),
                  1e-5 + CAST_TOL.get(table_dtype, 0.0))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_gpu_unaligned_int32_and_strided(backend: str) -> None:
    """x 2 bytes off a 16-byte boundary (the scalar path), int32 ids, a strided pos table and upstream."""
    n, num_patches, len_keep, dd = 3, 196, 49, 512
    x, ids_restore, mask_token, pos = _inputs(n, num_patches, len_keep, dd, torch.bfloat16, torch.bfloat16,
                                              device="cuda", seed=11)
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    x_off = storage[1:].view(x.shape).copy_(x.detach()).requires_grad_()
    assert x_off.data_ptr() % 16 != 0
    pos_t = pos.transpose(1, 2).contiguous().transpose(1, 2)
    outs = {}
    for name in (backend, "reference"):
        out = ops.unshuffle(x_off, ids_restore.int(), mask_token, pos_t, backend=name)
        outs[name] = (out, *torch.autograd.grad(out.sum(), (x_off, mask_token)))
    _assert_exact(outs[backend], outs["reference"], 1e-5 + CAST_TOL[torch.bfloat16])


@pytest.mark.gpu
def test_cuda_gpu_mixed_devices() -> None:
    if OP.backend("cuda").available() is not None:
        pytest.skip(f"fastmae._C cannot run here: {OP.backend('cuda').available()}")
    x, ids_restore, mask_token, pos = (t.detach() for t in _inputs(2, 24, 6, 8, device="cuda"))
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        torch.ops.fastmae_C.unshuffle(x, ids_restore, mask_token, pos.cpu())
    with pytest.raises(RuntimeError, match="must be on one device"):
        torch.ops.fastmae_C.unshuffle_backward(torch.randn(2, 25, 8, device="cuda"), ids_restore.cpu(), 6,
                                               torch.float32, torch.float32)
