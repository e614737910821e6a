"""Backend selection: argument > use_backend > FASTMAE_BACKEND > priority; named backends never fall back."""

import pytest
import torch

from fastmae import ops
from fastmae.ops import dispatch
from fastmae.ops.dispatch import OPS, Backend, BackendUnavailableError, Op, parse_backend_spec, use_backend


@pytest.fixture
def toy_op():
    """An op with a torch backend that refuses float64, a triton backend unavailable here, and a reference."""
    calls: list[str] = []

    def make(name):  # noqa: ANN001, ANN202
        def fn(x):  # noqa: ANN001, ANN202
            calls.append(name)
            return x

        return fn

    op = Op("toy_op", [
        Backend("triton", make("triton"), available=lambda: "no GPU in this test"),
        Backend("torch", make("torch"), supports=lambda x: "no float64" if x.dtype == torch.float64 else None),
        Backend("reference", make("reference")),
    ])
    other = Op("other_op", [Backend("xformers", make("xformers")), Backend("reference", make("reference"))])
    yield op, calls
    del OPS["toy_op"], OPS[other.name]


def test_priority_skips_what_cannot_run(toy_op) -> None:  # noqa: ANN001
    op, calls = toy_op
    op(torch.ones(1))
    op(torch.ones(1, dtype=torch.float64))
    assert calls == ["torch", "reference"]


def test_auto_devices_limit_the_priority_list_not_a_named_choice() -> None:
    calls = []
    op = Op("cuda_first", [Backend("triton", lambda x: calls.append("triton"), auto_devices=("cuda",)),
                           Backend("reference", lambda x: calls.append("reference"))])
    try:
        op(torch.ones(1))
        op(torch.ones(1), backend="triton")
        assert calls == ["reference", "triton"]
    finally:
        del OPS["cuda_first"]


def test_auto_when_limits_the_priority_list_not_a_named_choice() -> None:
    calls = []
    op = Op("short_first", [Backend("triton", lambda x: calls.append("triton"), auto_when=lambda x: x.numel() <= 4),
                            Backend("reference", lambda x: calls.append("reference"))])
    try:
        op(torch.ones(4))
        op(torch.ones(5))
        op(torch.ones(5), backend="triton")
        assert calls == ["triton", "reference", "triton"]
    finally:
        del OPS["short_first"]


def test_auto_compiled_false_is_passed_over_while_torch_compile_traces() -> None:
    """An opaque kernel (apex's LayerNorm) runs eagerly, but a compiled graph gets the fusable backend instead,
    unless the kernel is named."""
    op = Op("opaque_first", [Backend("apex", lambda x: x * 3, auto_compiled=False),
                             Backend("reference", lambda x: x * 2)])
    try:
        x = torch.ones(2)
        assert torch.equal(op(x), x * 3)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(lambda t: op(t), backend="eager", fullgraph=True)(x), x * 2)
        torch._dynamo.reset()
        named = torch.compile(lambda t: op(t, backend="apex"), backend="eager", fullgraph=True)
        assert torch.equal(named(x), x * 3)
    finally:
        del OPS["opaque_first"]
        torch._dynamo.reset()
    assert not OPS["layer_norm"].backend("apex").auto_compiled  # the real op's opaque backend is marked


def test_precedence_argument_context_env(toy_op, monkeypatch) -> None:  # noqa: ANN001
    op, calls = toy_op
    monkeypatch.setenv("FASTMAE_BACKEND", "toy_op=reference")
    op(torch.ones(1))
    with use_backend(toy_op="torch"):
        op(torch.ones(1))
        op(torch.ones(1), backend="reference")
        with use_backend("reference"):  # a blanket name replaces the outer op-specific choice
            op(torch.ones(1))
    assert calls == ["reference", "torch", "reference", "reference"]


def test_named_backend_that_cannot_run_lists_every_reason(toy_op) -> None:  # noqa: ANN001
    op, _ = toy_op
    with pytest.raises(BackendUnavailableError) as err:
        op(torch.ones(1, dtype=torch.float64), backend="torch")
    text = str(err.value)
    assert "backend 'torch' (backend= argument) cannot run this call: no float64" in text
    assert "triton: no GPU in this test" in text and "reference: ok" in text
    with pytest.raises(BackendUnavailableError, match="no GPU in this test"):
        with use_backend("triton"):
            op(torch.ones(1))


def test_blanket_name_applies_only_to_ops_that_have_it(toy_op, monkeypatch) -> None:  # noqa: ANN001
    op, calls = toy_op
    with use_backend("xformers"):  # toy_op has no xformers backend (other_op has): its priority list decides
        op(torch.ones(1))
    monkeypatch.setenv("FASTMAE_BACKEND", "xformers,toy_op=reference")
    op(torch.ones(1))
    assert calls == ["torch", "reference"]
    with pytest.raises(BackendUnavailableError, match="no backend named 'cuda'.*\n.*triton: no GPU in this test"):
        op(torch.ones(1), backend="cuda")
    monkeypatch.setattr(dispatch, "BACKEND_NAMES", (*dispatch.BACKEND_NAMES, "nobody"))  # valid, but no op has it
    with pytest.raises(ValueError, match="no op has a 'nobody' backend"):
        with use_backend("nobody"):
            pass
    monkeypatch.setenv("FASTMAE_BACKEND", "nobody")
    with pytest.raises(ValueError, match="FASTMAE_BACKEND: no op has a 'nobody' backend"):
        op(torch.ones(1))


def test_unknown_names_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown backend 'tirton'"):
        with use_backend("tirton"):
            pass
    with pytest.raises(ValueError, match="unknown op 'atention'"):
        with use_backend(atention="torch"):
            pass
    with pytest.raises(ValueError, match="unknown backend"):
        parse_backend_spec("attention=fast")
    assert parse_backend_spec("torch, attention=reference") == {"*": "torch", "attention": "reference"}


def test_real_ops_respect_the_choice(monkeypatch) -> None:
    qkv = torch.randn(2, 5, 48)
    assert ops.OPS["attention"].select((qkv, 2)).name == "torch"
    with use_backend("reference"):
        assert ops.OPS["attention"].select((qkv, 2)).name == "reference"
        assert ops.OPS["masked_mse"].select(()).name == "reference"
    monkeypatch.setenv("FASTMAE_BACKEND", "attention=reference")
    assert ops.OPS["attention"].select((qkv, 2)).name == "reference"
    with pytest.raises(BackendUnavailableError, match="torch"):
        ops.attention(qkv.double(), 2, backend="torch")


def test_every_op_ends_with_reference() -> None:
    assert set(OPS) >= {"random_masking", "patch_embed_visible", "unshuffle", "masked_mse", "attention", "layer_norm",
                        "linear_gelu"}
    with pytest.raises(ValueError, match="must end with 'reference'"):
        Op("bad_op", [Backend("torch", lambda x: x)])
