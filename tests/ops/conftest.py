"""Shared by the per-op tests: the ``backend`` fixture (one kernel backend of the module's op) and
``without_interpreter``.

A module sets ``OP`` (its :class:`~fastmae.ops.dispatch.Op`) and ``KERNELS`` (the names of its kernel backends)
and parametrizes ``@pytest.mark.parametrize("backend", KERNELS, indirect=True)``: one test for every kernel backend
(``triton``, ``cuda``) the op has, skipped with the reason where that backend cannot run on this machine (e.g.
fastmae._C not built). What every backend must match on the op's own cases is tested once for all ops in
``test_backends.py``; the per-op files test what those cases do not reach.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from fastmae.ops._kernels import triton_devices
from fastmae.ops.dispatch import Backend, Op


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The kernel backend named by the test's (indirect) parametrization, if it can run here."""
    op: Op = request.module.OP
    reason = op.backend(request.param).available()
    if reason is not None:
        pytest.skip(f"the {request.param} backend of {op.name} cannot run here: {reason}")
    return request.param


@pytest.fixture
def without_interpreter(monkeypatch: pytest.MonkeyPatch) -> Callable[[Backend], Backend]:
    """``triton -> the same backend as its op module defines it where TRITON_INTERPRET is unset``: the module
    reads the variable once, at import (``triton_devices()``), so the tests rebuild the backend with those
    devices to see what a machine without the interpreter refuses. Every kernel module is imported first: one
    first imported (by an availability check) while the variable is unset would hold compiled, not
    interpreted, kernels for the rest of the session."""
    from fastmae.kernels.aot import all_kernels

    all_kernels()  # imports every fastmae.kernels module
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return lambda b: dataclasses.replace(b, devices=triton_devices())
