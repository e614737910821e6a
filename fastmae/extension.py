"""Loading the optional CUDA C++ extension ``fastmae._C`` (its ops appear as ``torch.ops.fastmae.*``)."""

from __future__ import annotations

import functools


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
