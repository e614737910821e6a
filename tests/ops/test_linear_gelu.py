import math

import pytest
import torch
import torch.nn as nn

from fastmae import ops
from fastmae.ops.linear_gelu import linear_gelu_reference
from numerics import assert_rel_close, rel_err


def _erf_gelu_f64(z: torch.Tensor) -> torch.Tensor:
    """``z * (1 + erf(z / sqrt 2)) / 2`` in float64: the exact GELU, written out."""
    z = z.double()
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


@pytest.mark.parametrize("shape,features", [((3, 50, 768), 3072), ((1, 65, 40), 96), ((7, 12), 48)])
def test_reference_is_linear_then_the_exact_gelu(shape: tuple[int, ...], features: int) -> None:
    g = torch.Generator().manual_seed(features)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(features, shape[-1], generator=g) / math.sqrt(shape[-1])
    b = torch.randn(features, generator=g)
    got = linear_gelu_reference(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (*shape[:-1], features)
    z = x.double() @ w.double().T + b.double()  # (..., F)
    assert_rel_close(got, _erf_gelu_f64(z), 1e-6, "reference")
    assert linear_gelu_reference(x.bfloat16(), w, b).dtype == torch.bfloat16  # x's dtype, whatever the params'


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_backends_match_nn_modules_with_grads(backend: str) -> None:
    torch.manual_seed(7)
    fc1 = nn.Linear(96, 384)
    x = torch.randn(3, 65, 96, requires_grad=True)
    params = (x, fc1.weight, fc1.bias)
    got = ops.linear_gelu(*params, backend=backend)
    want = nn.GELU()(fc1(x))  # the official MLP's first half
    assert_rel_close(got, want, 1e-6, "forward")
    upstream = torch.randn_like(want)
    for a, e, name in zip(torch.autograd.grad(got, params, upstream), torch.autograd.grad(want, params, upstream),
                          ["x", "weight", "bias"]):
        assert_rel_close(a, e, 1e-5, name)


def test_public_validates() -> None:
    x, w, b = torch.randn(2, 8), torch.randn(16, 8), torch.zeros(16)
    with pytest.raises(ValueError, match=r"weight must have shape \(\*, 8\)"):
        ops.linear_gelu(x, torch.randn(16, 7), b)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        ops.linear_gelu(x, torch.randn(8), b)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        ops.linear_gelu(x, w, torch.zeros(8))
    with pytest.raises(ValueError, match="bias must have 1 dimensions"):
        ops.linear_gelu(x, w, torch.zeros(1, 16))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.linear_gelu(torch.ones(2, 8, dtype=torch.int64), w, b)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        ops.linear_gelu(x, w, [0.0] * 16)
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.linear_gelu(torch.tensor(1.0), torch.randn(16, 1), b)
    with pytest.raises(ValueError, match="one device"):
        ops.linear_gelu(x, w, torch.zeros(16, device="meta"))
    with pytest.raises(TypeError, match="share a dtype outside autocast"):
        ops.linear_gelu(x, w.bfloat16(), b)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as nn.Linear: mixed dtypes are fine under autocast
        assert ops.linear_gelu(x, w.bfloat16(), b, backend="reference").dtype == torch.bfloat16


# --- triton backend (interpreter on CPU here; the gpu-marked tests run on CUDA) -------------------------------

LOW_PRECISION = [torch.bfloat16, torch.float16]
# One rounding of an fp32 value to bf16/fp16: on a GPU round-to-nearest-even (<= half an ulp: 2^-9 bf16,
# 2^-12 fp16 relative); Triton 3.8's interpreter rounds fp16 the same way but truncates fp32 -> bf16 (< one
# ulp, 2^-7 relative). Per element, so also norm-wise.
CAST_TOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-11}
NAMES = ["out", "grad x", "grad weight", "grad bias"]


