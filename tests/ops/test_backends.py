"""Every backend of every op against the op's reference, on the cases its definition lists.

The cases, their gradients and the op's custom op come from the op's definition (``Op.cases``, ``Case.grad``,
``Op.kernel_op``), so a new op or backend is tested here without a line of test code. What each test checks:

- forward outputs and the listed gradients equal the reference's (fp32 on CPU: the triton backend under the
  Triton interpreter, the cuda backend through fastmae._C's CPU implementation);
- a kernel backend gives bit-identical results run to run;
- the custom op's fake (meta) outputs have the real outputs' shapes and dtypes;
- ``torch.library.opcheck`` passes on the custom op (schema, fake, autograd registration; on a GPU in bf16 too);
- on a GPU, bf16/fp16 results are within twice PyTorch's own low-precision error of the fp32 truth.
A backend that cannot run a case is skipped with its reason (e.g. fastmae._C not built).
"""

from __future__ import annotations

import pytest
import torch

from fastmae.ops import OPS
from fastmae.ops.dispatch import Case, Op
from numerics import rel_err

FP32_TOL = 2e-5  # relative (norm) error of fp32 kernels against the fp32 reference: summation order only
LOW_PRECISION_FLOOR = 2e-3  # added to 2x PyTorch's own low-precision error (where that error is ~0)

PARAMS = [pytest.param(op, backend.name, case, id=f"{op.name}-{backend.name}-{case.name}")
          for op in OPS.values() for backend in op.backends[:-1] for case in op.cases]
KERNEL_PARAMS = [p for p in PARAMS if p.values[1] in ("triton", "cuda") and p.values[0].kernel_op is not None]


def _args(op: Op, case: Case, device: str, dtype: torch.dtype) -> tuple:
    args = list(case.make(torch.device(device), dtype, case.batch))
    for name in case.grad:
        i = op.arg_names.index(name)
        args[i] = args[i].detach().requires_grad_(True)
    return tuple(args)


def _runnable_args(op: Op, backend: str, case: Case, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple:
    """The case's arguments, or a skip with the reason ``backend`` cannot run them."""
    args = _args(op, case, device, dtype)
    reason = op.backend(backend).why_not(args, op.arg_names)
    if reason is not None:
        pytest.skip(f"{backend} cannot run {op.name} on {device}: {reason}")
    return args


def _run(op: Op, backend: str, args: tuple, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The op's outputs and, for a cotangent drawn from ``seed`` on each float output, the listed gradients."""
    out = op(*args, backend=backend)
    outs = list(out) if isinstance(out, tuple) else [out]
    floats = [o for o in outs if o.is_floating_point() and o.requires_grad]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads: list[torch.Tensor | None] = []
    if floats and leaves:
        g = torch.Generator().manual_seed(seed)
        cotangents = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in floats]
        grads = list(torch.autograd.grad(floats, leaves, cotangents, allow_unused=True))
    return [o.detach() for o in outs], grads


def _compare(got: list, want: list, tol: float, what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} results, the reference gives {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"{what} #{i}: a gradient where the reference gives none"
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what} #{i}: {g.dtype} {tuple(g.shape)}, " \
                                                          f"the reference gives {w.dtype} {tuple(w.shape)}"
        if w.is_floating_point():
            both_nan = g.isnan() & w.isnan()
            assert torch.equal(g.isnan(), w.isnan()), f"{what} #{i}: NaN where the reference has none (or not)"
            err = rel_err(g.masked_fill(both_nan, 0), w.masked_fill(both_nan, 0))
            assert err <= tol, f"{what} #{i}: relative error {err:.2e} > {tol:.0e}"
        else:
            assert torch.equal(g, w), f"{what} #{i}: differs from the reference"


@pytest.mark.parametrize("op,backend,case", PARAMS)
def test_matches_reference_in_fp32(op: Op, backend: str, case: Case) -> None:
    args = _runnable_args(op, backend, case)
    out, grads = _run(op, backend, args)
    want_out, want_grads = _run(op, "reference", _args(op, case, "cpu", torch.float32))
    _compare(out, want_out, FP32_TOL, f"{op.name} {backend} {case.name} output")
    _compare(grads, want_grads, FP32_TOL, f"{op.name} {backend} {case.name} gradient")


@pytest.mark.parametrize("op,backend,case", KERNEL_PARAMS)
def test_kernels_are_deterministic_and_fakes_match(op: Op, backend: str, case: Case) -> None:
    args = _runnable_args(op, backend, case)
    first, second = _run(op, backend, args), _run(op, backend, args)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert a is None and b is None or torch.equal(a.nan_to_num(), b.nan_to_num()), "not bit-identical run to run"
    meta = tuple(a.detach().to("meta").requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)
    fake = op(*meta, backend=backend)
    fake = list(fake) if isinstance(fake, tuple) else [fake]
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in first[0]], "fake != real outputs"


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("op,backend,case", KERNEL_PARAMS)
def test_opcheck(op: Op, backend: str, case: Case, device: str, dtype: torch.dtype) -> None:
    args = _runnable_args(op, backend, case, device, dtype)
    if device == "cpu" and backend == "triton" and case is not op.cases[0]:
        pytest.skip("under the Triton interpreter opcheck runs the first case only (each check reruns the kernels)")
    torch.library.opcheck(op.kernel_op, (*args, backend))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op,backend,case", PARAMS)
def test_low_precision_on_gpu(op: Op, backend: str, case: Case, dtype: torch.dtype) -> None:
    """Error against the fp32 truth (the reference on the fp32 copy of the low-precision inputs) at most twice
    that of the reference run in ``dtype`` itself (PyTorch's own low-precision error), plus a small floor."""
    args = _runnable_args(op, backend, case, "cuda", dtype)
    truth_args = tuple(a.detach().float().requires_grad_(a.requires_grad)
                       if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    truth = _run(op, "reference", truth_args)
    torch_own = _run(op, "reference", _args(op, case, "cuda", dtype))
    got = _run(op, backend, args)
    for what, g_list, t_list, p_list in (("output", got[0], truth[0], torch_own[0]),
                                         ("gradient", got[1], truth[1], torch_own[1])):
        for i, (g, t, p) in enumerate(zip(g_list, t_list, p_list)):
            if t is None or not t.is_floating_point():
                continue
            own = rel_err(p.float(), t.float())
            err = rel_err(g.float(), t.float())
            assert err <= 2 * own + LOW_PRECISION_FLOOR, f"{what} #{i}: {err:.2e} > 2 x {own:.2e} + floor"
