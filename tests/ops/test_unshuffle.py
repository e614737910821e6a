import pytest
import torch

from fastmae import ops
from fastmae.ops.dispatch import Backend
from fastmae.ops.unshuffle import unshuffle_reference
from numerics import assert_rel_close, rel_err


@pytest.mark.parametrize("n,num_patches,len_keep,dd", [(1, 196, 49, 32), (3, 256, 64, 16), (5, 24, 6, 8)])
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
    with pytest.raises(ValueError, match="cls plus 1..L=4 kept tokens"):
        ops.unshuffle(torch.randn(2, 6, 8), ids_restore, tok, pos)
    with pytest.raises(ValueError, match=r"mask_token must have shape \(1, 1, 8\)"):
        ops.unshuffle(x, ids_restore, torch.randn(1, 1, 4), pos)
    with pytest.raises(ValueError, match=r"ids_restore must have shape \(2, \*\)"):
        ops.unshuffle(x, ids_restore[:1], tok, pos)


# --- triton backend (interpreter on CPU here; the gpu-marked tests run on CUDA) -------------------------------

LOW_PRECISION = [torch.bfloat16, torch.float16]
# Storing an fp32 value to bf16/fp16 rounds once. On a GPU that is round-to-nearest-even (relative error
# <= half an ulp: 2^-9 bf16, 2^-12 fp16). Triton 3.8's interpreter rounds fp16 the same way (numpy) but
# truncates fp32 -> bf16 (its cast passes no rounding mode): error < one ulp, <= 2^-7 relative. These
# bounds hold per element, so they bound the norm-wise relative error too; fp16 gets a factor 2 margin.
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


@pytest.mark.parametrize("n,num_patches,len_keep,dd", [
    (1, 196, 49, 512),  # ViT-B/L decoder, patch 16 at 224 px
    (3, 256, 64, 512),  # ViT-H decoder, patch 14 at 224 px
    (3, 192, 48, 32),  # non-square 12 x 16 grid
    (2, 196, 49, 24),  # width not a power of two
    (3, 24, 6, 8),  # 4 x 6 grid, tiny width
    (1, 24, 6, 16),
    (2, 16, 15, 16),  # almost nothing removed
    (1, 16, 16, 8),  # nothing removed: the mask token's gradient is zero
])
def test_triton_matches_reference_fp32(n: int, num_patches: int, len_keep: int, dd: int) -> None:
    args = _inputs(n, num_patches, len_keep, dd, seed=num_patches + dd)
    upstream = torch.randn(n, num_patches + 1, dd, generator=torch.Generator().manual_seed(1))
    out, gx, gt = _run("triton", *args, upstream)
    want_out, want_gx, want_gt = _run("reference", *args, upstream)
    assert out.dtype == want_out.dtype and gx.dtype == want_gx.dtype and gt.dtype == want_gt.dtype
    assert torch.equal(out, want_out)  # a copy plus one fp32 add, as the reference
    assert torch.equal(gx, want_gx)  # a pure permutation of the upstream rows
    assert_rel_close(gt, want_gt, 1e-5, "mask token grad")  # a sum, in another order


def _assert_same_rounding(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal, except that the interpreter's bf16 stores truncate where torch rounds: one ulp apart at most."""
    if got.dtype == torch.bfloat16:
        torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-7, atol=0.0, msg=what)
    else:
        assert torch.equal(got, want), what


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("autocast", [False, True], ids=["uniform", "autocast"])
def test_triton_low_precision_interpreter(dtype: torch.dtype, autocast: bool) -> None:
    """bf16/fp16 tokens with tables in the same dtype, or in fp32 as under autocast (output fp32)."""
    n, num_patches, len_keep, dd = 2, 196, 49, 512
    args = _inputs(n, num_patches, len_keep, dd, dtype, torch.float32 if autocast else dtype)
    upstream = torch.randn(n, num_patches + 1, dd, generator=torch.Generator().manual_seed(2))
    out, gx, gt = _run("triton", *args, upstream)
    same_out, same_gx, same_gt = _run("reference", *args, upstream)  # the reference on the same inputs
    assert out.dtype == same_out.dtype == (torch.float32 if autocast else dtype)
    assert gx.dtype == dtype and gt.dtype == args[2].dtype
    _assert_same_rounding(out, same_out, "output")  # both add in fp32 and round once
    _assert_same_rounding(gx, same_gx, "grad x")  # both round the upstream rows once to x's dtype
    # against the fp32 reference on the same (upcast) values and the same upstream gradient:
    want_out, want_gx, want_gt = _run("reference", *_upcast(*args), upstream.to(out.dtype).float())
    assert_rel_close(out, want_out, 0.0 if autocast else CAST_TOL[dtype], "output")  # autocast: fp32 throughout
    assert_rel_close(gx, want_gx, 0.0 if not autocast else CAST_TOL[dtype], "grad x")  # uniform: a copy
    # the mask-token gradient: an fp32 sum (another order: 1e-5) rounded once to the mask token's dtype
    assert_rel_close(gt, want_gt, 1e-5 + (0.0 if autocast else CAST_TOL[dtype]), "mask token grad")


