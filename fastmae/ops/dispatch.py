"""Backend selection for every fastmae op.

Each op declares its backends in priority order (``reference`` always last). A backend knows
whether it can run on this machine at all (``available``) and whether it can run a given call
(``supports``: device, dtype, shapes); both answer ``None`` or the reason why not.

The backend for a call is chosen by, in order of precedence:

1. the op's ``backend=`` argument,
2. the innermost ``use_backend(...)`` context,
3. the ``FASTMAE_BACKEND`` environment variable (``triton``, ``attention=torch``, or both:
   ``triton,attention=torch``), read at each call (under ``torch.compile``: when tracing),
4. the op's priority list: the first backend that can run the call (while ``torch.compile`` traces, leaving out
   the backends marked ``auto_compiled=False``: kernels Inductor can neither see into nor fuse around, where a
   torch backend of the op lets it fuse).

A backend named in 1–3 that cannot run the call raises :class:`BackendUnavailableError` listing
every backend of the op with its reason -- never a silent fallback. A blanket name from 2 or 3
(``use_backend("triton")``) applies to the ops that have such a backend; the others use their
priority list, and a blanket name that no op has is an error. An op-specific name
(``use_backend(attention="xformers")``, or ``backend=``) must exist for that op.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

BACKEND_NAMES = ("reference", "torch", "triton", "cuda", "xformers", "apex", "triton-gemm")
ENV_VAR = "FASTMAE_BACKEND"
_ALL_OPS = "*"


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for by name cannot run this call."""


