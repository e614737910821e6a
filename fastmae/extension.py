"""Loading the optional CUDA C++ extension ``fastmae._C`` (its kernels appear as ``torch.ops.fastmae_C.*``)."""

from __future__ import annotations

import functools
import os
import shutil


@functools.lru_cache(maxsize=None)
def extension_status() -> tuple[bool, str]:
    """``(loaded, detail)``: whether ``fastmae._C`` imports, and its build or the reason it does not."""
    import torch

    try:
        import fastmae._C  # noqa: F401  (registers torch.ops.fastmae_C)
    except ImportError as exc:
        return False, _why_not_loaded(exc, torch.__version__, torch.version.cuda)
    cuda_version, *archs = torch.ops.fastmae_C.build_info()
    major, minor = cuda_version // 1000, cuda_version % 1000 // 10
    return True, f"built with CUDA {major}.{minor} for " + ", ".join(f"sm_{a // 10}" for a in archs)


REINSTALL = "pip install --no-build-isolation --use-pep517 -e ."


def _nvcc() -> str | None:
    """The nvcc setup.py would build with: ``$CUDA_HOME/bin/nvcc``, else ``/usr/local/cuda/bin/nvcc``."""
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return shutil.which("nvcc", path=os.path.join(cuda_home, "bin"))


def _why_not_loaded(exc: ImportError, torch_version: str, torch_cuda: str | None) -> str:
    """What is missing, in the terms of setup.py's decision: a CPU build of torch, no nvcc at install time (or
    ``FASTMAE_BUILD_CUDA=0``, or a failed build), or a library that is there but does not load."""
    if not (isinstance(exc, ModuleNotFoundError) and exc.name == "fastmae._C"):  # there, but does not load
        return (f"fastmae._C is installed but does not load ({exc}): built against another torch than "
                f"{torch_version}? Rebuild it: {REINSTALL}")
    if torch_cuda is None:
        return (f"not built: torch {torch_version} is a CPU-only build, which cannot build CUDA extensions; install "
                f"a CUDA build of torch, then reinstall fastmae ({REINSTALL}); the other backends work without it")
    nvcc = _nvcc()
    if nvcc is None:
        return (f"not built: no nvcc under CUDA_HOME or /usr/local/cuda (torch {torch_version} is a CUDA "
                f"{torch_cuda} build, as needed); set CUDA_HOME to a CUDA toolkit and reinstall ({REINSTALL}); the "
                "other backends work without it")
    return (f"not built, although torch {torch_version} is a CUDA {torch_cuda} build and {nvcc} is here: fastmae was "
            "installed before nvcc was, with FASTMAE_BUILD_CUDA=0, or its build failed (the install log says "
            f"which); reinstall ({REINSTALL}), with FASTMAE_BUILD_CUDA=1 to make a failed build an error")
