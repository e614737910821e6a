"""linear_gelu's ``triton-gemm`` backend (kernels/linear_gelu_gemm.py: the GEMMs in Triton, bias + GELU in the
forward's epilogue, GELU' in the backward GEMMs' prologue, the bias gradient in the weight-gradient GEMM).

tests/ops/test_backends.py runs it on the op's cases (fp32 against the reference); this file covers what those
cases do not: shapes ragged against every tile (interpreter tiles, tiny tiles for many programs and ragged
L2 groups, the GPU's tile sizes), bf16/fp16 and autocast, strided inputs, empty dimensions, opcheck /
determinism / fakes of ``fastmae::linear_gelu`` and its backward (not ``Op.kernel_op``: the ``triton``
backend does not run them), and that the backend runs only when named. Without a GPU the kernels run in the
Triton interpreter (tests/conftest.py), so shapes stay small (M <= 70, K <= 48, N <= 100).
"""

from __future__ import annotations

import math

import pytest
import torch

import fastmae
from fastmae import ops
from fastmae.kernels import linear_gelu_gemm as kernels
from fastmae.ops.linear_gelu import linear_gelu_backward_op, linear_gelu_op
from numerics import assert_rel_close, rel_err

OP = ops.OPS["linear_gelu"]
BACKEND = "triton-gemm"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["out", "grad x", "grad weight", "grad bias"]
# one rounding to bf16/fp16 (the interpreter truncates fp32 -> bf16: < one ulp, 2^-7 relative)
CAST_TOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-11}

pytestmark = pytest.mark.skipif(OP.backend(BACKEND).available() is not None,
                                reason=f"the {BACKEND} backend cannot run here: {OP.backend(BACKEND).available()}")


