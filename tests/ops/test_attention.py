import sys

import pytest
import torch

from fastmae import ops
from fastmae.ops.attention import attention_reference
from numerics import assert_rel_close, rel_err


def _per_head_loop(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """One head at a time in float64, the textbook formula."""
    n, s, width = qkv.shape
    dh = width // (3 * num_heads)
    q, k, v = qkv.double().split(width // 3, dim=-1)  # 3 x (N, S, H*Dh)
    outs = []
    for h in range(num_heads):
        sl = slice(h * dh, (h + 1) * dh)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / dh**0.5  # (N, S, S)
        outs.append(torch.softmax(scores, dim=-1) @ v[..., sl])  # (N, S, Dh)
    return torch.cat(outs, dim=-1)  # (N, S, H*Dh)


SHAPES = [(1, 50, 4, 64), (3, 65, 2, 80), (2, 197, 2, 32), (1, 257, 1, 64), (5, 17, 3, 32)]


@pytest.mark.parametrize("n,s,h,dh", SHAPES)
def test_reference_matches_textbook(n: int, s: int, h: int, dh: int) -> None:
    qkv = torch.randn(n, s, 3 * h * dh, generator=torch.Generator().manual_seed(s))
    assert_rel_close(attention_reference(qkv, h), _per_head_loop(qkv, h), 1e-6, "reference")


def test_public_validates() -> None:
    with pytest.raises(ValueError, match="3 \\* num_heads \\* head_dim"):
        ops.attention(torch.randn(2, 5, 40), 3)
    with pytest.raises(ValueError, match="3 dimensions"):
        ops.attention(torch.randn(5, 48), 2)


# --- kernel backends (triton: the interpreter here) ----------------------------------------------------------
# tests/ops/test_backends.py checks every backend against the reference on the op's cases (fp32 on CPU,
# bf16/fp16 on a GPU), determinism, the fake and opcheck; these test what those cases do not reach.

from fastmae.ops._kernels import KERNEL_BACKENDS  # noqa: E402

OP = ops.OPS["attention"]
KERNELS = [b.name for b in OP.backends if b.name in KERNEL_BACKENDS]
LOW_PRECISION = [torch.bfloat16, torch.float16]


def _qkv(n: int, s: int, h: int, dh: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
         seed: int = 0) -> torch.Tensor:
    """A leaf ``qkv (N, S, 3*H*Dh)`` with scores of spread ~2 (peaked enough to exercise the softmax)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, s, 3 * h * dh, generator=g) * 1.5).to(device, dtype).requires_grad_()


def _run(backend: str, qkv: torch.Tensor, h: int, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = ops.attention(qkv, h, backend=backend)
    (grad,) = torch.autograd.grad(out, qkv, upstream)
    return out, grad


def _upstream(n: int, s: int, h: int, dh: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(n, s, h * dh, generator=torch.Generator().manual_seed(1)).to(device)


# The op's cases (S 50/65/197/257/17 with Dh 64/80/32/32/16) take most forms of the default plans (keys in one
# tile or two, head dims in one or two, fused and split backwards); these are the forms they lack: the fused
# backward with a tail key tile (S 65 = 64 + 16, Dh 32), the split backward at a single key tile with the head dim
# in two parts (S 17, Dh 80: 64 + 16) and the looping forward with the head dim in two parts (S 197, Dh 80).
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("n,s,h,dh", [(3, 65, 1, 32), (1, 17, 2, 80), (1, 197, 1, 80)], ids=lambda v: str(v))
def test_plan_forms_the_cases_lack(backend: str, n: int, s: int, h: int, dh: int) -> None:
    # The kernels compute in fp32 with an exact (not online) softmax over the whole key row, so the only
    # differences from the reference are fp32 summation orders: 1e-5 holds with a wide margin (~4e-7 seen).
    qkv = _qkv(n, s, h, dh, seed=s + dh)
    upstream = _upstream(n, s, h, dh)
    (out, grad), (want_out, want_grad) = _run(backend, qkv, h, upstream), _run("reference", qkv, h, upstream)
    assert out.dtype == want_out.dtype and out.shape == (n, s, h * dh)
    assert_rel_close(out, want_out, 1e-5, "forward")
    assert_rel_close(grad, want_grad, 1e-5, "d qkv")


def test_two_parts_cover_with_least_padding() -> None:
    from fastmae.kernels.attention_plan import two_parts

    want = {1: (16, 0), 16: (16, 0), 17: (32, 0), 32: (32, 0), 33: (32, 16), 50: (64, 0), 65: (64, 16),
            80: (64, 16), 96: (64, 32), 100: (128, 0), 128: (128, 0), 197: (256, 0), 257: (256, 16),
            512: (512, 0)}
    assert {size: two_parts(size) for size in want} == want
    for size in range(1, 513):
        main, extra = two_parts(size)
        assert main + extra >= size and main + extra <= max(16, 1 << (size - 1).bit_length())


def test_plan_check_names_what_does_not_fit() -> None:
    from dataclasses import replace

    from fastmae.kernels.attention_plan import default_plan

    plan = default_plan(65, 80)
    plan.check(65, 80)
    with pytest.raises(ValueError, match=r"do not cover S = 81, Dh = 80"):
        plan.check(81, 80)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        replace(plan, fwd_block_m=48).check(65, 80)


# Every plan bench/tune_attention.py may time (and so may make the default) against the reference, at MAE's
# four (S, Dh) pairs: the forward alternatives, and the backward ones fed the default forward's out and lse.
# Plans that differ in warps only are run once: the interpreter ignores num_warps (the AOT test compiles them).
@pytest.mark.parametrize("s,dh", [(50, 64), (65, 80), (197, 32), (257, 32)], ids=lambda v: str(v))
def test_every_tuning_plan_matches_reference_fp32(s: int, dh: int) -> None:
    from dataclasses import replace

    from fastmae.kernels.attention import attention, attention_backward
    from fastmae.kernels.attention_plan import default_plan
    from fastmae.kernels.attention_tuning import tuning_plans

    n, h = 1, 1
    qkv = _qkv(n, s, h, dh, seed=7)
    upstream = _upstream(n, s, h, dh)
    want_out, want_grad = _run("reference", qkv, h, upstream)
    out, lse = attention(qkv.detach(), h, default_plan(s, dh))
    checked = 0
    for part, plans in tuning_plans(s, dh).items():
        one_per_tiling = {replace(p, fwd_warps=4, bwd_warps=4, dkdv_warps=4, dq_warps=4): None for p in plans}
        for plan in one_per_tiling:
            if part == "forward":
                assert_rel_close(attention(qkv.detach(), h, plan)[0], want_out, 1e-5, f"{part}: {plan}")
            else:
                got = attention_backward(upstream, qkv.detach(), out, lse, h, plan)
                assert_rel_close(got, want_grad, 1e-5, f"{part}: {plan}")
            checked += 1
    assert checked >= 20  # 4 forward, 2 fused, 9 dK/dV and 9 dQ tilings at the fewest (S 50: keys in one tile)


@pytest.mark.parametrize("s,dh,loop", [(65, 80, 16), (197, 32, 32), (257, 32, 64)], ids=lambda v: str(v))
def test_backward_takes_the_looped_forwards_out_and_lse(s: int, dh: int, loop: int) -> None:
    """The forward that walks the keys (online softmax) saves the same out and lse as the whole-K/V one: the
    default backward (split at 65/80 and 257/32, reading out; fused at 197/32) gives the reference gradient."""
    from dataclasses import replace

    from fastmae.kernels.attention import attention, attention_backward
    from fastmae.kernels.attention_plan import default_plan

    plan = replace(default_plan(s, dh), fwd_loop=loop, fwd_block_m=32)
    qkv = _qkv(1, s, 1, dh, seed=11)
    upstream = _upstream(1, s, 1, dh)
    want_out, want_grad = _run("reference", qkv, 1, upstream)
    out, lse = attention(qkv.detach(), 1, plan)
    q, k = qkv.detach()[..., :dh], qkv.detach()[..., dh:2 * dh]  # (1, S, Dh) each
    want_lse = torch.logsumexp(q @ k.transpose(1, 2) * dh**-0.5, dim=-1)  # (1, S)
    assert_rel_close(out, want_out, 1e-5, "forward")
    assert_rel_close(lse[:, 0], want_lse, 1e-6, "lse")
    assert_rel_close(attention_backward(upstream, qkv.detach(), out, lse, 1, plan), want_grad, 1e-5, "d qkv")


def test_triton_is_picked_by_priority_only_where_it_measured_faster() -> None:
    from fastmae.ops.attention import _triton_measured_faster

    def qkv(s: int, dh: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(1, s, 3 * 2 * dh, device="meta", dtype=dtype)  # 2 heads

    picks = {(s, dh): _triton_measured_faster(qkv(s, dh), 2)
             for s, dh in [(50, 64), (17, 32), (65, 80), (197, 32), (257, 32), (258, 32), (50, 96), (320, 64)]}
    assert picks == {(50, 64): True, (17, 32): True, (65, 80): True, (197, 32): True, (257, 32): True,
                     (258, 32): False, (50, 96): False, (320, 64): False}
    by_dtype = {dtype: _triton_measured_faster(qkv(197, 32, dtype), 2)
                for dtype in (torch.bfloat16, torch.float16, torch.float32)}
    assert by_dtype == {torch.bfloat16: True, torch.float16: True, torch.float32: False}  # fp32: not measured


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_reads_a_strided_qkv(backend: str) -> None:
    """qkv as a view with row padding (stride(1) > 3*H*Dh) and a batch stride of its own: read in place."""
    base = _qkv(3, 50, 2, 64, seed=5).detach()
    padded = torch.cat([base, torch.zeros(3, 50, 8)], dim=-1)[..., :384].requires_grad_()  # (3, 50, 384) view
    assert padded.stride(1) == 392
    upstream = _upstream(3, 50, 2, 64)
    for got, want in zip(_run(backend, padded, 2, upstream), _run("reference", padded, 2, upstream)):
        assert_rel_close(got, want, 1e-5, "strided")


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_expanded_upstream_gradient(backend: str) -> None:
    """The gradient of ``out.sum()`` (an upstream expanded from a scalar: stride 0) as of a dense upstream of 1s."""
    qkv = _qkv(1, 65, 2, 80, seed=2)
    first = ops.attention(qkv, 2, backend=backend)
    (g_expanded,) = torch.autograd.grad(first.sum(), qkv)
    (g_dense,) = torch.autograd.grad(ops.attention(qkv, 2, backend=backend), qkv, torch.ones_like(first))
    assert torch.equal(g_expanded, g_dense)


# Interpreter, bf16/fp16 inputs vs the reference on the same inputs (which computes in fp32 and rounds once):
# the forward differs by the output's one rounding (the interpreter truncates fp32 -> bf16: < 2^-7 relative;
# fp16 rounds to nearest: 2^-11). The backward reads the saved output O rounded to the input dtype to form
# delta = rowsum(dO * O), where the reference uses its fp32 O: a relative perturbation of 2^-8 (bf16) / 2^-11
# (fp16) in delta, amplified by the cancellation in dP - delta, plus the gradient's own rounding; 4x the cast
# error covers it (d qkv: about 4.3e-3 bf16 / 2.5e-4 fp16 seen; forward 4e-3 / 2e-5).
LOW_TOL = {torch.bfloat16: (2.0**-7, 2.0**-5), torch.float16: (2.0**-11, 2.0**-9)}


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("n,s,h,dh", [(3, 50, 2, 64), (1, 197, 1, 32), (1, 65, 2, 80)], ids=lambda v: str(v))
def test_low_precision_on_cpu(backend: str, dtype: torch.dtype, n: int, s: int, h: int, dh: int) -> None:
    qkv = _qkv(n, s, h, dh, dtype, seed=3)
    upstream = _upstream(n, s, h, dh)
    (out, grad), (want_out, want_grad) = _run(backend, qkv, h, upstream), _run("reference", qkv, h, upstream)
    assert out.dtype == want_out.dtype == dtype and grad.dtype == dtype
    tol_out, tol_grad = LOW_TOL[dtype]
    assert_rel_close(out, want_out, tol_out, "forward")
    assert_rel_close(grad, want_grad, tol_grad, "d qkv")


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_supports_refuses(backend: str, without_interpreter: object) -> None:
    rules = OP.backend(backend)
    ok = torch.randn(2, 257, 3 * 2 * 32)
    assert rules.why_not((ok, 2), OP.arg_names) is None
    assert OP.select((ok, 2)).name == "torch"  # CPU: the kernels run only when named
    refused = {
        "S = 513 > 512": (torch.randn(1, 513, 3 * 32), 1),
        "head dims up to 128, got 160": (torch.randn(1, 10, 3 * 160), 1),
        f"{backend} takes fp32/bf16/fp16, got qkv torch.float64": (torch.randn(1, 10, 3 * 64, dtype=torch.float64), 1),
    }
    for reason, args in refused.items():
        assert reason in (rules.why_not(args, OP.arg_names) or ""), reason
        with pytest.raises(ops.BackendUnavailableError, match=reason):
            ops.attention(*args, backend=backend)
    if backend == "triton":  # without the interpreter, CPU tensors are refused with a reason naming it
        assert "interpreter" in without_interpreter(rules).why_not((ok, 2), OP.arg_names)


def _assert_low_precision_rule(backend: str, qkv32: torch.Tensor, low: torch.Tensor, h: int,
                               upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``backend`` on ``low`` (``qkv32`` rounded to bf16/fp16) against the fp32 reference on ``qkv32``: error at
    most 2x the reference's own error in the same low precision + a 1e-4 floor, forward and d qkv."""
    want = _run("reference", qkv32, h, upstream)
    torch_low = _run("reference", low, h, upstream)
    got = _run(backend, low, h, upstream)
    for g, t, w, name in zip(got, torch_low, want, ("forward", "d qkv")):
        assert g.dtype == t.dtype == low.dtype, name
        assert_rel_close(g, w, 2 * rel_err(t, w) + 1e-4, f"{backend} {name}")
    return got


def _skip_without_xformers() -> None:
    """Skip where xformers is absent or has no CUDA kernel; an installed xformers that fails to import is a
    failure, not a skip."""
    from fastmae.ops.attention import NO_XFORMERS_KERNEL

    reason = ops.OPS["attention"].backend("xformers").available()
    if reason in ("xformers is not installed", NO_XFORMERS_KERNEL):
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("n,s,h,dh", [(4, 50, 12, 64), (2, 257, 16, 32)], ids=lambda v: str(v))
def test_gpu_fp32(backend: str, n: int, s: int, h: int, dh: int) -> None:
    qkv = _qkv(n, s, h, dh, device="cuda", seed=s)
    upstream = _upstream(n, s, h, dh, device="cuda")
    for got, want, name in zip(_run(backend, qkv, h, upstream), _run("reference", qkv, h, upstream),
                               ("forward", "d qkv")):
        assert_rel_close(got, want, 1e-5, name)


# --- xformers backend (CUDA only; absent xformers is a skip with its reason) ---------------------------------


def test_xformers_refuses_cpu_and_says_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    xformers_backend = ops.OPS["attention"].backend("xformers")
    cpu_qkv = torch.randn(1, 4, 3 * 2 * 32)
    assert "CUDA tensors only, got cpu" in xformers_backend.supports(cpu_qkv, 2)
    with pytest.raises(ops.BackendUnavailableError, match="xformers"):
        ops.attention(cpu_qkv, 2, backend="xformers")
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers.ops` fail as when absent
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    assert xformers_backend.available() == "xformers is not installed"


@pytest.mark.gpu
def test_xformers_supports_refuses_on_gpu() -> None:
    xformers_backend = ops.OPS["attention"].backend("xformers")
    assert xformers_backend.supports(torch.empty(2, 5, 3 * 2 * 64, device="cuda", dtype=torch.bfloat16), 2) is None
    assert "divisible by 8, got 20" in xformers_backend.supports(torch.empty(1, 5, 3 * 2 * 20, device="cuda"), 2)
    assert "float64" in xformers_backend.supports(torch.empty(1, 5, 3 * 64, device="cuda", dtype=torch.float64), 1)


@pytest.mark.gpu
@pytest.mark.parametrize("pad,in_place", [(8, True), (4, False)], ids=["aligned-rows", "misaligned-rows"])
def test_xformers_gpu_strided_qkv(monkeypatch: pytest.MonkeyPatch, pad: int, in_place: bool) -> None:
    """qkv as a row-padded view (stride(1) = 3*H*Dh + pad): read in place when the row stride keeps 16-byte
    alignment, copied once when it does not; numerics by the low-precision rule either way."""
    _skip_without_xformers()
    import xformers.ops as xops

    n, s, h, dh = 3, 50, 2, 64
    base = torch.cat([_qkv(n, s, h, dh, device="cuda", seed=5).detach(), torch.zeros(n, s, pad, device="cuda")],
                     dim=-1)  # (N, S, 3*H*Dh + pad)
    qkv32 = base[..., :3 * h * dh].requires_grad_()  # (N, S, 3*H*Dh) views
    low = base.to(torch.bfloat16)[..., :3 * h * dh].requires_grad_()
    assert low.stride(1) == 3 * h * dh + pad
    seen_query_ptrs = []
    original = xops.memory_efficient_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        seen_query_ptrs.append(q.data_ptr())
        return original(q, k, v)

    monkeypatch.setattr(xops, "memory_efficient_attention", spy)
    _assert_low_precision_rule("xformers", qkv32, low, h, _upstream(n, s, h, dh, device="cuda"))
    assert seen_query_ptrs and (seen_query_ptrs[0] == low.data_ptr()) == in_place