def _inputs(shape: tuple[int, ...], features: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (..., Din)``, ``weight (F, Din)``, ``bias (F,)``, leaves that require grad; ``x @ weight^T`` has std
    about 2 (both GELU tails and its bend)."""
    g = torch.Generator().manual_seed(seed)
    din = shape[-1]
    x = torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()
    w = (2 * torch.randn(features, din, generator=g) / math.sqrt(max(din, 1))).to(device, dtype).requires_grad_()
    b = (0.5 * torch.randn(features, generator=g)).to(device, dtype).requires_grad_()
    return x, w, b


def _upstream(shape: tuple[int, ...], features: int, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    """The output's gradient, ``(..., F)`` for ``x (..., Din)``."""
    return torch.randn(*shape[:-1], features, generator=torch.Generator().manual_seed(seed)).to(device)


def _run(backend: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
         upstream: torch.Tensor) -> list[torch.Tensor]:
    """``[out, grad_x, grad_weight, grad_bias]`` of one backend for the upstream gradient."""
    out = ops.linear_gelu(x, w, b, backend=backend)
    return [out, *torch.autograd.grad(out, (x, w, b), upstream.to(out.dtype))]


@pytest.mark.parametrize("shape,features", [
    ((3, 50, 768), 3072),  # ViT-B encoder, patch 16: 1 + 49 visible tokens, F = 4 * 768
    ((1, 65, 1280), 5120),  # ViT-H encoder, patch 14: 1 + 64 visible tokens (65 rows, odd)
    ((1, 197, 512), 2048),  # decoder, patch 16 (196 patches + cls)
    ((3, 257, 512), 2048),  # decoder, patch 14: 771 rows
    ((5, 7, 24), 96),  # D = 24: F = 4 * D, not a power of two
    ((3, 13, 40), 160),  # D = 40
    ((7, 12), 48),  # plain (R, Din), D = 12
    ((2, 3, 5, 16), 64),  # 4-D
    ((1, 1, 8), 32),  # one row
])
def test_triton_matches_reference_fp32(shape: tuple[int, ...], features: int) -> None:
    args = _inputs(shape, features, seed=features + len(shape))
    upstream = _upstream(shape, features)
    got, want = _run("triton", *args, upstream), _run("reference", *args, upstream)
    for g, w, name in zip(got, want, NAMES):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert_rel_close(g, w, 1e-5, name)


def test_triton_gpu_tiling_column_blocks_and_several_steps_per_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's tiles (256 columns; backward 8 rows) with 3 row programs: F = 640 is two full column blocks and
    a ragged one, each program walks several row tiles, the last one ragged (197 rows = 72 + 72 + 53), then the
    3 partial rows are reduced."""
    from fastmae.kernels import linear_gelu as kernels

    monkeypatch.setattr(kernels, "INTERPRETER_BLOCK_F", kernels.GPU_BLOCK_F)
    monkeypatch.setattr(kernels, "INTERPRETER_TILE", kernels.GPU_BWD_TILE)
    monkeypatch.setattr(kernels, "INTERPRETER_ROW_PROGRAMS", 3)
    assert kernels._bwd_blocks(640)[:2] == (8, 256)
    assert kernels._bwd_programs(197, 8, 3, torch.device("cpu")) == (3, 72)
    args = _inputs((1, 197, 160), 640, seed=3)
    upstream = _upstream((1, 197, 160), 640)
    for got, want, name in zip(_run("triton", *args, upstream), _run("reference", *args, upstream), NAMES):
        assert_rel_close(got, want, 1e-5, name)


def test_triton_only_one_input_needs_grad() -> None:
    args = _inputs((3, 50, 24), 96, seed=4)
    outs = {}
    for backend in ("triton", "reference"):
        outs[backend] = []
        for i, leaf in enumerate(args):
            only = [t if j == i else t.detach() for j, t in enumerate(args)]
            outs[backend] += torch.autograd.grad(ops.linear_gelu(*only, backend=backend).square().sum(), leaf)
    for got, want, name in zip(outs["triton"], outs["reference"], NAMES[1:]):
        assert_rel_close(got, want, 1e-5, name)


def test_triton_noncontiguous_inputs_and_upstream() -> None:
    x, w, _ = _inputs((2, 50, 24), 96, seed=5)
    x_t = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # same values, strided
    w_t = w.detach().T.contiguous().T.requires_grad_()  # (F, Din) stored column-major
    assert not x_t.is_contiguous() and not w_t.is_contiguous()
    b_s = torch.randn(192).requires_grad_()
    outs = {}
    for backend in ("triton", "reference"):
        out = ops.linear_gelu(x_t, w_t, b_s[::2], backend=backend)
        upstream = torch.ones(96, 2, 50).permute(1, 2, 0)  # strided upstream gradient
        outs[backend] = [out, *torch.autograd.grad(out, (x_t, w_t, b_s), upstream)]
    for got, want, name in zip(outs["triton"], outs["reference"], NAMES):
        assert_rel_close(got, want, 1e-5, name)


def test_triton_no_rows() -> None:
    x, w, b = _inputs((0, 24), 96)
    out = ops.linear_gelu(x, w, b, backend="triton")
    assert out.shape == (0, 96)
    gw, gb = torch.autograd.grad(out.sum(), (w, b))
    assert torch.equal(gw, torch.zeros(96, 24)) and torch.equal(gb, torch.zeros(96))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_triton_low_precision_interpreter(dtype: torch.dtype) -> None:
    """bf16/fp16 x, weight and bias: the output and every gradient in that dtype, close to fp32 math on the
    same values."""
    shape, features = (2, 50, 768), 3072
    args = _inputs(shape, features, dtype, seed=6)
    upstream = _upstream(shape, features)
    got, want = _run("triton", *args, upstream), _run("reference", *args, upstream)
    for g, w, name in zip(got, want, NAMES):
        assert g.dtype == w.dtype == dtype, name
        # The reference rounds its fp32 result once; the triton path rounds the GEMM's output h, then the
        # output (the interpreter may truncate); the gradients also pass through the rounded dh.
        assert_rel_close(g, w, (2 if name == "out" else 3) * CAST_TOL[dtype], name)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_triton_autocast_dtypes_interpreter(dtype: torch.dtype) -> None:
    """Under autocast, fp32 leaves (the model's): F.linear runs in the autocast dtype, so every backend gives an
    output in that dtype, as nn.Linear + nn.GELU do (the torch backend), and fp32 gradients."""
    shape, features = (1, 65, 320), 1280
    args = _inputs(shape, features, seed=7)
    upstream = _upstream(shape, features)
    with torch.autocast("cpu", dtype=dtype):
        got, low, want = (_run(backend, *args, upstream) for backend in ("triton", "torch", "reference"))
    for g, t, w, name in zip(got, low, want, NAMES):
        assert g.dtype == t.dtype == w.dtype == (dtype if name == "out" else torch.float32), name
        # the torch backend's own error from the low-precision GEMM, and one more rounding (the interpreter's)
        assert_rel_close(g, w, rel_err(t, w) + CAST_TOL[dtype], name)


def test_triton_ops_schema_and_autograd_registration() -> None:
    """opcheck's checks that run under the interpreter (fake-tensor and compile checks need a GPU)."""
    from fastmae.kernels.linear_gelu import bias_gelu_backward_op, bias_gelu_op

    checks = ("test_schema", "test_autograd_registration")
    h = torch.randn(2, 7, 96, requires_grad=True)
    b = torch.randn(96, requires_grad=True)
    torch.library.opcheck(bias_gelu_op, (h, b), test_utils=checks)
    torch.library.opcheck(bias_gelu_backward_op, (torch.randn(2, 7, 96), h.detach(), b.detach()), test_utils=checks)


def test_triton_supports_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    op = ops.OPS["linear_gelu"]
    assert [b.name for b in op.backends] == ["torch", "triton", "reference"]
    triton_backend = op.backend("triton")
    args = _inputs((2, 7, 24), 96)
    assert triton_backend.why_not(args) is None
    assert op.select(args).name == "torch"  # CPU: the interpreter is never picked by priority
    refused = {
        "fp32/bf16/fp16": tuple(t.detach().double() for t in args),
        "at least one output feature": (torch.randn(3, 8), torch.randn(0, 8), torch.zeros(0)),
    }
    for reason, bad in refused.items():
        assert reason in (triton_backend.why_not(bad) or ""), reason
        with pytest.raises(ops.BackendUnavailableError, match=reason):
            ops.linear_gelu(*bad, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "interpreter" in triton_backend.why_not(args)


# MLP shapes at a GPU batch: ViT-B/L/H encoder (F = 4D), decoder (F = 2048), and a small width
GPU_SHAPES = [((64, 50, 768), 3072), ((64, 50, 1024), 4096), ((32, 65, 1280), 5120), ((16, 197, 512), 2048),
              ((16, 257, 512), 2048), ((8, 65, 24), 96)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape,features", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple)
                         else str(s))
def test_gpu_low_precision(backend: str, dtype: torch.dtype, shape: tuple[int, ...], features: int) -> None:
    """Error vs the fp32 reference at most 2x PyTorch's own low-precision error (nn.Linear + nn.GELU: the
    ``torch`` backend) + a floor; the triton backend bit-identical run to run."""
    args32 = _inputs(shape, features, device="cuda", seed=features)
    low = [t.detach().to(dtype).requires_grad_() for t in args32]
    upstream = _upstream(shape, features, device="cuda")
    want = _run("reference", *args32, upstream)
    torch_low = _run("torch", *low, upstream)
    got = _run(backend, *low, upstream)
    for g, t, w, name in zip(got, torch_low, want, NAMES):
        assert g.dtype == t.dtype == dtype, name
        assert_rel_close(g, w, 2 * rel_err(t, w) + 1e-5, name)
    if backend == "triton":
        again = _run("triton", *low, upstream)
        assert all(torch.equal(a, b) for a, b in zip(got, again))  # no atomics


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_triton_gpu_autocast_dtypes(dtype: torch.dtype) -> None:
    """Under CUDA autocast with fp32 leaves: the output in the autocast dtype and fp32 gradients, as the torch
    backend, and at most 2x its error vs the fp32 reference."""
    shape, features = (64, 50, 768), 3072
    args = _inputs(shape, features, device="cuda")
    upstream = _upstream(shape, features, device="cuda")
    want = _run("reference", *args, upstream)
    with torch.autocast("cuda", dtype=dtype):
        got, low = _run("triton", *args, upstream), _run("torch", *args, upstream)
    for g, t, w, name in zip(got, low, want, NAMES):
        assert g.dtype == t.dtype == (dtype if name == "out" else torch.float32), name
        assert_rel_close(g, w, 2 * rel_err(t, w) + 1e-5, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_triton_gpu_opcheck(dtype: torch.dtype) -> None:
    from fastmae.kernels.linear_gelu import bias_gelu_backward_op, bias_gelu_op

    h = (2 * torch.randn(4, 50, 3072, device="cuda")).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(3072, device="cuda")).to(dtype).requires_grad_()
    torch.library.opcheck(bias_gelu_op, (h, b))
    g = torch.randn(4, 50, 3072, device="cuda", dtype=dtype)
    torch.library.opcheck(bias_gelu_backward_op, (g, h.detach(), b.detach()))
