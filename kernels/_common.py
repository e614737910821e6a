"""What every Triton backend shares: when it can run, and which tensors it takes.

The kernels run on CUDA tensors, on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``,
set before the kernels are defined; tests only), and on ``meta`` tensors for tracing
(``torch.export``), where ``triton_op`` runs no kernel. Loads are cast to fp32 and results cast back,
so bf16, fp16 and fp32 inputs all accumulate in fp32 (the interpreter has no bf16 arithmetic).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` ("cuda" or "cpu"; False for any other, e.g. "meta"). Not
    through ``torch.amp.is_autocast_available``, which torch 2.11's dynamo cannot trace."""
    return device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type)


def wrap_triton(kernel: Callable) -> Callable:
    """``torch.library.wrap_triton(kernel)`` for launching ``kernel`` inside a ``triton_op``; under the
    interpreter, where ``@triton.jit`` gives an ``InterpretedFunction`` (not a ``JITFunction``), the kernel
    itself: torch 2.14 does that too, older torch (2.11 seen) raises instead. Nothing is traced there."""
    from triton.runtime.jit import JITFunction

    if interpreter_on() and not isinstance(kernel, JITFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


def triton_available() -> str | None:
    """None when Triton is importable; the machine-level reason otherwise."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def kernel_module_available(op: str) -> Callable[[], str | None]:
    """The ``available`` check of an op's triton backend: Triton importable and ``fastmae.kernels.<op>``
    imported (which registers its ``fastmae_triton`` ops)."""

    def available() -> str | None:
        reason = triton_available()
        if reason is not None:
            return reason
        try:
            importlib.import_module(f"fastmae.kernels.{op}")
        except ImportError as exc:
            return f"fastmae.kernels.{op} does not import: {exc}"
        return None

    return available


def device_why_not(device: torch.device) -> str | None:
    """None when the kernels can run on ``device`` (cuda; cpu under the interpreter; meta for tracing)."""
    if device.type == "cpu" and not interpreter_on():
        return "CPU tensors run Triton kernels only under the interpreter (TRITON_INTERPRET=1)"
    if device.type not in ("cuda", "cpu", "meta"):
        return f"Triton kernels need cuda tensors, got {device.type}"
    return None


def triton_why_not(*tensors: torch.Tensor) -> str | None:
    """None when the kernels can take these tensors (device and floating dtypes), else the reason."""
    for t in tensors:
        reason = device_why_not(t.device)
        if reason is not None:
            return reason
        if t.is_floating_point() and t.dtype not in TRITON_DTYPES:
            return f"Triton kernels take fp32/bf16/fp16, got {t.dtype}"
    return None


def split_rows(num_rows: int, block_r: int, target: int) -> tuple[int, int]:
    """``(G, rows_per_program)``: ``num_rows > 0`` rows split over about ``target`` programs, each a whole number
    of ``block_r``-row tiles (the row split of the backward kernels that write per-program partial sums)."""
    tiles = -(-num_rows // block_r)  # ceil division; this module imports without Triton
    rows_per_program = -(-tiles // target) * block_r
    return -(-num_rows // rows_per_program), rows_per_program
