import pytest
import torch
import torch.nn.functional as F

from fastmae import ops
from fastmae.ops.layer_norm import layer_norm_reference
from numerics import assert_rel_close


@pytest.mark.parametrize("shape", [(3, 50, 768), (1, 197, 512), (5, 65, 80)])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_reference_matches_functional(shape: tuple[int, ...], eps: float) -> None:
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(*shape, generator=g) * 3 + 1
    w, b = torch.randn(shape[-1], generator=g), torch.randn(shape[-1], generator=g)
    assert_rel_close(layer_norm_reference(x, w, b, eps), F.layer_norm(x, shape[-1:], w, b, eps), 1e-6, "LN")


@pytest.mark.parametrize("residual", [False, True])
def test_reference_matches_functional_with_grads(residual: bool) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 65, 96, generator=g, requires_grad=True)
    r = torch.randn(3, 65, 96, generator=g, requires_grad=True) if residual else None
    w = torch.randn(96, generator=g, requires_grad=True)
    b = torch.randn(96, generator=g, requires_grad=True)
    got = ops.layer_norm(x, w, b, 1e-6, r, backend="reference")
    total = x + r if residual else x
    want = F.layer_norm(total, (96,), w, b, 1e-6)
    if residual:
        got, got_sum = got
        assert torch.equal(got_sum, total)
    assert_rel_close(got, want, 1e-6, "forward")
    inputs = [x, w, b] + ([r] if residual else [])
    upstream = torch.randn_like(want)
    for a, e, name in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream),
                          ["x", "weight", "bias", "residual"]):
        assert_rel_close(a, e, 1e-5, name)


def test_public_validates() -> None:
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.layer_norm(torch.tensor(1.0), torch.ones(1), torch.zeros(1))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.layer_norm(torch.randn(2, 8), torch.ones(7), torch.zeros(8))
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 8\)"):
        ops.layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8), residual=torch.randn(2, 7))


# --- kernel backends (triton: the interpreter here) ----------------------------------------------------------
# tests/ops/test_backends.py checks every backend against the reference on the op's cases (fp32 on CPU,
# bf16/fp16 on a GPU), determinism, the fake and opcheck; these test what those cases do not reach.

from fastmae.ops._kernels import KERNEL_BACKENDS  # noqa: E402

OP = ops.OPS["layer_norm"]
KERNELS = [b.name for b in OP.backends if b.name in KERNEL_BACKENDS]

LOW_PRECISION = [torch.bfloat16, torch.float16]
# One rounding of an fp32 value to bf16/fp16: on a GPU round-to-nearest-even (<= half an ulp: 2^-9 bf16,
# 2^-12 fp16 relative); Triton 3.8's interpreter rounds fp16 the same way but truncates fp32 -> bf16 (< one
# ulp, 2^-7 relative). Per element, so also norm-wise.
CAST_TOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-11}


