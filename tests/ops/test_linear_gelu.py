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


def test_reference_matches_nn_modules_with_grads() -> None:
    torch.manual_seed(7)
    fc1 = nn.Linear(96, 384)
    x = torch.randn(3, 65, 96, requires_grad=True)
    params = (x, fc1.weight, fc1.bias)
    got = ops.linear_gelu(*params, backend="reference")
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


# --- kernel backends (triton: the interpreter here) ----------------------------------------------------------
# tests/ops/test_backends.py checks every backend against the reference on the op's cases (fp32 on CPU,
# bf16/fp16 on a GPU); these test what those cases do not reach, and (linear_gelu's kernels are the custom op
# fastmae::bias_gelu around cuBLAS's GEMM, not an Op.kernel_op) that op's opcheck and determinism.

from fastmae.ops._kernels import KERNEL_BACKENDS  # noqa: E402
from fastmae.ops.linear_gelu import bias_gelu_backward_op, bias_gelu_op  # noqa: E402

OP = ops.OPS["linear_gelu"]
KERNELS = [b.name for b in OP.backends if b.name in KERNEL_BACKENDS]

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


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("shape,features", [
    ((7, 12), 48),  # plain (R, Din), D = 12
    ((2, 3, 5, 16), 64),  # 4-D
    ((1, 1, 8), 32),  # one row
    ((5, 7, 24), 96),  # D = 24: F = 4 * D, not a power of two
])
def test_shapes_the_cases_lack(backend: str, shape: tuple[int, ...], features: int) -> None:
    args = _inputs(shape, features, seed=features + len(shape))
    upstream = _upstream(shape, features)
    got, want = _run(backend, *args, upstream), _run("reference", *args, upstream)
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


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_only_one_input_needs_grad(backend: str) -> None:
    args = _inputs((3, 50, 24), 96, seed=4)
    outs = {}
    for name in (backend, "reference"):
        outs[name] = []
        for i, leaf in enumerate(args):
            only = [t if j == i else t.detach() for j, t in enumerate(args)]
            outs[name] += torch.autograd.grad(ops.linear_gelu(*only, backend=name).square().sum(), leaf)
    for got, want, name in zip(outs[backend], outs["reference"], NAMES[1:]):
        assert_rel_close(got, want, 1e-5, name)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_noncontiguous_inputs_and_upstream(backend: str) -> None:
    x, w, _ = _inputs((2, 50, 24), 96, seed=5)
    x_t = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # same values, strided
    w_t = w.detach().T.contiguous().T.requires_grad_()  # (F, Din) stored column-major
    assert not x_t.is_contiguous() and not w_t.is_contiguous()
    b_s = torch.randn(192).requires_grad_()
    outs = {}
    for name in (backend, "reference"):
        out = ops.linear_gelu(x_t, w_t, b_s[::2], backend=name)
        upstream = torch.ones(96, 2, 50).permute(1, 2, 0)  # strided upstream gradient
        outs[name] = [out, *torch.autograd.grad(out, (x_t, w_t, b_s), upstream)]
    for got, want, name in zip(outs[backend], outs["reference"], NAMES):
        assert_rel_close(got, want, 1e-5, name)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_no_rows(backend: str) -> None:
    x, w, b = _inputs((0, 24), 96)
    out = ops.linear_gelu(x, w, b, backend=backend)
    assert out.shape == (0, 96)
    gw, gb = torch.autograd.grad(out.sum(), (w, b))
    assert torch.equal(gw, torch.zeros(96, 24)) and torch.equal(gb, torch.zeros(96))


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_on_cpu(backend: str, dtype: torch.dtype) -> None:
    """bf16/fp16 x, weight and bias: the output and every gradient in that dtype, close to fp32 math on the
    same values."""
    shape, features = (2, 50, 768), 3072
    args = _inputs(shape, features, dtype, seed=6)
    upstream = _upstream(shape, features)
    got, want = _run(backend, *args, upstream), _run("reference", *args, upstream)
    for g, w, name in zip(got, want, NAMES):
        assert g.dtype == w.dtype == dtype, name
        # The reference rounds its fp32 result once; the triton path rounds the GEMM's output h, then the
        # output (the interpreter may truncate); the gradients also pass through the rounded dh.
        assert_rel_close(g, w, (2 if name == "out" else 3) * CAST_TOL[dtype], name)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_autocast_dtypes_on_cpu(backend: str, dtype: torch.dtype) -> None:
    """Under autocast, fp32 leaves (the model's): F.linear runs in the autocast dtype, so every backend gives an
    output in that dtype, as nn.Linear + nn.GELU do (the torch backend), and fp32 gradients."""
    shape, features = (1, 65, 320), 1280
    args = _inputs(shape, features, seed=7)
    upstream = _upstream(shape, features)
    with torch.autocast("cpu", dtype=dtype):
        got, low, want = (_run(name, *args, upstream) for name in (backend, "torch", "reference"))
    for g, t, w, name in zip(got, low, want, NAMES):
        assert g.dtype == t.dtype == w.dtype == (dtype if name == "out" else torch.float32), name
        # the torch backend's own error from the low-precision GEMM, and one more rounding (the interpreter's)
        assert_rel_close(g, w, rel_err(t, w) + CAST_TOL[dtype], name)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bias_gelu_op_opcheck_and_determinism(backend: str, dtype: torch.dtype, device: str) -> None:
    """opcheck of the kernels' custom ops (schema, fake, autograd registration); results bit-identical run to run
    (no atomics), forward and backward."""
    width = 96 if device == "cpu" else 3072
    h = (2 * torch.randn(4, 7, width)).to(device, dtype).requires_grad_()
    b = (0.5 * torch.randn(width)).to(device, dtype).requires_grad_()
    torch.library.opcheck(bias_gelu_op, (h, b, backend))
    g = torch.randn(4, 7, width).to(device, dtype)
    torch.library.opcheck(bias_gelu_backward_op, (g, h.detach(), b.detach(), backend))
    first, again = (bias_gelu_op(h, b, backend) for _ in range(2))
    assert torch.equal(first, again)
    grads, grads_again = (bias_gelu_backward_op(g, h.detach(), b.detach(), backend) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(grads, grads_again))


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_supports_refuses(backend: str, without_interpreter: object) -> None:
    assert [b.name for b in OP.backends] == ["torch", "triton", "triton-gemm", "reference"]
    rules = OP.backend(backend)
    args = _inputs((2, 7, 24), 96)
    assert rules.why_not(args, OP.arg_names) is None
    assert OP.select(args).name == "torch"  # CPU: the kernels run only when named
    refused = {
        f"{backend} takes fp32/bf16/fp16, got x torch.float64": tuple(t.detach().double() for t in args),
        "at least one output feature": (torch.randn(3, 8), torch.randn(0, 8), torch.zeros(0)),
    }
    for reason, bad in refused.items():
        assert reason in (rules.why_not(bad, OP.arg_names) or ""), reason
        with pytest.raises(ops.BackendUnavailableError, match=reason):
            ops.linear_gelu(*bad, backend=backend)
    if backend == "triton":  # without the interpreter, CPU tensors are refused with a reason naming it
        assert "interpreter" in without_interpreter(rules).why_not(args, OP.arg_names)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_gpu_autocast_dtypes(backend: str, dtype: torch.dtype) -> None:
    """Under CUDA autocast with fp32 leaves: the output in the autocast dtype and fp32 gradients, as the torch
    backend, and at most 2x its error vs the fp32 reference."""
    shape, features = (64, 50, 768), 3072
    args = _inputs(shape, features, device="cuda")
    upstream = _upstream(shape, features, device="cuda")
    want = _run("reference", *args, upstream)
    with torch.autocast("cuda", dtype=dtype):
        got, low = _run(backend, *args, upstream), _run("torch", *args, upstream)
    for g, t, w, name in zip(got, low, want, NAMES):
        assert g.dtype == t.dtype == (dtype if name == "out" else torch.float32), name
        assert_rel_close(g, w, 2 * rel_err(t, w) + 1e-5, name)
