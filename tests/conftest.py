"""Shared test setup. Without a GPU the Triton kernels run in the interpreter: TRITON_INTERPRET=1 is
set here, before any kernel is defined (and the interpreter of Triton < 3.7 is fixed for numpy >= 2.4).
Also: ``tests/`` on the import path (and the checkout's root off it), the gpu marker."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# `python -m pytest` in the checkout puts its root on the path, where the top-level kernels/ folder (installed as
# fastmae.kernels) would shadow the PyPI package `kernels` that transformers imports: tests use the installed package
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]


def _interpreter_loops_run() -> bool:
    """Whether the Triton interpreter runs a loop bounded by a scalar kernel argument."""
    import triton
    import triton.language as tl

    @triton.jit
    def count_to_kernel(out_ptr, n):  # out[0] = n, counted by a loop over the runtime scalar n
        count = 0
        for _ in range(0, n):
            count += 1
        tl.store(out_ptr, count)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_to_kernel[(1,)](out, 3)
    except triton.runtime.errors.InterpreterError:
        return False
    return out.item() == 3


def _fix_interpreter_scalar_index() -> None:
    """Triton < 3.7's interpreter turns a scalar argument into an index with ``int()`` of a 1-element
    array, which numpy >= 2.4 refuses (triton-lang/triton#9171), so every loop bounded by a runtime
    argument fails. Where the probe kernel shows that, index through ``.item()`` as Triton 3.8 does."""
    if _interpreter_loops_run():
        return
    import triton
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor  # re-applied at every launch: wrapped, not patched once

    def patch_tensor_with_item_index(tensor: type, scope: object) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_tensor_with_item_index
    if not _interpreter_loops_run():
        raise RuntimeError(f"the Triton {triton.__version__} interpreter cannot loop over a kernel argument, "
                           "even with the numpy >= 2.4 fix (use numpy < 2.4 or Triton >= 3.7)")


if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined: @triton.jit reads it
    if importlib.util.find_spec("triton") is not None:
        _fix_interpreter_scalar_index()


@pytest.fixture(autouse=True)
def _sigterm_handler_restored() -> Iterator[None]:
    """Each test leaves SIGTERM's handler as it found it: an ignored SIGTERM is inherited by every process started
    later (a multiprocessing pool's workers then survive ``terminate()``, and the suite hangs)."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test, restored after: on a shared 2-core machine two spinning threads measured
    100x slower per training step, and a thread count left changed would change later tests' CPU reductions."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
