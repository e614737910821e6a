"""Ahead-of-time compilation of every Triton kernel, with its resource use: ``python -m fastmae.kernels.aot``.

Each kernel file lists its launch configurations in ``AOT_KERNELS`` (signatures derived from the
kernels' own arguments: :func:`jit_signature`); this compiles each for sm_80
and sm_90 in bf16 and fp16 with ``triton.compile`` (no GPU needed; pointers hinted 16-byte aligned,
as the JIT specialises for fresh tensors), runs ``ptxas -v`` (Triton's own) on the PTX for the
target it names (sm_90a on Hopper) and reports registers, shared memory and spill bytes. Exit
status 1 on any spill.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
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


def jit_params(fn: object) -> list[tuple[str, bool]]:
    """``(name, is_constexpr)`` of every parameter of the ``@triton.jit`` function ``fn``, in order: from its
    ``params`` (a ``JITFunction``'s, Triton 3.3 to 3.8), else, for the interpreter's ``InterpretedFunction``
    (``TRITON_INTERPRET=1``), which has none, from the annotations of the Python function it wraps."""
    params = getattr(fn, "params", None)
    if params is not None:
        return [(p.name, bool(p.is_constexpr)) for p in params]
    python_fn = getattr(fn, "fn", fn)
    return [(name, "constexpr" in str(p.annotation)) for name, p in inspect.signature(python_fn).parameters.items()]


def jit_signature(fn: object, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The Triton signature of ``fn`` from its own argument names: constexpr parameters ``"constexpr"``,
    ``*_ptr`` arguments ``"*{dtype}"`` (the dtype under test), any other argument ``"i32"``; ``overrides``
    sets the type of named arguments (``{"lse_ptr": "*fp32", "ids_ptr": "*i64", "scale": "fp32", "seed":
    "i64"}``). ValueError when an override names no runtime argument of ``fn``."""
    overrides = overrides or {}
    params = jit_params(fn)
    runtime = {name for name, constexpr in params if not constexpr}
    unknown = sorted(set(overrides) - runtime)
    if unknown:
        raise ValueError(f"{getattr(fn, '__name__', fn)} has no runtime argument(s) {unknown} to override")
    return {name: "constexpr" if constexpr else overrides.get(name, "*{dtype}" if name.endswith("_ptr") else "i32")
            for name, constexpr in params}


@dataclass(frozen=True)
class AotKernel:
    """One launch configuration of a ``@triton.jit`` kernel: ``fn``, the values of its constexpr parameters
    (``constexprs``: every one, by name), ``overrides`` of the types :func:`jit_signature` derives from
    its argument names, and the launch's warps and stages. ``label`` names the configuration in the report.
    ``divisible_by_16`` names integer arguments to hint as multiples of 16, as the JIT specialises them at the
    shapes that matter (a GEMM's row lengths: without the hint its tile loads cannot be pipelined).
    """

    fn: object
    constexprs: dict[str, object] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    divisible_by_16: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        base = getattr(self.fn, "__name__", str(self.fn))
        return f"{base}[{self.label}]" if self.label else base

    @property
    def signature(self) -> dict[str, str]:
        """Every argument's Triton type (``"*{dtype}"`` is replaced by the dtype under test, e.g. ``"*bf16"``).
        ValueError unless ``constexprs`` gives exactly the constexpr parameters."""
        signature = jit_signature(self.fn, self.overrides)
        wanted = {name for name, kind in signature.items() if kind == "constexpr"}
        if wanted != set(self.constexprs):
            raise ValueError(f"{self.name}: constexprs {sorted(self.constexprs)} != the kernel's constexpr "
                             f"parameters {sorted(wanted)}")
        not_ints = sorted(set(self.divisible_by_16) - {name for name, kind in signature.items() if kind == "i32"})
        if not_ints:
            raise ValueError(f"{self.name}: divisible_by_16 names {not_ints}, which are not i32 arguments")
        return signature


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
    aligned = {(i,): [["tt.divisibility", 16]] for i, (name, t) in enumerate(signature.items())
               if t.startswith("*") or name in kernel.divisible_by_16}
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
