"""Where an op's hand-written kernels come from.

An op with kernels is defined once, in ``fastmae/ops/<op>.py``: one ``torch.library.custom_op``
``fastmae::<name>`` per direction (``<name>_backward`` for the gradient), with one fake and one autograd. The
schema's last argument, ``backend``, names whose kernels the op's body runs, with the op's own arguments:

- ``triton``: the function ``<name>`` of ``fastmae.kernels.<op>`` (kernels/<op>.py),
- ``cuda``: ``torch.ops.fastmae_C.<name>`` (csrc/: the ``fastmae._C`` extension, CPU and CUDA implementations),
- ``triton-gemm``: the function ``<name>`` of ``fastmae.kernels.<op>_gemm`` (kernels/<op>_gemm.py): the op's
  GEMMs in Triton with its elementwise work fused in (linear_gelu; named only, not among KERNEL_BACKENDS, the
  backends every op with kernels may have).

So a backend supplies only functions with the op's argument list; everything else about the op (checks,
dtype rules, fake, autograd) is written once.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

from fastmae.extension import extension_status

KERNEL_BACKENDS = ("triton", "cuda")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what every kernel backend takes


def kernel(backend: str, op: str, name: str) -> Callable:
    """The implementation of ``fastmae::<name>`` (an entry point of op ``op``) by ``backend``."""
    if backend == "triton":
        return getattr(importlib.import_module(f"fastmae.kernels.{op}"), name)
    if backend == "cuda":
        import fastmae._C  # noqa: F401  (loads torch.ops.fastmae_C)

        return getattr(torch.ops.fastmae_C, name)
    if backend == "triton-gemm":
        return getattr(importlib.import_module(f"fastmae.kernels.{op}_gemm"), name)
    raise ValueError(f"{op}: backend must be one of {(*KERNEL_BACKENDS, 'triton-gemm')}, got {backend!r}")


def triton_devices() -> tuple[str, ...]:
    """Where Triton kernels run: cuda; meta for tracing (the fake runs); cpu under the interpreter
    (``TRITON_INTERPRET=1``, a test tool, read when the ops are defined)."""
    return ("cuda", "meta", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda", "meta")


CUDA_DEVICES = ("cuda", "cpu", "meta")  # fastmae._C's CUDA and CPU implementations; meta: the op's fake


def triton_available(op: str) -> Callable[[], str | None]:
    """The ``available`` check of op ``op``'s triton backend: Triton and ``fastmae.kernels.<op>`` import."""

    def available() -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        try:
            importlib.import_module(f"fastmae.kernels.{op}")
        except ImportError as exc:
            return f"fastmae.kernels.{op} does not import: {exc}"
        return None

    return available


def cuda_available() -> str | None:
    """The ``available`` check of every cuda backend: ``fastmae._C`` loads."""
    loaded, detail = extension_status()
    return None if loaded else detail


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` ("cuda" or "cpu"; False for any other, e.g. "meta"). Not
    through ``torch.amp.is_autocast_available``, which torch 2.11's dynamo cannot trace."""
    return device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type)
