"""Loading the optional CUDA C++ extension ``fastmae._C`` (its ops appear as ``torch.ops.fastmae.*``)."""

from __future__ import annotations

import functools
from collections.abc import Callable


@functools.lru_cache(maxsize=None)
def extension_status() -> tuple[bool, str]:
    """``(loaded, detail)``: whether ``fastmae._C`` imports, and its build or the reason it does not."""
    try:
        import torch

        import fastmae._C  # noqa: F401  (registers torch.ops.fastmae)
    except ImportError as exc:
        return False, f"fastmae._C not importable ({exc}); reinstall with a CUDA build of torch and nvcc"
    cuda_version, *archs = torch.ops.fastmae.build_info()
    major, minor = cuda_version // 1000, cuda_version % 1000 // 10
    return True, f"built with CUDA {major}.{minor} for " + ", ".join(f"sm_{a // 10}" for a in archs)


def extension_backend_available(register: Callable[[], None]) -> Callable[[], str | None]:
    """The ``available`` check of an op's ``cuda`` backend: ``fastmae._C`` loaded, then ``register()``
    (the op's fake implementations and autograd, in Python) run once; else the reason it is not."""
    register_once = functools.cache(register)

    def available() -> str | None:
        loaded, detail = extension_status()
        if not loaded:
            return detail
        try:
            register_once()
        except Exception as exc:  # a torch without these torch.library APIs: the backend is unavailable
            return f"registering the Python side of fastmae._C failed: {exc!r}"
        return None

    return available
