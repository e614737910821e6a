"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 in bf16 and fp16, without register
spills (``python -m fastmae.kernels.aot``, run in a process without the interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastmae.kernels.aot import ARCHS, DTYPES


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "fastmae.kernels.aot", "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=1200)
    return run, json.loads(out.read_text()) if out.exists() else []


def test_every_kernel_module_declares_its_kernels() -> None:
    """Every public module of kernels/ that defines ``@triton.jit`` kernels lists them (attention_plan.py and
    attention_tuning.py hold policy only)."""
    kernel_files = sorted(p for p in (Path(__file__).parents[2] / "kernels").glob("*.py")
                          if not p.stem.startswith("_") and p.stem != "aot" and "@triton.jit" in p.read_text())
    assert len(kernel_files) >= 7, kernel_files
    for path in kernel_files:
        assert "AOT_KERNELS" in path.read_text(), f"kernels/{path.name} lists no AOT_KERNELS"


def test_signatures_follow_the_kernels_own_arguments() -> None:
    """``AotKernel`` derives each signature from the kernel's parameters (in order): constexpr parameters from
    the function, ``*_ptr`` in the dtype under test, other arguments i32, unless overridden by name."""
    from fastmae.kernels.aot import AotKernel, all_kernels, jit_params
    from fastmae.kernels.attention import _attention_bwd_delta_kernel

    for kernel in all_kernels():
        signature = kernel.signature
        assert list(signature) == [name for name, _ in jit_params(kernel.fn)], kernel.name
        assert {k for k, v in signature.items() if v == "constexpr"} == set(kernel.constexprs), kernel.name
    delta = AotKernel(fn=_attention_bwd_delta_kernel, overrides={"delta_ptr": "*fp32"},
                      constexprs={"BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_E": 0})
    assert delta.signature == {"out_ptr": "*{dtype}", "dout_ptr": "*{dtype}", "delta_ptr": "*fp32", "seq": "i32",
                               "num_heads": "i32", "head_dim": "i32", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr",
                               "BLOCK_E": "constexpr"}
    with pytest.raises(ValueError, match="no runtime argument"):
        AotKernel(fn=_attention_bwd_delta_kernel, overrides={"lse_ptr": "*fp32"},
                  constexprs={"BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_E": 0}).signature  # noqa: B018
    with pytest.raises(ValueError, match="constexpr parameters"):
        AotKernel(fn=_attention_bwd_delta_kernel, constexprs={"BLOCK_M": 64, "BLOCK_D": 64}).signature  # noqa: B018


def test_compiles_for_sm80_sm90_without_spills(aot_results) -> None:  # noqa: ANN001
    run, rows = aot_results
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert rows, "no Triton kernel was compiled"
    kernels = {r["kernel"] for r in rows}
    assert {(r["kernel"], r["arch"], r["dtype"]) for r in rows} == {(k, a, d) for k in kernels for a in ARCHS for d in DTYPES}
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled


FP64_FLOATS = """
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastmae.kernels.aot import all_kernels

firsts = {}  # kernel function -> its first configuration with a float argument
for kernel in all_kernels():
    if "fp32" in kernel.signature.values():
        firsts.setdefault(kernel.fn, kernel)
found = {}
for kernel in firsts.values():
    signature = {k: "fp64" if v == "fp32" else v.replace("{dtype}", "bf16") for k, v in kernel.signature.items()}
    source = ASTSource(fn=kernel.fn, signature=signature, constexprs=dict(kernel.constexprs))
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": kernel.num_warps}).asm["ptx"]
    found[kernel.name] = sorted(set(re.findall(r"\\b(?:add|sub|mul|fma|div|sqrt|rcp|max|min|setp)[.\\w]*\\.f64\\b", ptx)))
print(json.dumps(found))
"""


def test_float_arguments_passed_as_fp64_stay_fp32_math() -> None:
    """torch.compile launches a kernel's Python-float argument (eps, the softmax scale) typed fp64 (inductor's
    ``_use_fp64_for_unbacked_floats``); each kernel casts it to fp32 first, so it compiles (sqrt_rn takes fp32
    only: the H200 run under torch 2.11 failed there) and no fp64 arithmetic reaches the PTX."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", FP64_FLOATS], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(found) >= 8, found  # attention's five kernels, layer_norm's forward, masked_mse's two
    assert not any(found.values()), found