def test_triton_int32_ids_noncontiguous_inputs_and_upstream() -> None:
    n, num_patches, len_keep, dd = 3, 24, 6, 16
    x, ids_restore, mask_token, pos = _inputs(n, num_patches, len_keep, dd, seed=5)
    x_t = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # same values, strided
    pos_t = pos.transpose(1, 2).contiguous().transpose(1, 2)
    assert not x_t.is_contiguous() and not pos_t.is_contiguous()
    outs = {}
    for backend in ("triton", "reference"):
        out = ops.unshuffle(x_t, ids_restore.int(), mask_token, pos_t, backend=backend)
        grads = torch.autograd.grad(out.sum(), (x_t, mask_token))  # the upstream gradient is an expanded 1
        outs[backend] = (out, *grads)
    assert torch.equal(outs["triton"][0], outs["reference"][0])
    assert torch.equal(outs["triton"][1], outs["reference"][1])
    assert_rel_close(outs["triton"][2], outs["reference"][2], 1e-6, "mask token grad")


def test_triton_mask_token_only_needs_grad() -> None:
    x, ids_restore, mask_token, pos = _inputs(2, 24, 6, 8, seed=6)
    x = x.detach()
    (gt,) = torch.autograd.grad(ops.unshuffle(x, ids_restore, mask_token, pos, backend="triton").sum(), mask_token)
    assert_rel_close(gt, torch.full_like(gt, 2 * (24 - 6)), 1e-6, "mask token grad")  # N*(L-K) rows of ones


def test_triton_ops_schema_and_autograd_registration() -> None:
    """opcheck's checks that run under the interpreter (fake-tensor and compile checks need a GPU)."""
    from fastmae.kernels.unshuffle import unshuffle_backward_op, unshuffle_op

    x, ids_restore, mask_token, pos = _inputs(2, 24, 6, 8, seed=7)
    checks = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(unshuffle_op, (x, ids_restore, mask_token, pos), test_utils=checks)
    grad = torch.randn(2, 25, 8)
    torch.library.opcheck(unshuffle_backward_op, (grad, ids_restore, 6, torch.float32, torch.float32),
                          test_utils=checks)