def _inputs(shape: tuple[int, ...], features: int, dtype: torch.dtype = torch.float32,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (..., K)``, ``weight (N, K)``, ``bias (N,)``: leaves that require grad; ``x @ weight^T`` has std about
    2 (both GELU tails and its bend)."""
    g = torch.Generator().manual_seed(seed)
    d_in = shape[-1]
    x = torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (2 * torch.randn(features, d_in, generator=g) / math.sqrt(max(d_in, 1))).to(DEVICE, dtype).requires_grad_()
    b = (0.5 * torch.randn(features, generator=g)).to(DEVICE, dtype).requires_grad_()
    return x, w, b


def _run(backend: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, seed: int = 1) -> list[torch.Tensor]:
    """``[out, grad_x, grad_weight, grad_bias]`` for an upstream gradient drawn from ``seed``."""
    out = ops.linear_gelu(x, w, b, backend=backend)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    return [out, *torch.autograd.grad(out, (x, w, b), upstream)]


def _assert_matches_reference(args: tuple[torch.Tensor, ...], tol: float = 1e-5) -> None:
    for got, want, name in zip(_run(BACKEND, *args), _run("reference", *args), NAMES):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert_rel_close(got, want, tol, name)


def _use_tiles(monkeypatch: pytest.MonkeyPatch, tiles: dict[str, kernels.Tiles]) -> None:
    monkeypatch.setattr(kernels, "_tiles", lambda kernel, dtype: tiles[kernel])


@pytest.mark.parametrize("shape,features", [
    ((70, 48), 96),  # 3 row tiles (the last ragged, a ragged group of 2), 2 feature tiles, 2 K steps (ragged)
    ((2, 5, 33), 100),  # 3-D, K and N odd
    ((1, 1, 8), 1),  # one row, one feature
    ((3, 7, 17), 65),  # 21 rows, N one past a tile
])
def test_odd_shapes(shape: tuple[int, ...], features: int) -> None:
    _assert_matches_reference(_inputs(shape, features, seed=features))


def test_tiny_tiles_many_programs_and_ragged_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """16-wide tiles, groups of 3: 5 row tiles (groups 3 + 2), 6 feature tiles, 3 K steps; the grad-W grid has 6
    x 3 programs, of which the first K column writes the bias gradient."""
    tiny = kernels.Tiles(16, 16, 16, 3, 4, 1)
    _use_tiles(monkeypatch, {"fwd": tiny, "dx": tiny, "dw": tiny})
    _assert_matches_reference(_inputs((70, 48), 96, seed=2))


def test_gpu_tile_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's bf16 configurations (128-wide tiles, 64/128-deep steps, groups of 8) on the same odd shape:
    every tile ragged, grad x's reduction over N in two steps."""
    _use_tiles(monkeypatch, kernels.GPU_TILES)
    _assert_matches_reference(_inputs((70, 48), 96, seed=3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype: torch.dtype) -> None:
    """bf16/fp16 x, weight and bias: every result in that dtype, close to fp32 math on the same values (the
    output rounded once; the gradients also through the rounded gate and dz)."""
    args = _inputs((2, 35, 48), 96, dtype, seed=4)
    for got, want, name in zip(_run(BACKEND, *args), _run("reference", *args), NAMES):
        assert got.dtype == want.dtype == dtype, name
        assert_rel_close(got, want, (2 if name == "out" else 3) * CAST_TOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype: torch.dtype) -> None:
    """fp32 leaves (the model's) under autocast: the GEMMs in the autocast dtype (as nn.Linear), the output in
    it and fp32 gradients (the bias's from fp32 sums), within the torch backend's own error plus one rounding."""
    args = _inputs((1, 65, 40), 96, seed=5)
    with torch.autocast(DEVICE, dtype=dtype):
        got, low, want = (_run(name, *args) for name in (BACKEND, "torch", "reference"))
    for g, t, w, name in zip(got, low, want, NAMES):
        assert g.dtype == t.dtype == w.dtype == (dtype if name == "out" else torch.float32), name
        assert_rel_close(g, w, rel_err(t, w) + CAST_TOL[dtype], name)


def test_strided_inputs_and_upstream() -> None:
    x, w, _ = _inputs((2, 30, 24), 96, seed=6)
    x_t = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # same values, strided
    w_t = w.detach().T.contiguous().T.requires_grad_()  # (N, K) stored column-major
    b_s = torch.randn(192, device=DEVICE).requires_grad_()
    assert not x_t.is_contiguous() and not w_t.is_contiguous()
    outs = {}
    for name in (BACKEND, "reference"):
        out = ops.linear_gelu(x_t, w_t, b_s[::2], backend=name)
        upstream = torch.ones(96, 2, 30, device=DEVICE).permute(1, 2, 0)  # strided upstream gradient
        outs[name] = [out, *torch.autograd.grad(out, (x_t, w_t, b_s), upstream)]
    for got, want, name in zip(outs[BACKEND], outs["reference"], NAMES):
        assert_rel_close(got, want, 1e-5, name)


def test_only_one_input_needs_grad() -> None:
    args = _inputs((3, 10, 24), 40, seed=7)
    for i, leaf in enumerate(args):
        only = [t if j == i else t.detach() for j, t in enumerate(args)]
        got, want = (torch.autograd.grad(ops.linear_gelu(*only, backend=name).square().sum(), leaf)[0]
                     for name in (BACKEND, "reference"))
        assert_rel_close(got, want, 1e-5, NAMES[i + 1])


@pytest.mark.parametrize("shape,features", [((0, 24), 96), ((5, 0), 7), ((3, 4), 0)])
def test_empty_dimensions(shape: tuple[int, ...], features: int) -> None:
    """No rows (zero weight and bias gradients), no input features (out = gelu(bias): the bias gradient still
    comes from the grad-W kernel, which then has one K column) and no output features (zero grad x)."""
    args = _inputs(shape, features, seed=8)
    got, want = _run(BACKEND, *args), _run("reference", *args)
    for g, w, name in zip(got, want, NAMES):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)
    if features == 0:
        assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_custom_ops_opcheck_determinism_and_fakes() -> None:
    """opcheck of fastmae::linear_gelu (schema, fake, autograd registration) and its backward; results bit-identical
    run to run (no atomics, no split-K); the public op on meta tensors gives the real shapes and dtypes."""
    x, w, b = _inputs((2, 9, 20), 36, seed=9)
    torch.library.opcheck(linear_gelu_op, (x, w, b, BACKEND))
    out, gate = linear_gelu_op(x.detach(), w.detach(), b.detach(), BACKEND)
    g = torch.randn_like(out)
    torch.library.opcheck(linear_gelu_backward_op, (g, gate, x.detach(), w.detach(), b.detach(), BACKEND))
    first, again = _run(BACKEND, x, w, b), _run(BACKEND, x, w, b)
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    meta = [t.detach().to("meta").requires_grad_() for t in (x, w, b)]
    fake = ops.linear_gelu(*meta, backend=BACKEND)
    assert (fake.shape, fake.dtype) == (first[0].shape, first[0].dtype)
    grads = torch.autograd.grad(fake, meta, torch.empty_like(fake))
    assert [(t.shape, t.dtype) for t in grads] == [(t.shape, t.dtype) for t in first[1:]]


def test_gate_is_the_gelu_derivative_and_not_differentiable() -> None:
    """What the forward saves for the backward: gelu'(z) (``Phi(z) + z phi(z)``), marked non-differentiable."""
    x, w, b = _inputs((4, 12), 40, seed=10)
    out, gate = linear_gelu_op(x, w, b, BACKEND)
    z = (x.double() @ w.double().T + b.double()).detach().requires_grad_()
    want = torch.autograd.grad(torch.nn.functional.gelu(z).sum(), z)[0]
    assert out.requires_grad and not gate.requires_grad
    assert_rel_close(gate, want, 1e-6, "gate")


def test_named_only() -> None:
    """Never picked by priority (its auto_when is never true), chosen when named by any of the three ways; the
    one-node graph under export."""
    args = _inputs((2, 7, 24), 96)
    rules = OP.backend(BACKEND)
    assert rules.why_not(args, OP.arg_names) is None and rules.auto_when(*args) is False
    assert OP.select(args).name != BACKEND
    assert OP.select(args, BACKEND) is rules
    with fastmae.use_backend(linear_gelu=BACKEND):
        assert OP.select(args) is rules
    with fastmae.use_backend(BACKEND):  # a blanket name: only linear_gelu has it
        assert OP.select(args) is rules
    with pytest.raises(ops.BackendUnavailableError, match="triton-gemm takes fp32/bf16/fp16, got x torch.float64"):
        ops.linear_gelu(*(t.detach().double() for t in args), backend=BACKEND)

    class Fc1(torch.nn.Module):
        def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return ops.linear_gelu(x, w, b, backend=BACKEND)

    meta = tuple(t.detach().to("meta") for t in args)
    graph = torch.export.export(Fc1(), meta).graph
    assert "fastmae.linear_gelu.default" in {str(n.target) for n in graph.nodes if n.op == "call_function"}


def test_refuses_bad_inputs() -> None:
    x, w, b = (t.detach() for t in _inputs((3, 8), 16))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor, got NoneType"):  # the op has no bias-free form
        ops.linear_gelu(x, w, None, backend=BACKEND)
    with pytest.raises(TypeError, match=r"x and weight must share a dtype, got torch.float32 and torch.bfloat16"):
        linear_gelu_op(x, w.bfloat16(), b, BACKEND)
