"""fastmae._C's CUDA kernels: resource use per kernel and architecture, and no register spills.

Read from the built library with ``cuobjdump --dump-resource-usage`` (no GPU needed)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fastmae.extension import extension_status


def _cuobjdump() -> str | None:
    """The CUDA toolkit's cuobjdump, else the one Triton ships."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    found = shutil.which("cuobjdump", path=f"{cuda_home}/bin:{os.environ.get('PATH', '')}")
    if found is None:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        found = str(bundled) if bundled.exists() else None
    return found


def resource_usage(library: str, tool: str) -> list[dict]:
    """One row per (architecture, kernel): registers, shared, local (spill) and stack bytes."""
    text = subprocess.run([tool, "--dump-resource-usage", library], capture_output=True, text=True, check=True).stdout
    rows, arch = [], None
    for line in text.splitlines():
        if m := re.search(r"arch = (sm_\d+)", line):
            arch = m[1]
        elif m := re.match(r"\s*Function (\S+):", line):
            rows.append({"arch": arch, "kernel": m[1]})
        elif rows and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)):
            rows[-1].update(registers=int(m[1]), stack=int(m[2]), shared=int(m[3]), local=int(m[4]))
    return rows


def test_kernels_have_no_local_memory_spills() -> None:
    loaded, detail = extension_status()
    if not loaded:
        pytest.skip(f"fastmae._C is not built here: {detail}")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump under CUDA_HOME or on PATH")
    import fastmae._C

    rows = resource_usage(fastmae._C.__file__, tool)
    for r in rows:
        print(f"{r['arch']}  {r['kernel'][:90]:<90}  regs {r.get('registers')}  shared {r.get('shared')}  "
              f"local {r.get('local')}  stack {r.get('stack')}")
    assert rows, "fastmae._C holds no CUDA kernel"
    assert {r["arch"] for r in rows} >= {"sm_80", "sm_90"}
    for op in ("random_masking", "unshuffle", "masked_mse"):
        assert any(op in r["kernel"] for r in rows), f"no {op} kernel in fastmae._C"
    # local memory or a stack frame in these kernels means spilled registers (they hold no local arrays);
    # the build also runs ptxas with --warn-on-spills as an error
    spilled = [r for r in rows if r.get("local", 0) > 0 or r.get("stack", 0) > 0]
    assert not spilled, spilled
