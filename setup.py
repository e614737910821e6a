"""Build and install fastmae.

``fastmae._C`` (csrc/) is built with nvcc when a CUDA build of torch and nvcc are present in the
build environment (install with ``--no-build-isolation`` so the build sees your torch); otherwise
the install is pure Python and says so. Environment:

- ``FASTMAE_BUILD_CUDA``: ``1`` require the extension (fail if it cannot be built), ``0`` skip it,
  unset: build it when possible, and install without it (with a warning) if the build fails.
- ``FASTMAE_CUDA_ARCHS``: GPU architectures, default ``8.0;9.0`` (PTX is added for the newest).
- ``CUDA_HOME``: the CUDA toolkit; defaults to ``/usr/local/cuda`` when that holds nvcc.

The C++ standard is left to torch's build helpers (recent torch headers need C++20).
"""

from __future__ import annotations

import glob
import os
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _gencode_flags(archs: str) -> list[str]:
    """``"8.0;9.0"`` -> SASS for each arch plus PTX for the newest."""
    nums = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not nums or not all(n.isdigit() for n in nums):
        raise SystemExit(f"FASTMAE_CUDA_ARCHS must look like '8.0;9.0', got {archs!r}")
    nums = sorted(set(nums), key=int)
    flags = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in nums]
    return flags + [f"-gencode=arch=compute_{nums[-1]},code=compute_{nums[-1]}"]


def cuda_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for fastmae._C, or empty ones with a printed reason."""
    mode = os.environ.get("FASTMAE_BUILD_CUDA", "")
    if mode not in ("", "0", "1"):
        raise SystemExit(f"FASTMAE_BUILD_CUDA must be 0 or 1 (or unset), got {mode!r}")
    if mode == "0":
        print("fastmae: FASTMAE_BUILD_CUDA=0: pure-Python install, fastmae._C is not built")
        return [], {}
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # else torch may guess /usr/local and fail to link cudart
    reason = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        reason = "torch is not importable in the build environment (install torch first, then --no-build-isolation)"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU-only build"
        elif CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
            reason = "nvcc was not found (set CUDA_HOME to a CUDA toolkit)"
    if reason is not None:
        if mode == "1":
            raise SystemExit(f"FASTMAE_BUILD_CUDA=1 but fastmae._C cannot be built: {reason}")
        print(f"fastmae: pure-Python install, fastmae._C is not built: {reason}")
        return [], {}
    sources = sorted(os.path.relpath(p, HERE) for ext in ("cpp", "cu") for p in glob.glob(f"{HERE}/csrc/*.{ext}"))
    if not sources:
        raise SystemExit(f"no csrc/*.cpp or csrc/*.cu next to {__file__}: an incomplete source tree")
    # ptxas turns any register spill into an error: a spilling kernel fails the build (and so the tests)
    nvcc_flags = ["-O3", "-lineinfo", "-Xptxas=--warn-on-spills,--warning-as-error",
                  *_gencode_flags(os.environ.get("FASTMAE_CUDA_ARCHS", "8.0;9.0"))]
    ext = CUDAExtension(
        "fastmae._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
        # the shared libstdc++, named before the driver's own -lstdc++: where the toolchain links libstdc++.a
        # instead (seen on the lent H200 machine: its code inside _C.so), torch's streams and _C.so's copy of
        # the library disagree, and a TORCH_CHECK message with an integer in it crashed the process
        extra_link_args=["-l:libstdc++.so.6"],
    )
    print(f"fastmae: building fastmae._C with nvcc from {CUDA_HOME} ({nvcc_flags[-1]} is the PTX target)")

    class BuildOptionalExtension(BuildExtension):
        """Without FASTMAE_BUILD_CUDA=1, a failed build leaves a working pure-Python install."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:
                if mode == "1":
                    raise
                warnings.warn(f"fastmae: fastmae._C failed to build ({exc}); installing without it. "
                              "Set FASTMAE_BUILD_CUDA=1 to make this an error.", stacklevel=1)
                self.extensions = []

    return [ext], {"build_ext": BuildOptionalExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()
DALI = "nvidia-dali-cuda130; platform_system == 'Linux' and platform_machine == 'x86_64'"

setup(
    name="fastmae",
    version="0.1.0",
    description="Fast, faithful MAE (masked-autoencoder ViT) pretraining for PyTorch",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["fastmae", "fastmae.ops", "fastmae.data", "fastmae.train", "fastmae.finetune", "fastmae.interop",
              "fastmae.benchmark", "fastmae.benchmark.baselines", "fastmae.kernels"],
    package_dir={"fastmae.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "numpy",
        "pillow",
        "scikit-image",
        "matplotlib",
        "tqdm",
        "tensorboard",
        # fine-tuning's Mixup/CutMix, RandAugment, RandomErasing, soft-target loss; checkpoint interop
        "timm>=1.0",
        "tomli; python_version < '3.11'",
    ],
    extras_require={
        # NVIDIA DALI: GPU JPEG decoding for the loaders (fastmae.data picks it when installed); the
        # tests run its CPU pipelines
        "dali": [DALI],
        # --precision fp8: torchao's float8 training (0.18 is the version tested)
        "fp8": ["torchao>=0.18"],
        # transformers: the Hugging Face interop tests and the hf baseline; torchao: the fp8 path's CPU tests
        "test": ["pytest", "pytest-benchmark", DALI, "transformers", "torchao>=0.18"],
    },
    entry_points={"console_scripts": ["fastmae=fastmae.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