def _always(*args: Any, **kwargs: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    What it can run is data, checked the same way for every op and backend (:meth:`why_not` lists every
    reason at once): ``available()``, whether it can run on this machine at all (asked once); ``devices``, the
    device types its tensors may be on (all on one); ``dtypes``, the dtypes of its floating-point tensors;
    ``no_grad``, the arguments it gives no gradient for (refused when one requires grad); ``supports(*args)``,
    the op's own limits for one call (shapes), ``None`` or a reason. ``None`` in a field: no such rule.

    ``auto_devices`` limits the devices on which the priority list may pick it (``None``: any); on others it
    runs only when named (the Triton backends run on CPU only in the interpreter, a test tool).
    ``auto_when(*args)``, when given, limits the priority list's picks further to the calls where this
    backend measured faster than the next; named, it runs every call it supports.
    ``auto_compiled=False``: the priority list passes it over while ``torch.compile`` traces the call (apex's
    LayerNorm: an extension call that is one opaque node, where ``torch``'s lets Inductor fuse the residual add
    and the cast into the norm); named, it runs under compile too.
    """

    name: str
    fn: Callable[..., Any]
    available: Callable[[], str | None] = _always
    supports: Callable[..., str | None] = _always
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    no_grad: tuple[str, ...] = ()
    auto_devices: tuple[str, ...] | None = None
    auto_when: Callable[..., bool] | None = None
    auto_compiled: bool = True
    key: str = field(init=False, repr=False, compare=False)  # unique per instance: the availability cache's key

    def __post_init__(self) -> None:
        if self.name not in BACKEND_NAMES:
            raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {self.name!r}")
        object.__setattr__(self, "key", f"{self.name}#{next(_SERIALS)}")
        _BACKENDS[self.key] = self

    def why_not(self, args: tuple[Any, ...], arg_names: tuple[str, ...] = ()) -> str | None:
        """``None`` when this backend can run ``op(*args)``, else every reason it cannot, joined by "; "."""
        reason = _cached_availability(self.key)
        if reason is not None:
            return reason
        named = [(arg_names[i] if i < len(arg_names) else f"argument {i}", a) for i, a in enumerate(args)]
        tensors = [(n, t) for n, t in named if isinstance(t, torch.Tensor)]
        devices = [(n, t.device) for n, t in tensors] + [(n, d) for n, d in named if isinstance(d, torch.device)]
        reasons = []
        if self.devices is not None:
            wrong = [f"{n} on {d.type}" for n, d in devices if d.type not in self.devices]
            if wrong:
                note = DEVICE_NOTES.get(self.name, "")
                reasons.append(f"{self.name} takes {'/'.join(self.devices)} tensors{note}, got {', '.join(wrong)}")
        if len({d for _, d in devices}) > 1:
            reasons.append("tensors on several devices: " + ", ".join(f"{n} on {d}" for n, d in devices))
        if self.dtypes is not None:
            wrong = [f"{n} {t.dtype}" for n, t in tensors if t.is_floating_point() and t.dtype not in self.dtypes]
            if wrong:
                allowed = "/".join(_SHORT_DTYPE_NAMES.get(d, str(d).removeprefix("torch.")) for d in self.dtypes)
                reasons.append(f"{self.name} takes {allowed}, got {', '.join(wrong)}")
        if torch.is_grad_enabled():
            needs = [n for n, t in tensors if n in self.no_grad and t.requires_grad]
            if needs:
                reasons.append(f"{self.name} gives no gradient for {', '.join(needs)} (requires_grad is set)")
        if not reasons:  # the op's own limits assume tensors it can take
            reason = self.supports(*args)
            if reason is not None:
                reasons.append(reason)
        return "; ".join(reasons) or None


_SHORT_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_INTERPRETER_NOTE = " (cpu ones only under the Triton interpreter, TRITON_INTERPRET=1)"
DEVICE_NOTES = {"triton": _INTERPRETER_NOTE, "triton-gemm": _INTERPRETER_NOTE}


_SERIALS = itertools.count()
_BACKENDS: dict[str, Backend] = {}
_AVAILABILITY: dict[str, str | None] = {}


@torch.compiler.assume_constant_result  # asked once, eagerly, even while torch.compile traces
def _cached_availability(key: str) -> str | None:
    """``Backend.available()`` of the backend registered under ``key``, asked once. It takes a string, not
    the Backend: torch.compile (torch 2.11) cannot pass a frozen dataclass to a constant-result function."""
    if key not in _AVAILABILITY:
        _AVAILABILITY[key] = _BACKENDS[key].available()
    return _AVAILABILITY[key]


@dataclass(frozen=True)
class Case:
    """One call of an op, for the generic tests and microbenchmarks (``tests/ops/test_backends.py``,
    ``bench/test_bench_ops.py``): ``make(device, dtype, batch)`` builds its arguments, the same ones every time
    (``dtype`` for its floating-point data; fixed tables and parameters may stay fp32 as in the model);
    ``grad`` names the arguments whose gradients are compared."""

    name: str
    make: Callable[[torch.device, torch.dtype, int], tuple[Any, ...]]
    batch: int = 2
    grad: tuple[str, ...] = ()


@dataclass
class Op:
    """An op: its backends in priority order (``reference`` last, the spec), and for the generic tests and
    benchmarks its ``cases`` (small MAE and odd shapes), its ``benchmark`` case (ViT-B/16 MAE shapes; the batch
    is the benchmark's; timed forward + backward when it lists gradients), ``min_bytes(*args)`` (what any
    implementation must read and write), ``matmul_flops(*args)`` (for ops with matmuls) and ``kernel_op`` (the
    ``fastmae::<name>`` custom op taking the op's arguments plus ``backend``, when it has one). Registers itself
    in :data:`OPS`."""

    name: str
    backends: list[Backend] = field(default_factory=list)
    arg_names: tuple[str, ...] = ()  # the op's arguments, named in the reasons a backend cannot run a call
    cases: tuple[Case, ...] = ()
    benchmark: Case | None = None
    min_bytes: Callable[..., int] | None = None
    matmul_flops: Callable[..., int] | None = None
    kernel_op: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        names = [b.name for b in self.backends]
        if not names or names[-1] != "reference":
            raise ValueError(f"op {self.name!r}: the backend list must end with 'reference', got {names}")
        if not self.arg_names:
            self.arg_names = tuple(inspect.signature(self.backends[-1].fn).parameters)  # the reference's
        OPS[self.name] = self

    def backend(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)

    def select(self, args: tuple[Any, ...], backend: str | None = None) -> Backend:
        """The backend that runs ``self(*args)`` under the precedence rules above."""
        requested, source = self._requested(backend)
        if requested is not None:
            chosen = self.backend(requested)
            if chosen is None:
                raise BackendUnavailableError(
                    f"{self.name}: no backend named {requested!r} ({source}); this op has:\n" + self.explain(args)
                )
            reason = chosen.why_not(args, self.arg_names)
            if reason is not None:
                raise BackendUnavailableError(
                    f"{self.name}: backend {requested!r} ({source}) cannot run this call: {reason}\n"
                    + self.explain(args)
                )
            return chosen
        device = next((a.device.type if isinstance(a, torch.Tensor) else a.type for a in args
                       if isinstance(a, torch.Tensor | torch.device)), None)
        compiling = torch.compiler.is_compiling()
        for candidate in self.backends:
            if candidate.auto_devices is not None and device not in candidate.auto_devices:
                continue
            if compiling and not candidate.auto_compiled:
                continue
            if candidate.why_not(args, self.arg_names) is None and (
                    candidate.auto_when is None or candidate.auto_when(*args)):
                return candidate
        raise BackendUnavailableError(f"{self.name}: no backend can run this call\n" + self.explain(args))

    def _requested(self, argument: str | None) -> tuple[str | None, str]:
        """(backend name or None, where it came from) for one call."""
        if argument is not None:
            return _check_name(argument, f"{self.name}(backend=...)"), "backend= argument"
        sources = []
        if _context_stack:
            sources.append((_context_stack[-1], "use_backend"))
        spec = os.environ.get(ENV_VAR, "")
        if spec:
            sources.append((parse_backend_spec(spec), ENV_VAR))
        for choice, where in sources:
            if self.name in choice:
                return choice[self.name], f"{where}: {self.name}={choice[self.name]}"
            blanket = choice.get(_ALL_OPS)
            if blanket is not None and self.backend(blanket) is not None:
                return blanket, f"{where}: {blanket}"
        return None, "priority"

    def explain(self, args: tuple[Any, ...]) -> str:
        """One line per backend: ``name: ok`` or ``name: <reason>``."""
        lines = []
        for b in self.backends:
            reason = b.why_not(args, self.arg_names)
            lines.append(f"  {b.name}: {'ok' if reason is None else reason}")
        return "\n".join(lines)

    def __call__(self, *args: Any, backend: str | None = None) -> Any:
        return self.select(args, backend).fn(*args)


OPS: dict[str, Op] = {}
_context_stack: list[dict[str, str]] = []


def _check_name(name: str, where: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    return name


def _check_blanket(name: str, where: str) -> str:
    if not any(op.backend(name) for op in OPS.values()):
        raise ValueError(f"{where}: no op has a {name!r} backend (yet); backends by op:\n"
                         + "\n".join(f"  {op.name}: {[b.name for b in op.backends]}" for op in OPS.values()))
    return name


def parse_backend_spec(spec: str, where: str = ENV_VAR) -> dict[str, str]:
    """``"triton,attention=torch"`` -> ``{"*": "triton", "attention": "torch"}``."""
    choice: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        op, sep, name = item.partition("=")
        if not sep:
            op, name = _ALL_OPS, item
        op, name = op.strip(), _check_name(name.strip(), where)
        if op == _ALL_OPS:
            _check_blanket(name, where)
        elif op not in OPS:
            raise ValueError(f"{where}: unknown op {op!r}; expected one of {sorted(OPS)}")
        choice[op] = name
    return choice


@contextlib.contextmanager
def use_backend(name: str | None = None, **per_op: str) -> Iterator[None]:
    """Choose backends inside a ``with`` block.

    ``use_backend("triton")`` asks every op that has a ``triton`` backend to use it;
    ``use_backend(attention="torch")`` names one op's backend; both may be combined. A blanket name
    replaces the enclosing context's choices; op-specific names are added to them.
    """
    choice: dict[str, str] = {} if name is not None else dict(_context_stack[-1] if _context_stack else {})
    if name is not None:
        choice[_ALL_OPS] = _check_blanket(_check_name(name, "use_backend"), "use_backend")
    for op, backend in per_op.items():
        if op not in OPS:
            raise ValueError(f"use_backend: unknown op {op!r}; expected one of {sorted(OPS)}")
        choice[op] = _check_name(backend, f"use_backend({op}=...)")
    _context_stack.append(choice)
    try:
        yield
    finally:
        _context_stack.pop()


def backend_table() -> list[tuple[str, str, str | None, tuple[str, ...] | None, str | None]]:
    """``(op, backend, None or why not, auto_devices, auto_when's summary or None)`` for every op and backend
    on this machine; the summary is the first line of ``auto_when``'s docstring."""
    return [(op.name, b.name, _cached_availability(b.key), b.auto_devices,
             None if b.auto_when is None else (b.auto_when.__doc__ or b.auto_when.__name__).strip().splitlines()[0])
            for op in OPS.values() for b in op.backends]