def test_triton_supports_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    triton_backend = ops.OPS["unshuffle"].backend("triton")
    x, ids_restore, mask_token, pos = _inputs(2, 24, 6, 8)
    assert triton_backend.why_not((x, ids_restore, mask_token, pos)) is None
    assert ops.OPS["unshuffle"].select((x, ids_restore, mask_token, pos)).name == "reference"  # CPU: not by priority
    refused = {
        "pos_embed requires grad": (x, ids_restore, mask_token, pos.clone().requires_grad_()),
        "fp32/bf16/fp16": (x.detach().double(), ids_restore, mask_token.detach().double(), pos.double()),
    }
    for reason, args in refused.items():
        assert reason in (triton_backend.why_not(args) or ""), reason
        with pytest.raises(ops.BackendUnavailableError, match=reason):
            ops.unshuffle(*args, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "interpreter" in triton_backend.why_not((x, ids_restore, mask_token, pos))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("autocast", [False, True], ids=["uniform", "autocast"])
@pytest.mark.parametrize("num_patches,len_keep", [(196, 49), (256, 64)])
def test_triton_gpu_low_precision(dtype: torch.dtype, autocast: bool, num_patches: int, len_keep: int) -> None:
    """Error vs the fp32 reference at most 2x the reference's own error in the same low precision + a floor."""
    n, dd = 8, 512
    args32 = _inputs(n, num_patches, len_keep, dd, device="cuda", seed=num_patches)
    x32, ids_restore, tok32, pos32 = args32
    table_dtype = torch.float32 if autocast else dtype
    low = (x32.detach().to(dtype).requires_grad_(), ids_restore, tok32.detach().to(table_dtype).requires_grad_(),
           pos32.to(table_dtype))
    upstream = torch.randn(n, num_patches + 1, dd, device="cuda")
    want = _run("reference", *args32, upstream)
    torch_low = _run("reference", *low, upstream)
    got = _run("triton", *low, upstream)
    for what, g, t, w in zip(("output", "grad x", "mask token grad"), got, torch_low, want):
        assert g.dtype == t.dtype, what
        assert_rel_close(g, w, 2 * rel_err(t, w) + 1e-6, what)
    assert torch.equal(got[0], torch_low[0]) and torch.equal(got[1], torch_low[1])  # GPU stores round as torch
    again = _run("triton", *low, upstream)
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # no atomics: bit-identical run to run


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_triton_gpu_opcheck(dtype: torch.dtype) -> None:
    from fastmae.kernels.unshuffle import unshuffle_backward_op, unshuffle_op

    x, ids_restore, mask_token, pos = _inputs(3, 196, 49, 64, device="cuda")
    x = x.detach().to(dtype).requires_grad_()
    torch.library.opcheck(unshuffle_op, (x, ids_restore, mask_token, pos))
    grad = torch.randn(3, 197, 64, device="cuda")
    torch.library.opcheck(unshuffle_backward_op, (grad, ids_restore, 49, dtype, torch.float32))


# --- cuda backend (fastmae._C): its C++ implementation on CPU tensors here, the CUDA kernels on a GPU --------

# Rounding an fp32 value to bf16/fp16 to nearest (the C++ implementation and torch, on CPU and GPU): relative
# error <= half an ulp, 2^-9 (bf16) and 2^-12 (fp16) per element, hence norm-wise too; a factor 2 margin.
RNE_TOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
CUDA_SHAPES = [
    (1, 196, 49, 512),  # ViT-B/L decoder, patch 16 at 224 px
    (3, 256, 64, 512),  # ViT-H decoder, patch 14 at 224 px
    (3, 192, 48, 32),  # non-square 12 x 16 grid
    (2, 196, 49, 24),  # width not a power of two
    (2, 196, 49, 12),  # width not a multiple of 8: the CUDA kernels' scalar path
    (2, 16, 4, 1040),  # wider than one column tile of the CUDA kernels (64 threads x 8)
    (3, 24, 6, 8),  # 4 x 6 grid, tiny width
    (1, 24, 6, 16),
    (2, 16, 15, 16),  # almost nothing removed
    (1, 16, 16, 8),  # nothing removed: the mask token's gradient is zero
]


@pytest.fixture
def cuda_backend() -> Backend:
    """The ``cuda`` backend, its fake and autograd registrations made; skips when fastmae._C is not built."""
    from fastmae.extension import extension_status

    loaded, detail = extension_status()
    if not loaded:
        pytest.skip(f"fastmae._C is not built here: {detail}")
    backend = ops.OPS["unshuffle"].backend("cuda")
    assert backend.available() is None
    return backend


@pytest.mark.parametrize("n,num_patches,len_keep,dd", CUDA_SHAPES)
def test_cuda_cpu_matches_reference_fp32(cuda_backend: Backend, n: int, num_patches: int, len_keep: int,
                                         dd: int) -> None:
    args = _inputs(n, num_patches, len_keep, dd, seed=num_patches + dd)
    upstream = torch.randn(n, num_patches + 1, dd, generator=torch.Generator().manual_seed(1))
    out, gx, gt = _run("cuda", *args, upstream)
    want_out, want_gx, want_gt = _run("reference", *args, upstream)
    assert out.dtype == want_out.dtype and gx.dtype == want_gx.dtype and gt.dtype == want_gt.dtype
    assert torch.equal(out, want_out)  # a copy plus one fp32 add, as the reference
    assert torch.equal(gx, want_gx)  # a pure permutation of the upstream rows
    assert_rel_close(gt, want_gt, 1e-5, "mask token grad")  # a sum, in another order


@pytest.mark.parametrize("x_dtype,table_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),  # uniform
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),  # autocast: fp32 tables, fp32 output
    (torch.float16, torch.bfloat16),  # promotes to fp32
], ids=["bf16", "fp16", "bf16-autocast", "fp16-autocast", "fp16-bf16"])
def test_cuda_cpu_low_precision(cuda_backend: Backend, x_dtype: torch.dtype, table_dtype: torch.dtype) -> None:
    n, num_patches, len_keep, dd = 3, 196, 49, 512
    args = _inputs(n, num_patches, len_keep, dd, x_dtype, table_dtype, seed=3)
    upstream = torch.randn(n, num_patches + 1, dd, generator=torch.Generator().manual_seed(2))
    out, gx, gt = _run("cuda", *args, upstream)
    same_out, same_gx, same_gt = _run("reference", *args, upstream)  # the reference on the same inputs
    assert out.dtype == same_out.dtype == torch.promote_types(x_dtype, table_dtype)
    assert gx.dtype == x_dtype and gt.dtype == table_dtype
    assert torch.equal(out, same_out)  # both add in fp32 and round once to nearest
    assert torch.equal(gx, same_gx)  # both round the upstream rows once to x's dtype
    # the mask-token gradient: an fp32 sum (in another order: 1e-5) rounded once to the mask token's dtype
    # (the reference may round the upstream rows to the promoted dtype first: the same bound covers it)
    tok_tol = 1e-5 + RNE_TOL.get(table_dtype, 0.0)
    assert_rel_close(gt, same_gt, tok_tol, "mask token grad")
    want_out, want_gx, want_gt = _run("reference", *_upcast(*args), upstream.to(out.dtype).float())
    assert_rel_close(out, want_out, RNE_TOL.get(out.dtype, 0.0), "output")  # against fp32 on the same values
    assert_rel_close(gx, want_gx, RNE_TOL[x_dtype] if out.dtype != x_dtype else 0.0, "grad x")
    assert_rel_close(gt, want_gt, tok_tol, "mask token grad")


