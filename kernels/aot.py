"""Ahead-of-time compilation of every Triton kernel, with its resource use: ``python -m fastmae.kernels.aot``.

Each kernel file lists its launch configurations in ``AOT_KERNELS``; this compiles each for sm_80
and sm_90 in bf16 and fp16 with ``triton.compile`` (no GPU needed; pointers hinted 16-byte aligned,
as the JIT specialises for fresh tensors), runs ``ptxas -v`` (Triton's own) on the PTX for the
target it names (sm_90a on Hopper) and reports registers, shared memory and spill bytes. Exit
status 1 on any spill.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import shutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ARCHS = (80, 90)
DTYPES = ("bf16", "fp16")


@dataclass(frozen=True)
class AotKernel:
    """One launch configuration of a ``@triton.jit`` kernel.

    ``signature`` maps every argument to a Triton type (``"*{dtype}"`` is replaced by the dtype
    under test, e.g. ``"*bf16"``; ``"constexpr"`` for the keys of ``constexprs``).
    """

    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""

    @property
    def name(self) -> str:
        base = getattr(self.fn, "__name__", str(self.fn))
        return f"{base}[{self.label}]" if self.label else base


@dataclass(frozen=True)
class AotResult:
    kernel: str
    arch: int
    dtype: str
    registers: int
    shared_bytes: int
    spill_stores: int
    spill_loads: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def all_kernels() -> list[AotKernel]:
    """``AOT_KERNELS`` of every module in ``fastmae.kernels``."""
    import fastmae.kernels as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.name == "aot":
            continue
        module = importlib.import_module(f"fastmae.kernels.{info.name}")
        found.extend(getattr(module, "AOT_KERNELS", []))
    return found


def _ptxas() -> str:
    """Triton's bundled ptxas (the one that built the kernels), else the CUDA toolkit's."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("ptxas", path=f"{os.environ.get('CUDA_HOME', '/usr/local/cuda')}/bin:{os.environ['PATH']}")
    if found is None:
        raise FileNotFoundError("no ptxas: neither Triton's bundled one nor one under CUDA_HOME or on PATH")
    return found


def compile_kernel(kernel: AotKernel, arch: int, dtype: str) -> AotResult:
    """Compile one configuration for ``sm_<arch>`` with ``dtype`` tensors; resource use from ``ptxas -v``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {k: v.replace("{dtype}", dtype) for k, v in kernel.signature.items()}
    # as the JIT specialises for freshly allocated tensors: every pointer 16-byte aligned
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
    source = ASTSource(fn=kernel.fn, signature=signature, constexprs=dict(kernel.constexprs), attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        target = re.search(r"\.target\s+(sm_\w+)", compiled.asm["ptx"])[1]  # e.g. sm_90a on Hopper
        report = subprocess.run([_ptxas(), "-v", f"--gpu-name={target}", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report)[1])
    stores, loads = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report).groups())
    return AotResult(kernel.name, arch, dtype, registers, int(compiled.metadata.shared), stores, loads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmae.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    results = [compile_kernel(k, arch, dtype) for k in all_kernels() for arch in ARCHS for dtype in DTYPES]
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    width = max([len(r.kernel) for r in results] + [6])
    print(f"{'kernel':<{width}}  arch   dtype  regs  shared_B  spill_st_B  spill_ld_B")
    for r in results:
        print(f"{r.kernel:<{width}}  sm_{r.arch}  {r.dtype:<5}  {r.registers:>4}  {r.shared_bytes:>8}  "
              f"{r.spill_stores:>10}  {r.spill_loads:>10}")
    spilled = [r for r in results if r.spills]
    print(f"{len(results)} compilations, {len(spilled)} with register spills")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
