"""apex when it imports, torch otherwise: the optimizer (fastmae.train.optim) and the layer_norm ``apex`` backend.

Without apex (hidden here even where it is installed) the fallbacks are checked; with it, the selection is
checked against a small fake ``apex`` package that records what is built and called. Real apex runs on a GPU
only, skipped with the reason when apex is not installed.
"""

from __future__ import annotations

import copy
import importlib.abc
import sys
import types
from collections.abc import Iterator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmae import ops
from fastmae.ops import dispatch
from fastmae.train import optim
from numerics import assert_rel_close

APEX_MODULES = ("apex", "amp_C", "fused_layer_norm_cuda")  # the package and its two CUDA extensions
REAL_APEX_WHY_NOT = optim._apex_fused_adam_why_not()  # None where NVIDIA apex is installed with its extensions


class _Hide(importlib.abc.MetaPathFinder):
    """Makes ``import <name>`` (and its submodules) fail as if the package were not installed."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)


def _forget_apex(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop imported apex modules (restored after the test) and the cached backend availability."""
    for name in list(sys.modules):
        if name.split(".")[0] in APEX_MODULES:
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(dispatch, "_AVAILABILITY", {})


@pytest.fixture
def no_apex(monkeypatch: pytest.MonkeyPatch) -> None:
    _forget_apex(monkeypatch)
    monkeypatch.setattr(sys, "meta_path", [_Hide(APEX_MODULES), *sys.meta_path])


class FakeApex:
    """The parts of NVIDIA apex that fastmae uses, recording their use."""

    def __init__(self) -> None:
        self.optimizers: list[torch.optim.Optimizer] = []
        self.layer_norm_calls: list[tuple] = []
        fake = self

        class FusedAdam(torch.optim.Optimizer):
            """apex's constructor signature and its argument-less zero_grad."""

            def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,  # noqa: ANN001
                         adam_w_mode=True, weight_decay=0.0, amsgrad=False, set_grad_none=True,
                         capturable=False, master_weights=False) -> None:
                super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                              weight_decay=weight_decay))
                self.adam_w_mode = 1 if adam_w_mode else 0
                fake.optimizers.append(self)

            def zero_grad(self) -> None:
                raise AssertionError("apex's own zero_grad takes no set_to_none; fastmae must not call it")

            @torch.no_grad()
            def step(self) -> None:
                """AdamW as apex's FusedAdam (adam_w_mode) updates, its state as apex keeps it: one step count
                per group (``group["step"]``, counted before the update) and fp32 moments per parameter."""
                for group in self.param_groups:
                    group["step"] = group.get("step", 0) + 1
                    beta1, beta2 = group["betas"]
                    fix1, fix2 = (1 - beta1 ** group["step"], 1 - beta2 ** group["step"]) \
                        if group["bias_correction"] else (1.0, 1.0)
                    for p in group["params"]:
                        if p.grad is None:
                            continue
                        state = self.state[p]
                        if not state:
                            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                        m, v = state["exp_avg"], state["exp_avg_sq"]
                        m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                        update = (m / fix1) / ((v / fix2).sqrt() + group["eps"]) + group["weight_decay"] * p
                        p.sub_(group["lr"] * update)

        def fused_layer_norm_affine(x, weight, bias, normalized_shape, eps=1e-6,  # noqa: ANN001, ANN202
                                    memory_efficient=False):
            fake.layer_norm_calls.append((x, weight, bias, tuple(normalized_shape), eps))
            return F.layer_norm(x, normalized_shape, weight, bias, eps)

        self.FusedAdam = FusedAdam
        self.modules = {
            "apex": types.ModuleType("apex"),
            "apex.optimizers": types.ModuleType("apex.optimizers"),
            "apex.normalization": types.ModuleType("apex.normalization"),
            "apex.normalization.fused_layer_norm": types.ModuleType("apex.normalization.fused_layer_norm"),
            "amp_C": types.ModuleType("amp_C"),
            "fused_layer_norm_cuda": types.ModuleType("fused_layer_norm_cuda"),
        }
        self.modules["apex.optimizers"].FusedAdam = FusedAdam
        self.modules["apex.normalization.fused_layer_norm"].fused_layer_norm_affine = fused_layer_norm_affine
        self.modules["apex"].optimizers = self.modules["apex.optimizers"]
        self.modules["apex"].normalization = self.modules["apex.normalization"]
        self.modules["apex.normalization"].fused_layer_norm = self.modules["apex.normalization.fused_layer_norm"]