def _inputs(shape: tuple[int, ...], residual: bool, dtype: torch.dtype = torch.float32,
            param_dtype: torch.dtype | None = None, residual_dtype: torch.dtype | None = None, device: str = "cpu",
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x (..., D)`` (mean 1, std 3: the statistics matter), ``weight``, ``bias (D,)``, ``residual`` or None;
    all leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (torch.randn(*shape, generator=g) * 3 + 1).to(device, dtype).requires_grad_()
    r = torch.randn(*shape, generator=g).to(device, residual_dtype or dtype).requires_grad_() if residual else None
    w = (1 + 0.5 * torch.randn(d, generator=g)).to(device, param_dtype or dtype).requires_grad_()
    b = torch.randn(d, generator=g).to(device, param_dtype or dtype).requires_grad_()
    return x, w, b, r


def _upstream(shape: tuple[int, ...], residual: bool, seed: int = 1, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(device) for _ in range(2 if residual else 1)]


def _run(backend: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, r: torch.Tensor | None,
         upstream: list[torch.Tensor], eps: float = 1e-6) -> list[torch.Tensor]:
    """``[out, (sum,) grad_x, grad_w, grad_b, (grad_r)]`` of one backend for the upstream gradients."""
    got = ops.layer_norm(x, w, b, eps, r, backend=backend)
    outs = list(got) if r is not None else [got]
    inputs = [x, w, b] + ([r] if r is not None else [])
    grads = torch.autograd.grad(outs, inputs, [u.to(o.dtype) for u, o in zip(upstream, outs)])
    return outs + list(grads)


def _names(residual: bool) -> list[str]:
    return ["out"] + (["sum"] if residual else []) + ["grad x", "grad weight", "grad bias"] + (
        ["grad residual"] if residual else [])


def _upcast(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """fp32 leaf copies (same values) that require grad."""
    return [None if t is None else t.detach().float().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [
    (7, 24),  # plain (R, D)
    (2, 3, 5, 96),  # 4-D
    (1, 3, 4096),  # the widest rows the triton backend takes
    (3, 7, 96),  # small widths, not powers of two
])
def test_shapes_the_cases_lack(backend: str, shape: tuple[int, ...], residual: bool) -> None:
    args = _inputs(shape, residual, seed=shape[-1] + len(shape))
    upstream = _upstream(shape, residual)
    got, want = _run(backend, *args, upstream), _run("reference", *args, upstream)
    for g, w, name in zip(got, want, _names(residual)):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if name == "sum":
            assert torch.equal(g, w), name  # the same fp32 add
        else:
            assert_rel_close(g, w, 1e-5, name)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_eps_is_used(backend: str) -> None:
    args = _inputs((1, 50, 96), False)
    args[0].data.mul_(1e-3)  # variance ~1e-5: eps 1e-2 changes the result a lot
    upstream = _upstream((1, 50, 96), False)
    for got, want, name in zip(_run(backend, *args, upstream, eps=1e-2), _run("reference", *args, upstream, eps=1e-2),
                               _names(False)):
        assert_rel_close(got, want, 1e-5, name)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_triton_gpu_tiling_several_steps_per_program(monkeypatch: pytest.MonkeyPatch, residual: bool) -> None:
    """The GPU's backward tile (2048: 4 rows of 512) with 3 programs: each walks several row tiles, the last
    one a ragged tile (197 rows = 68 + 68 + 61), then the 3 partial rows are reduced."""
    from fastmae.kernels import layer_norm as kernels

    monkeypatch.setattr(kernels, "INTERPRETER_TILE", kernels.GPU_BWD_TILE)
    monkeypatch.setattr(kernels, "INTERPRETER_BWD_PROGRAMS", 3)
    assert kernels._bwd_programs(197, 4, torch.device("cpu")) == (3, 68)
    args = _inputs((1, 197, 512), residual, seed=3)
    upstream = _upstream((1, 197, 512), residual)
    for got, want, name in zip(_run("triton", *args, upstream), _run("reference", *args, upstream), _names(residual)):
        assert_rel_close(got, want, 1e-5, name)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_only_some_outputs_and_inputs_need_grad(backend: str) -> None:
    x, w, b, r = _inputs((3, 50, 96), True, seed=4)
    outs = {}
    for name in (backend, "reference"):
        out, total = ops.layer_norm(x, w, b, 1e-6, r, backend=name)
        only_sum = torch.autograd.grad(total.square().sum(), (x, r), retain_graph=True)  # the norm's output unused
        only_out = torch.autograd.grad(out.square().sum(), (x, w, b, r))  # the sum unused
        out = ops.layer_norm(x.detach(), w, b, 1e-6, r.detach(), backend=name)[0]
        only_params = torch.autograd.grad(out.sum(), (w, b))  # x and residual need no grad
        residual_only = torch.autograd.grad(ops.layer_norm(x.detach(), w.detach(), b.detach(), 1e-6, r,
                                                           backend=name)[0].square().sum(), r)
        outs[name] = [*only_sum, *only_out, *only_params, *residual_only]
    for got, want in zip(outs[backend], outs["reference"]):
        assert_rel_close(got, want, 1e-5, "gradient")


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_noncontiguous_inputs_and_upstream(backend: str) -> None:
    x, w, b, r = _inputs((2, 50, 96), True, seed=5)
    x_t = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # same values, strided
    r_t = r.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not x_t.is_contiguous() and not r_t.is_contiguous()
    w_s = torch.randn(192).requires_grad_()
    outs = {}
    for name in (backend, "reference"):
        out, total = ops.layer_norm(x_t, w_s[::2], b, 1e-6, r_t, backend=name)
        outs[name] = [out, total, *torch.autograd.grad(out.sum() + total.sum(), (x_t, w_s, b, r_t))]  # expanded 1s
        out = ops.layer_norm(x_t, w, b, 1e-6, backend=name)  # no residual: the strided x is what is normalised
        outs[name] += [out, *torch.autograd.grad(out.square().sum(), (x_t, w))]
    for got, want in zip(outs[backend], outs["reference"]):
        assert_rel_close(got, want, 1e-5, "noncontiguous")


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_no_rows(backend: str) -> None:
    x, w, b, r = _inputs((0, 96), True)
    out, total = ops.layer_norm(x, w, b, 1e-6, r, backend=backend)
    assert out.shape == total.shape == (0, 96)
    gw, gb = torch.autograd.grad(out.sum(), (w, b))
    assert torch.equal(gw, torch.zeros(96)) and torch.equal(gb, torch.zeros(96))


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_low_precision_on_cpu(backend: str, dtype: torch.dtype, residual: bool) -> None:
    """bf16/fp16 activations and parameters: the output, the sum and every gradient in the inputs' dtypes."""
    shape = (2, 50, 768)
    args = _inputs(shape, residual, dtype, seed=6)
    upstream = _upstream(shape, residual)
    got = _run(backend, *args, upstream)
    same = _run("reference", *args, upstream)  # the reference on the same low-precision inputs
    want = _run("reference", *_upcast(*args), [u.to(dtype).float() for u in upstream])  # fp32 on the same values
    for g, s, w, name in zip(got, same, want, _names(residual)):
        assert g.dtype == s.dtype == dtype, name
        # Both compute in fp32 from the same inputs and round once (the interpreter may truncate where torch
        # rounds): one ulp apart, plus the reference's own double rounding of gradients (it rounds the norm's
        # gradient to the sum's dtype, then adds the sum's gradient and rounds again).
        assert_rel_close(g, s, 2 * CAST_TOL[dtype], name)
        # Against fp32 math on the same values: our final rounding (1 ulp) plus, with a residual, the rounding
        # of the sum the statistics are taken on (1 ulp of s, carried through the normalisation and grown by
        # |s| / |s - mean|, about 1.1 for these inputs): 3 ulp leaves a margin (seen: at most 0.64 ulp).
        assert_rel_close(g, w, 3 * CAST_TOL[dtype], name)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_autocast_dtypes_on_cpu(backend: str, dtype: torch.dtype) -> None:
    """As under autocast: a bf16/fp16 branch output, the fp32 residual stream and fp32 parameters: the output
    and the sum are fp32, x's gradient is in x's dtype."""
    shape = (1, 65, 1280)
    args = _inputs(shape, True, dtype, param_dtype=torch.float32, residual_dtype=torch.float32, seed=7)
    upstream = _upstream(shape, True)
    got, want = _run(backend, *args, upstream), _run("reference", *args, upstream)
    for g, w, name in zip(got, want, _names(True)):
        assert g.dtype == w.dtype, name
        assert g.dtype == (dtype if name == "grad x" else torch.float32), name
        # fp32 math on identical values; only x's gradient is rounded to the low precision (one ulp)
        assert_rel_close(g, w, CAST_TOL[dtype] if name == "grad x" else 1e-5, name)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_fp16_params_with_fp32_activations(backend: str) -> None:
    args = _inputs((3, 50, 96), True, param_dtype=torch.float16, seed=8)
    upstream = _upstream((3, 50, 96), True)
    got, want = _run(backend, *args, upstream), _run("reference", *args, upstream)
    for g, w, name in zip(got, want, _names(True)):
        assert g.dtype == w.dtype, name
        # fp32 math on identical values; the parameter gradients are rounded once to fp16
        assert_rel_close(g, w, CAST_TOL[torch.float16] if "weight" in name or "bias" in name else 1e-5, name)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_supports_refuses(backend: str, without_interpreter: object) -> None:
    rules = OP.backend(backend)
    x, w, b, r = _inputs((2, 7, 96), True)
    assert rules.why_not((x, w, b, 1e-6, r), OP.arg_names) is None
    assert OP.select((x, w, b, 1e-6, r)).name == "torch"  # CPU: the kernels run only when named
    wide = torch.randn(2, 4097)
    refused = {
        "D = 4097 > 4096": (wide, torch.ones(4097), torch.zeros(4097), 1e-6, None),
        f"{backend} takes fp32/bf16/fp16, got x torch.float64": (x.detach().double(), w.detach().double(),
                                                                 b.detach().double(), 1e-6, None),
        "tensors on several devices": (x, w.detach().to("meta"), b, 1e-6, r),
        "non-empty last dimension": (torch.randn(3, 0), torch.ones(0), torch.zeros(0), 1e-6, None),
    }
    for reason, args in refused.items():
        assert reason in (rules.why_not(args, OP.arg_names) or ""), reason
        with pytest.raises(ops.BackendUnavailableError, match=reason):
            ops.layer_norm(*args, backend=backend)
    if backend == "triton":  # without the interpreter, CPU tensors are refused with a reason naming it
        assert "interpreter" in without_interpreter(rules).why_not((x, w, b, 1e-6, r), OP.arg_names)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_gpu_autocast_dtypes(backend: str, dtype: torch.dtype) -> None:
    shape = (64, 50, 768)
    args = _inputs(shape, True, dtype, param_dtype=torch.float32, residual_dtype=torch.float32, device="cuda")
    upstream = _upstream(shape, True, device="cuda")
    got, want = _run(backend, *args, upstream), _run("reference", *args, upstream)
    for g, w, name in zip(got, want, _names(True)):
        assert g.dtype == w.dtype, name
        assert_rel_close(g, w, CAST_TOL[dtype] if name == "grad x" else 1e-5, name)