def test_cuda_cpu_int32_ids_noncontiguous_inputs_and_upstream(cuda_backend: Backend) -> None:
    n, num_patches, len_keep, dd = 3, 24, 6, 16
    x, ids_restore, mask_token, pos = _inputs(n, num_patches, len_keep, dd, seed=5)
    x_t = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # same values, strided
    pos_t = pos.transpose(1, 2).contiguous().transpose(1, 2)
    assert not x_t.is_contiguous() and not pos_t.is_contiguous()
    outs = {}
    for backend in ("cuda", "reference"):
        out = ops.unshuffle(x_t, ids_restore.int(), mask_token, pos_t, backend=backend)
        grads = torch.autograd.grad(out.sum(), (x_t, mask_token))  # the upstream gradient is an expanded 1
        outs[backend] = (out, *grads)
    assert torch.equal(outs["cuda"][0], outs["reference"][0])
    assert torch.equal(outs["cuda"][1], outs["reference"][1])
    assert_rel_close(outs["cuda"][2], outs["reference"][2], 1e-6, "mask token grad")


def test_cuda_cpu_mask_token_only_needs_grad_and_fixed_order(cuda_backend: Backend) -> None:
    x, ids_restore, mask_token, pos = _inputs(2, 24, 6, 8, seed=6)
    x = x.detach()
    (gt,) = torch.autograd.grad(ops.unshuffle(x, ids_restore, mask_token, pos, backend="cuda").sum(), mask_token)
    assert_rel_close(gt, torch.full_like(gt, 2 * (24 - 6)), 1e-6, "mask token grad")  # N*(L-K) rows of ones
    # the mask-token gradient does not depend on the number of threads (per-sample sums, then in sample order)
    grad = torch.randn(7, 197, 64, generator=torch.Generator().manual_seed(8))
    _, ids_restore, _ = ops.random_masking(torch.rand(7, 196, generator=torch.Generator().manual_seed(9)), 49)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastmae.unshuffle_backward(grad, ids_restore, 49, torch.float32, torch.float32)
    finally:
        torch.set_num_threads(threads)
    many = torch.ops.fastmae.unshuffle_backward(grad, ids_restore, 49, torch.float32, torch.float32)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("x_dtype,table_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float16)])
def test_cuda_cpu_opcheck(cuda_backend: Backend, x_dtype: torch.dtype, table_dtype: torch.dtype) -> None:
    x, ids_restore, mask_token, pos = _inputs(2, 24, 6, 8, x_dtype, table_dtype, seed=7)
    torch.library.opcheck(torch.ops.fastmae.unshuffle.default, (x, ids_restore, mask_token, pos))
    grad = torch.randn(2, 25, 8).to(torch.promote_types(x_dtype, table_dtype))
    torch.library.opcheck(torch.ops.fastmae.unshuffle_backward.default,
                          (grad, ids_restore, 6, x_dtype, table_dtype))


def test_cuda_cpu_direct_call_errors(cuda_backend: Backend) -> None:
    """The ops check their arguments (RuntimeError naming expected and given). Both schemas have a CPU
    implementation, so no call is CUDA-only; tensors on several devices are refused."""
    x, ids_restore, mask_token, pos = (t.detach() for t in _inputs(2, 24, 6, 8))
    unshuffle_op, backward_op = torch.ops.fastmae.unshuffle, torch.ops.fastmae.unshuffle_backward
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16, got Double"):
        unshuffle_op(x.double(), ids_restore, mask_token, pos)
    with pytest.raises(RuntimeError, match=r"pos_embed must have shape \(1, L\+1=25, Dd=8\), got \[1, 24, 8\]"):
        unshuffle_op(x, ids_restore, mask_token, pos[:, 1:])
    with pytest.raises(RuntimeError, match="ids_restore must be int64 or int32, got Float"):
        unshuffle_op(x, ids_restore.float(), mask_token, pos)
    with pytest.raises(RuntimeError, match=r"ids_restore values must lie in \[0, L=24\), got 24"):
        unshuffle_op(x, torch.full_like(ids_restore, 24), mask_token, pos)
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        unshuffle_op(x, ids_restore, mask_token, pos.to("meta"))
    grad = torch.randn(2, 25, 8)
    with pytest.raises(RuntimeError, match=r"len_keep must lie in \[0, L=24\], got 25"):
        backward_op(grad, ids_restore, 25, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="x_dtype must be float32, bfloat16 or float16, got Double"):
        backward_op(grad, ids_restore, 6, torch.float64, torch.float32)
    with pytest.raises(RuntimeError, match=r"grad_out must have L\+1=25 rows"):
        backward_op(grad[:, 1:], ids_restore, 6, torch.float32, torch.float32)


def test_cuda_supports_refuses(cuda_backend: Backend) -> None:
    x, ids_restore, mask_token, pos = _inputs(2, 24, 6, 8)
    assert cuda_backend.why_not((x, ids_restore, mask_token, pos)) is None
    assert ops.OPS["unshuffle"].select((x, ids_restore, mask_token, pos)).name == "reference"  # CPU: not by priority
    refused = {
        "pos_embed requires grad": (x, ids_restore, mask_token, pos.clone().requires_grad_()),
        "fp32/bf16/fp16": (x.detach().double(), ids_restore, mask_token.detach().double(), pos.double()),
    }
    for reason, args in refused.items():
        assert reason in (cuda_backend.why_not(args) or ""), reason
        with pytest.raises(ops.BackendUnavailableError, match=reason):
            ops.unshuffle(*args, backend="cuda")
    assert "several devices" in cuda_backend.why_not((x, ids_restore, mask_token, pos.to("meta")))
    # meta tensors (tracing): the fake implementation gives the output's shape and promoted dtype
    meta = (x.detach().to("meta", torch.bfloat16), ids_restore.to("meta"), mask_token.detach().to("meta"),
            pos.to("meta"))
    out = ops.unshuffle(*meta, backend="cuda")
    assert out.device.type == "meta" and out.shape == (2, 25, 8) and out.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("n,num_patches,len_keep,dd", CUDA_SHAPES)
def test_cuda_gpu_matches_reference_fp32(cuda_backend: Backend, n: int, num_patches: int, len_keep: int,
                                         dd: int) -> None:
    args = _inputs(n, num_patches, len_keep, dd, device="cuda", seed=num_patches + dd)
    upstream = torch.randn(n, num_patches + 1, dd, device="cuda")
    out, gx, gt = _run("cuda", *args, upstream)
    want_out, want_gx, want_gt = _run("reference", *args, upstream)
    assert torch.equal(out, want_out) and torch.equal(gx, want_gx)
    assert_rel_close(gt, want_gt, 1e-5, "mask token grad")
    again = _run("cuda", *args, upstream)
    assert all(torch.equal(a, b) for a, b in zip((out, gx, gt), again))  # no atomics: bit-identical run to run


@pytest.mark.gpu
def test_cuda_gpu_unaligned_int32_and_strided(cuda_backend: Backend) -> None:
    """x 2 bytes off a 16-byte boundary (the scalar path), int32 ids, a strided pos table and upstream."""
    n, num_patches, len_keep, dd = 3, 196, 49, 512
    x, ids_restore, mask_token, pos = _inputs(n, num_patches, len_keep, dd, torch.bfloat16, torch.bfloat16,
                                              device="cuda", seed=11)
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    x_off = storage[1:].view(x.shape).copy_(x.detach()).requires_grad_()
    assert x_off.data_ptr() % 16 != 0
    pos_t = pos.transpose(1, 2).contiguous().transpose(1, 2)
    outs = {}
    for backend in ("cuda", "reference"):
        out = ops.unshuffle(x_off, ids_restore.int(), mask_token, pos_t, backend=backend)
        outs[backend] = (out, *torch.autograd.grad(out.sum(), (x_off, mask_token)))
    assert torch.equal(outs["cuda"][0], outs["reference"][0]) and torch.equal(outs["cuda"][1], outs["reference"][1])
    assert_rel_close(outs["cuda"][2], outs["reference"][2], 1e-5 + RNE_TOL[torch.bfloat16], "mask token grad")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("autocast", [False, True], ids=["uniform", "autocast"])
@pytest.mark.parametrize("num_patches,len_keep", [(196, 49), (256, 64)])
def test_cuda_gpu_low_precision(cuda_backend: Backend, dtype: torch.dtype, autocast: bool, num_patches: int,
                                len_keep: int) -> None:
    """Error vs the fp32 reference at most 2x the reference's own error in the same low precision + a floor;
    the same outputs as the triton backend (the mask-token gradient: another summation order)."""
    n, dd = 8, 512
    x32, ids_restore, tok32, pos32 = _inputs(n, num_patches, len_keep, dd, device="cuda", seed=num_patches)
    table_dtype = torch.float32 if autocast else dtype
    low = (x32.detach().to(dtype).requires_grad_(), ids_restore, tok32.detach().to(table_dtype).requires_grad_(),
           pos32.to(table_dtype))
    upstream = torch.randn(n, num_patches + 1, dd, device="cuda")
    want = _run("reference", x32, ids_restore, tok32, pos32, upstream)
    torch_low = _run("reference", *low, upstream)
    got = _run("cuda", *low, upstream)
    for what, g, t, w in zip(("output", "grad x", "mask token grad"), got, torch_low, want):
        assert g.dtype == t.dtype, what
        assert_rel_close(g, w, 2 * rel_err(t, w) + 1e-6, what)
    assert torch.equal(got[0], torch_low[0]) and torch.equal(got[1], torch_low[1])  # GPU stores round as torch
    again = _run("cuda", *low, upstream)
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # no atomics: bit-identical run to run
    tri = _run("triton", *low, upstream)
    assert torch.equal(got[0], tri[0]) and torch.equal(got[1], tri[1])
    assert_rel_close(got[2], tri[2], 1e-5 + RNE_TOL.get(table_dtype, 0.0), "mask token grad vs triton")


@pytest.mark.gpu
@pytest.mark.parametrize("n,num_patches,len_keep,dd", [(3, 196, 49, 512), (2, 256, 64, 512), (3, 24, 6, 8)])
def test_cuda_gpu_matches_triton_fp32(cuda_backend: Backend, n: int, num_patches: int, len_keep: int, dd: int) -> None:
    args = _inputs(n, num_patches, len_keep, dd, device="cuda", seed=dd)
    upstream = torch.randn(n, num_patches + 1, dd, device="cuda")
    got, tri = _run("cuda", *args, upstream), _run("triton", *args, upstream)
    assert torch.equal(got[0], tri[0]) and torch.equal(got[1], tri[1])
    assert_rel_close(got[2], tri[2], 1e-5, "mask token grad")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_cuda_gpu_opcheck(cuda_backend: Backend, dtype: torch.dtype) -> None:
    x, ids_restore, mask_token, pos = _inputs(3, 196, 49, 64, device="cuda")
    x = x.detach().to(dtype).requires_grad_()
    torch.library.opcheck(torch.ops.fastmae.unshuffle.default, (x, ids_restore, mask_token, pos))
    grad = torch.randn(3, 197, 64, device="cuda")
    torch.library.opcheck(torch.ops.fastmae.unshuffle_backward.default, (grad, ids_restore, 49, dtype, torch.float32))


@pytest.mark.gpu
def test_cuda_gpu_mixed_devices(cuda_backend: Backend) -> None:
    x, ids_restore, mask_token, pos = (t.detach() for t in _inputs(2, 24, 6, 8, device="cuda"))
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        torch.ops.fastmae.unshuffle(x, ids_restore, mask_token, pos.cpu())
    with pytest.raises(RuntimeError, match="must be on one device"):
        torch.ops.fastmae.unshuffle_backward(torch.randn(2, 25, 8, device="cuda"), ids_restore.cpu(), 6,
                                             torch.float32, torch.float32)