@pytest.fixture
def fake_apex(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApex]:
    _forget_apex(monkeypatch)
    fake = FakeApex()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield fake


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


# --- optimizer ------------------------------------------------------------------------------------------------

def test_without_apex_cpu_uses_foreach_adamw(no_apex: None) -> None:
    choice = optim.choose_optimizer(torch.device("cpu"))
    assert choice.name == optim.TORCH_FOREACH_ADAMW and "cpu" in choice.reason
    opt = optim.build_optimizer(_model(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 1e-3


def test_without_apex_cuda_chooses_fused_adamw(no_apex: None, monkeypatch: pytest.MonkeyPatch) -> None:
    choice = optim.choose_optimizer(torch.device("cuda"))
    assert choice.name == optim.TORCH_FUSED_ADAMW
    assert "apex is not installed" in choice.reason and str(choice).startswith(optim.TORCH_FUSED_ADAMW)
    # what build_optimizer builds for that choice (fused AdamW also takes CPU parameters, torch >= 2.4)
    monkeypatch.setattr(optim, "choose_optimizer", lambda device: choice)
    opt = optim.build_optimizer(_model(), lr=1e-3)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True and not opt.defaults["foreach"]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    """Fixed gradients per step number, so two optimizers can continue the same run."""
    for step in steps:
        g = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(p.device)
        opt.step()


def _torch_adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(optim.param_groups(model, 0.05), lr=1e-2, betas=(0.9, 0.95), foreach=True)


def _apex_adamw(fake: FakeApex, model: nn.Module) -> torch.optim.Optimizer:
    return fake.FusedAdam(optim.param_groups(model, 0.05), lr=1e-2, betas=(0.9, 0.95), adam_w_mode=True)


@pytest.mark.parametrize("first", ["torch", "apex"])
def test_checkpoint_resumes_with_the_other_adamw(fake_apex: FakeApex, first: str) -> None:
    """Three steps with one AdamW, its state_dict adapted for the other, two more steps with that: the same
    weights as five steps with the first (apex keeps one step count per group, torch one per parameter)."""
    build = {"torch": _torch_adamw, "apex": lambda model: _apex_adamw(fake_apex, model)}
    second = "apex" if first == "torch" else "torch"
    torch.manual_seed(0)
    straight = _model()
    resumed = copy.deepcopy(straight)
    opt = build[first](straight)
    _train(straight, opt, range(3))
    saved = copy.deepcopy(opt.state_dict())
    _train(straight, opt, range(3, 5))
    _train(resumed, build[first](resumed), range(3))  # the same three steps: the checkpoint's weights
    other = build[second](resumed)
    adapted = optim.adapt_optimizer_state(saved, other)
    assert adapted is not saved and optim._apex_form(adapted["param_groups"]) == (second == "apex")
    other.load_state_dict(adapted)
    _train(resumed, other, range(3, 5))
    for got, want in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    fresh = build[second](_model())
    for group in fresh.param_groups:
        group.update(lr=123.0, betas=(0.5, 0.5), eps=1.0)
    recipe = [(g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"]) for g in saved["param_groups"]]
    assert [(g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"])
            for g in optim.adapt_optimizer_state(saved, fresh)["param_groups"]] == recipe  # the checkpoint's
    same = optim.adapt_optimizer_state(saved, build[first](_model()))  # same kind: the state as it is
    assert same["state"] is saved["state"] and same["param_groups"] == saved["param_groups"]


def test_a_cpu_checkpoint_resumes_with_the_fused_adamw() -> None:
    """A foreach AdamW's checkpoint (a CPU run) loaded into the fused AdamW chosen on CUDA keeps fused: the
    non-finite guard's on-device skip (found_inf) needs it, the checkpoint's foreach must not come back."""
    from fastmae.train.nonfinite import optimizer_step

    model = _model()
    cpu_run = _torch_adamw(model)
    _train(model, cpu_run, range(2))
    fused = torch.optim.AdamW(optim.param_groups(model, 0.05), lr=1e-2, betas=(0.9, 0.95), fused=True)
    fused.load_state_dict(optim.adapt_optimizer_state(cpu_run.state_dict(), fused))
    assert all(g["fused"] is True and not g["foreach"] for g in fused.param_groups)
    assert [g["lr"] for g in fused.param_groups] == [g["lr"] for g in cpu_run.param_groups]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer_step(fused, scaler, torch.ones((), dtype=torch.bool))  # skipped on the device
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    optimizer_step(fused, scaler, torch.zeros((), dtype=torch.bool))
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_adapting_refuses_what_does_not_fit(fake_apex: FakeApex) -> None:
    model = _model()
    torch_opt = _torch_adamw(model)
    _train(model, torch_opt, range(2))
    saved = torch_opt.state_dict()
    one_group = fake_apex.FusedAdam(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="2 parameter groups, this run's 1"):
        optim.adapt_optimizer_state(saved, one_group)
    saved["state"][0]["step"] = torch.tensor(7.0)  # one parameter of group 0 counted differently
    with pytest.raises(ValueError, match=r"different step counts \[2.0, 7.0\]"):
        optim.adapt_optimizer_state(saved, _apex_adamw(fake_apex, model))


def test_apex_without_its_cuda_extension_is_not_used(fake_apex: FakeApex, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "meta_path", [_Hide(("amp_C",)), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "amp_C")
    choice = optim.choose_optimizer(torch.device("cuda"))
    assert choice.name == optim.TORCH_FUSED_ADAMW and "amp_C" in choice.reason


def test_with_apex_cuda_chooses_fused_adam(fake_apex: FakeApex) -> None:
    choice = optim.choose_optimizer(torch.device("cuda"))
    assert choice.name == optim.APEX_FUSED_ADAM and "apex" in choice.reason
    assert optim.choose_optimizer(torch.device("cpu")).name == optim.TORCH_FOREACH_ADAMW  # apex is CUDA-only
    optim.build_optimizer(_model(), lr=1e-3)  # CPU parameters: torch's AdamW, apex untouched
    assert fake_apex.optimizers == []


def test_with_apex_builds_fused_adam_in_adamw_mode(fake_apex: FakeApex, monkeypatch: pytest.MonkeyPatch) -> None:
    """The apex choice (made for CUDA parameters) builds FusedAdam with the same groups, lr and betas."""
    monkeypatch.setattr(optim, "choose_optimizer", lambda device: optim.OptimizerChoice(optim.APEX_FUSED_ADAM, "test"))
    model = _model()
    opt = optim.build_optimizer(model, lr=2e-3, weight_decay=0.05, betas=(0.9, 0.95))
    assert fake_apex.optimizers == [opt] and isinstance(opt, fake_apex.FusedAdam)
    assert opt.adam_w_mode == 1
    assert opt.defaults["lr"] == 2e-3 and opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    want = optim.param_groups(model, 0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in want]
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in g["params"]] for g in want]
    model(torch.randn(2, 8)).sum().backward()
    opt.zero_grad(set_to_none=True)  # torch's signature, as the training loops call it
    assert all(p.grad is None for p in model.parameters())


# --- layer_norm -----------------------------------------------------------------------------------------------

def _ln_args(residual: bool, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 64, generator=g).to(device, dtype).requires_grad_()
    r = torch.randn(3, 50, 64, generator=g).to(device, dtype).requires_grad_() if residual else None
    w = (1 + 0.1 * torch.randn(64, generator=g)).to(device, dtype).requires_grad_()
    b = (0.1 * torch.randn(64, generator=g)).to(device, dtype).requires_grad_()
    return x, w, b, 1e-6, r


def test_layer_norm_apex_first_then_torch() -> None:
    op = ops.OPS["layer_norm"]
    assert [b.name for b in op.backends] == ["apex", "torch", "triton", "reference"]
    assert op.backend("apex").auto_devices == ("cuda",)


def test_layer_norm_without_apex(no_apex: None) -> None:
    args = _ln_args(True)
    assert ops.OPS["layer_norm"].backend("apex").why_not(args) == "apex is not installed"
    with pytest.raises(ops.BackendUnavailableError, match="apex is not installed"):
        ops.layer_norm(*args, backend="apex")


def test_layer_norm_with_apex_refuses_what_it_cannot_run(fake_apex: FakeApex) -> None:
    apex_backend = ops.OPS["layer_norm"].backend("apex")
    args = _ln_args(True)
    assert "CUDA tensors only" in apex_backend.why_not(args)
    x, w, b, eps, r = args
    mixed = (x.detach().bfloat16(), w, b, eps, None)  # bf16 input, fp32 parameters: apex needs one dtype
    assert "weight and bias in the normalised tensor's dtype" in apex_backend.why_not(mixed)
    assert ops.OPS["layer_norm"].select(args).name == "torch"  # CPU tensors: not apex by priority


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_apex_backend_calls_fused_layer_norm_affine(fake_apex: FakeApex, residual: bool) -> None:
    """The backend's function (run here on CPU tensors through the fake): residual added first, apex's
    functional form called on the sum with (D,) and eps, the op's outputs returned."""
    x, w, b, eps, r = _ln_args(residual)
    got = ops.OPS["layer_norm"].backend("apex").fn(x, w, b, eps, r)
    want = ops.layer_norm(x, w, b, eps, r, backend="reference")
    ((total, weight, bias, shape, called_eps),) = fake_apex.layer_norm_calls
    assert weight is w and bias is b and shape == (64,) and called_eps == eps
    assert torch.equal(total, x + r if residual else x)
    for g, e in zip(got if residual else [got], want if residual else [want]):
        assert_rel_close(g, e, 1e-6, "apex backend")


# --- real apex, on a GPU ----------------------------------------------------------------------------------------

needs_apex = pytest.mark.skipif(REAL_APEX_WHY_NOT is not None, reason=REAL_APEX_WHY_NOT or "")


@pytest.mark.gpu
@needs_apex
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_real_apex_layer_norm_matches_reference(dtype: torch.dtype, residual: bool) -> None:
    args = _ln_args(residual, dtype, "cuda")
    assert ops.OPS["layer_norm"].backend("apex").why_not(args) is None
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the backend keeps the op's dtypes under autocast
        got = ops.layer_norm(*args, backend="apex")
    want = ops.layer_norm(*args, backend="reference")
    inputs = [t for t in (args[0], args[1], args[2], args[4]) if t is not None]
    outs_got, outs_want = (list(got), list(want)) if residual else ([got], [want])
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    for g, e in zip(outs_got, outs_want):
        assert g.dtype == e.dtype == dtype
        assert_rel_close(g, e, tol, "forward")
    upstream = [torch.randn_like(o) for o in outs_want]
    for g, e in zip(torch.autograd.grad(outs_got, inputs, upstream), torch.autograd.grad(outs_want, inputs, upstream)):
        assert_rel_close(g, e, 1e-4 if dtype == torch.float32 else 2.0**-6, "gradient")


@pytest.mark.gpu
@needs_apex
def test_real_apex_fused_adam_steps_as_torch_adamw() -> None:
    torch.manual_seed(0)
    model = _model().cuda()
    twin = _model().cuda()
    twin.load_state_dict(model.state_dict())
    opt = optim.build_optimizer(model, lr=1e-2)
    assert type(opt).__mro__[1].__module__.startswith("apex.optimizers")
    ref = torch.optim.AdamW(optim.param_groups(twin, 0.05), lr=1e-2, betas=(0.9, 0.95))
    x = torch.randn(4, 8, device="cuda")
    for _ in range(3):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad(set_to_none=True)
            m(x).square().sum().backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_rel_close(p, q, 1e-5, "parameters after 3 steps")


@pytest.mark.gpu
@needs_apex
@pytest.mark.parametrize("first", ["torch", "apex"])
def test_real_apex_and_torch_adamw_resume_each_other(first: str) -> None:
    """As test_checkpoint_resumes_with_the_other_adamw, with apex's real FusedAdam on CUDA."""
    def build(kind: str, model: nn.Module) -> torch.optim.Optimizer:
        if kind == "apex":
            return optim.build_optimizer(model, lr=1e-2)
        return torch.optim.AdamW(optim.param_groups(model, 0.05), lr=1e-2, betas=(0.9, 0.95), fused=True)

    torch.manual_seed(0)
    straight = _model().cuda()
    resumed = copy.deepcopy(straight)
    opt = build(first, straight)
    _train(straight, opt, range(3))
    saved = copy.deepcopy(opt.state_dict())
    _train(straight, opt, range(3, 5))
    _train(resumed, build(first, resumed), range(3))
    other = build("apex" if first == "torch" else "torch", resumed)
    other.load_state_dict(optim.adapt_optimizer_state(saved, other))
    _train(resumed, other, range(3, 5))
    for got, want in zip(resumed.parameters(), straight.parameters()):
        assert_rel_close(got, want, 1e-5, "parameters after resuming with the other AdamW")
