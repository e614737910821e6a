"""What bounds each Triton attention kernel at MAE's shapes: Nsight Compute counters against the op's floor.

    python bench/ncu_attention.py --out DIR [--shapes vit_bl_decoder,vit_h_encoder] [--ncu PATH] [--dry-run]

For each shape (those of ``bench/test_bench_attention.py``, batch 256, bf16; or ``NxSxHxDh``) this runs
itself as a child under ``ncu`` (``--child SHAPE``): one forward + backward of ``fastmae.ops.attention(...,
backend="triton")`` compiles the kernels outside the profile, then one more inside a ``cudaProfilerStart/Stop``
range (``--profile-from-start off``), so ncu profiles each ``_attention_*`` launch of one pass once, replaying
it once per pass its METRICS need, at the card's own clocks (``--clock-control none``, as the benchmarks run).
The report (``DIR/reports/SHAPE.ncu-rep``, log beside it) is read back as the raw page in base units (one
column per metric, a units row, one row per launch), written to ``DIR/ncu_attention.csv`` and summed up in
``DIR/ncu_attention.md`` (printed too): each kernel's time, share and bound, forward+backward against the floor.

Floor: the larger of FLOPs / peak rate (``fwd_bwd_flops``: 3.5x the forward's ``4*N*H*S^2*Dh``) and bytes /
HBM bandwidth, the bytes being the op's own ``min_bytes`` (qkv in, out out) twice, for the forward and for the
backward (dO in with qkv, whose size it shares), plus d(qkv) out: 11*N*S*H*Dh elements (lse, 1%, left out).
Also against the matmul rate the card measures (``measure_matmul_tflops``) where there is a GPU.

Bound (per kernel, from ncu's percent-of-peak; HIGH = 60%, below which ncu's speed-of-light rule sees latency):
  SM% and memory% (``gpu__compute_memory_throughput``: the busiest of L1, L2, DRAM) both < HIGH: latency-bound
  (too few warps or stalled ones: occupancy and the largest warp stall are named); else DRAM% >= HIGH and
  >= SM%: DRAM-bound; else memory% >= SM%: L1/L2/shared-bound; else tensor pipe >= HIGH: tensor-bound; else
  compute-bound off the tensor cores (exp, FMA, ALU, issue). Local-memory bytes (spills) are named when > 0.
"""

from __future__ import annotations

import argparse
import csv
import glob
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from fastmae.benchmark.peak import spec_tflops

# (name: (bench/test_bench_attention.py's case, (batch, S, H, Dh)))
SHAPES = {
    "vit_b_encoder": ("vit_b encoder", (256, 50, 12, 64)),
    "vit_l_encoder": ("vit_l encoder", (256, 50, 16, 64)),
    "vit_h_encoder": ("vit_h encoder", (256, 65, 16, 80)),
    "vit_bl_decoder": ("vit_b/l decoder", (256, 197, 16, 32)),
    "vit_h_decoder": ("vit_h decoder", (256, 257, 16, 32)),
}
KERNELS = "regex:^_attention_"  # the Triton kernels of kernels/attention.py, by function name
PEAK_TFLOPS = spec_tflops("NVIDIA H200")  # 989 dense bf16: fastmae/benchmark/peak.py's datasheet table (NVIDIA's
#                                          H200 datasheet says 1,979 with 2:4 sparsity)
HBM_TBS = 4.8  # H200 SXM HBM3e bandwidth, NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200)
HIGH = 60.0  # percent of peak from which a unit counts as the bound
DURATION, SM, MEM, DRAM = ("gpu__time_duration.sum", "sm__throughput.avg.pct_of_peak_sustained_elapsed",
                           "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
                           "dram__throughput.avg.pct_of_peak_sustained_elapsed")
TENSOR = "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"  # mma.sync + wgmma; hmma alone below
OCCUPANCY, REGS = "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread"
SPILLS = ("l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum", "l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum")
STALLS = ("long_scoreboard", "short_scoreboard", "barrier", "math_pipe_throttle", "mio_throttle", "wait",
          "dispatch_stall")  # warp cycles per issued instruction spent in each
# Names as in Nsight Compute's sm_90 reports (seen in 2025.x full-set reports of H100s); ncu stops with
# "Failed to find metric" on a name the card or version lacks: edit here then.
METRICS = (DURATION, SM, MEM, DRAM, "dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_sector_hit_rate.pct",
           TENSOR, "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
           "smsp__issue_active.avg.pct_of_peak_sustained_active", OCCUPANCY, "sm__maximum_warps_per_active_cycle_pct",
           REGS, "launch__shared_mem_per_block_static", "launch__shared_mem_per_block_dynamic", "launch__grid_size",
           "launch__block_size", "launch__waves_per_multiprocessor", *SPILLS, "sm__cycles_elapsed.avg.per_second",
           *(f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio" for r in STALLS))
_SCALE = {"n": 1, "u": 1e3, "m": 1e6, "": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}  # to ns, bytes, hz
_UNIT = re.compile(r"^(?P<prefix>[numKMGT]?)(second|byte|[hH]z)$")


def shape_of(name: str) -> tuple[int, int, int, int]:
    """``(N, S, H, Dh)`` of a SHAPES name or of ``NxSxHxDh``."""
    if name in SHAPES:
        return SHAPES[name][1]
    if re.fullmatch(r"\d+x\d+x\d+x\d+", name):
        return tuple(int(x) for x in name.split("x"))  # type: ignore[return-value]
    raise ValueError(f"unknown shape {name!r}: expected one of {', '.join(SHAPES)} or NxSxHxDh (e.g. 8x197x16x32)")


def expected_kernels(seq: int, head_dim: int) -> list[str]:
    """The kernels one forward + backward launches, in order, under ``default_plan`` (kernels/attention.py)."""
    from fastmae.kernels.attention_plan import default_plan

    plan = default_plan(seq, head_dim)
    forward = "_attention_fwd_loop_kernel" if plan.fwd_loop else "_attention_fwd_kernel"
    if plan.bwd_fused:
        return [forward, "_attention_bwd_kernel"]
    return [forward, "_attention_bwd_delta_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"]


def floor(shape: tuple[int, int, int, int], tflops: float, hbm_tbs: float = HBM_TBS) -> dict[str, float]:
    """The forward+backward floor of ``shape`` (see the module note): FLOPs, bytes, each one's time and the max."""
    # bench/ is on the path when this file is run
    from test_bench_attention import fwd_bwd_flops

    from fastmae.ops.dispatch import OPS

    n, s, h, dh = shape
    qkv = torch.empty(n, s, 3 * h * dh, dtype=torch.bfloat16, device="meta")  # (N, S, 3*H*Dh)
    nbytes = 2 * OPS["attention"].min_bytes(qkv, h) + qkv.numel() * qkv.element_size()
    flops = fwd_bwd_flops(n, s, h, dh)
    flop_us, byte_us = flops / tflops / 1e6, nbytes / hbm_tbs / 1e6
    return {"flops": flops, "bytes": nbytes, "flop_us": flop_us, "byte_us": byte_us, "floor_us": max(flop_us, byte_us)}


def parse_raw_csv(text: str) -> list[dict[str, object]]:
    """ncu's raw page as CSV (``"ID",...,"Kernel Name",...,<metric>...`` then a units row, then one row per launch)
    -> one dict per launch: ``id``, ``kernel`` (function name) and each of METRICS found, in ns, bytes, hz (None
    where ncu printed no number). Lines of ncu's own (``==PROF==``, ``==WARNING==``) and before the header skip."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("==")]
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError('no ncu raw CSV header (a line starting with "ID") in the text')
    names, units, *launches = csv.reader(lines[start:])
    rows = []
    for values in launches:
        cells = dict(zip(names, zip(values, units, strict=True), strict=True))
        row: dict[str, object] = {"id": int(cells["ID"][0]), "kernel": cells["Kernel Name"][0].split("(")[0].strip()}
        for metric in METRICS:
            if metric in cells:
                row[metric] = _number(*cells[metric])
        rows.append(row)
    return rows


def _number(value: str, unit: str) -> float | None:
    try:
        number = float(value.replace(",", ""))
    except ValueError:
        return None
    match = _UNIT.match(unit.split("/")[0])
    return number * _SCALE[match["prefix"]] if match else number


def bound(row: dict[str, object]) -> str:
    """The one-line verdict of the module note's rule for one launch's metrics."""
    get = {m: float(row.get(m) or 0.0) for m in METRICS}  # a metric ncu left without a number counts 0
    sm, mem, dram, tensor = get[SM], get[MEM], get[DRAM], get[TENSOR]
    if max(sm, mem) < HIGH:
        stall = max(STALLS, key=lambda r: get[f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio"])
        verdict = f"latency-bound (SM {sm:.0f}%, memory {mem:.0f}%; occupancy {get[OCCUPANCY]:.0f}%, top stall {stall})"
    elif dram >= HIGH and dram >= sm:
        verdict = f"DRAM-bound (DRAM {dram:.0f}% >= SM {sm:.0f}%)"
    elif mem >= sm:
        verdict = f"L1/L2/shared-bound (memory {mem:.0f}% >= SM {sm:.0f}%, DRAM {dram:.0f}%)"
    elif tensor >= HIGH:
        verdict = f"tensor-bound (tensor pipe {tensor:.0f}%)"
    else:
        verdict = f"compute-bound off the tensor cores (SM {sm:.0f}%, tensor pipe {tensor:.0f}%)"
    spilled = sum(get[m] for m in SPILLS)
    return verdict + (f"; spills {spilled / 1e6:.1f} MB local" if spilled else "")


def summary(rows: list[dict[str, object]], shapes: list[str], tflops: float, hbm_tbs: float,
            measured_tflops: float | None) -> str:
    """The markdown summary: per shape, each kernel's time, share, key counters and bound; the total vs the floor."""
    out = [f"# Triton attention under Nsight Compute ({len(rows)} launches)", "",
           f"Floor: max(FLOPs / {tflops:g} TFLOP/s, bytes / {hbm_tbs:g} TB/s)"
           + (f"; measured matmul rate {measured_tflops:.0f} TFLOP/s" if measured_tflops else "")
           + f". Bound: bench/ncu_attention.py's rule (HIGH = {HIGH:g}% of peak)."]
    for name in shapes:
        n, s, h, dh = shape_of(name)
        mine = [r for r in rows if r["shape"] == name]
        total = sum((r.get(DURATION) or 0.0) for r in mine) / 1e3  # us
        got, want = [r["kernel"] for r in mine], expected_kernels(s, dh)
        case = f"bench case '{SHAPES[name][0]}': " if name in SHAPES else ""
        out += ["", f"## {name} ({case}N {n}, S {s}, H {h}, Dh {dh}; bf16)", "",
                "| kernel | us | share | SM % | memory % | DRAM % | tensor % | occupancy % | regs | bound |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            us = (r.get(DURATION) or 0.0) / 1e3
            cells = [f"{r.get(m) or 0:.0f}" for m in (SM, MEM, DRAM, TENSOR, OCCUPANCY, REGS)]
            share = us / total if total else 0.0
            out.append(f"| {r['kernel']} | {us:.1f} | {share:.0%} | {' | '.join(cells)} | {bound(r)} |")
        f = floor((n, s, h, dh), tflops, hbm_tbs)
        moved = sum((r.get("dram__bytes_read.sum") or 0) + (r.get("dram__bytes_write.sum") or 0) for r in mine)
        out += ["", (f"forward+backward **{total:.1f} us** = {f['flops'] / total / 1e6 if total else 0:.1f} TFLOP/s; "
                     f"floor {f['floor_us']:.1f} us (FLOPs {f['flops'] / 1e9:.1f} G: {f['flop_us']:.1f} us; bytes "
                     f"{f['bytes'] / 1e6:.0f} MB: {f['byte_us']:.1f} us) -> {total / f['floor_us']:.1f}x the floor; "
                     f"DRAM moved {moved / 1e6:.0f} MB = {moved / f['bytes']:.2f}x the minimum")]
        if measured_tflops:
            g = floor((n, s, h, dh), measured_tflops, hbm_tbs)
            out[-1] += f"; at the measured matmul rate: floor {g['floor_us']:.1f} us -> {total / g['floor_us']:.1f}x"
        if got != want:
            out.append(f"\n**kernels profiled {got}, expected {want}** (default_plan): check --kernel-name")
    return "\n".join(out) + "\n"


def commands(ncu: str, shape: str, out: Path) -> tuple[list[str], list[str]]:
    """(profile, import) command lines for ``shape``: the child under ncu into a report, the report's raw CSV."""
    report = out / "reports" / shape
    profile = [ncu, "--target-processes", "all", "--profile-from-start", "off", "--clock-control", "none",
               "--kernel-name", KERNELS, "--metrics", ",".join(METRICS), "--export", str(report), "--force-overwrite",
               sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--child", shape]
    return profile, [ncu, "--import", f"{report}.ncu-rep", "--page", "raw", "--csv", "--print-units", "base"]


def child(shape: str) -> None:
    """One forward + backward to compile, then one inside the profiler range ncu records."""
    from fastmae import ops

    n, s, h, dh = shape_of(shape)
    torch.manual_seed(0)
    qkv = torch.randn(n, s, 3 * h * dh, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # (N, S, 3*H*Dh)
    upstream = torch.randn(n, s, h * dh, device="cuda", dtype=torch.bfloat16)  # (N, S, H*Dh)

    def step() -> None:
        torch.autograd.grad(ops.attention(qkv, h, backend="triton"), qkv, upstream)

    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def find_ncu(given: str | None) -> str | None:
    """``given``, else ``ncu`` on PATH, else the newest /opt/nvidia/nsight-compute/*/ncu or CUDA's."""
    candidates = [given] if given else ["ncu", *sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True),
                                        "/usr/local/cuda/bin/ncu"]
    return next((shutil.which(c) for c in candidates if shutil.which(c)), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for ncu_attention.csv, .md and reports/")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}, NxSxHxDh")
    parser.add_argument("--ncu", help="the ncu binary (default: on PATH, /opt/nvidia/nsight-compute/*/ncu)")
    parser.add_argument("--tflops", type=float, default=PEAK_TFLOPS, help="peak dense bf16 TFLOP/s (H200 datasheet)")
    parser.add_argument("--hbm-tbs", type=float, default=HBM_TBS, help="DRAM bandwidth, TB/s (H200 datasheet)")
    parser.add_argument("--dry-run", action="store_true", help="print the ncu commands and the floors, run nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the profiled process
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    try:
        shapes = [s for s in args.shapes.split(",") if s]
        dims = {s: shape_of(s) for s in shapes}
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ncu = find_ncu(args.ncu)
    if args.dry_run:
        for s in shapes:
            f = floor(dims[s], args.tflops, args.hbm_tbs)
            print(f"# {s} {dims[s]}: kernels {expected_kernels(dims[s][1], dims[s][3])}; floor {f['floor_us']:.1f} us "
                  f"(FLOPs {f['flop_us']:.1f} us, bytes {f['byte_us']:.1f} us)")
            for command in commands(ncu or args.ncu or "ncu", s, args.out):
                print(shlex.join(command))
        return 0
    if ncu is None:
        print(f"error: no ncu binary ({args.ncu or 'ncu on PATH, /opt/nvidia/nsight-compute/*/ncu'}); "
              "install Nsight Compute or pass --ncu PATH", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: no CUDA device: the attention kernels are profiled on a GPU", file=sys.stderr)
        return 2
    (args.out / "reports").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for s in shapes:
        profile, read = commands(ncu, s, args.out)
        run = subprocess.run(profile, check=False, capture_output=True, text=True)
        (args.out / "reports" / f"{s}.log").write_text(run.stdout + run.stderr)
        raw = subprocess.run(read, check=False, capture_output=True, text=True) if run.returncode == 0 else run
        if raw.returncode != 0 or '"ID"' not in raw.stdout:
            lines = [x for x in (run.stdout + run.stderr + raw.stderr).splitlines() if x.strip()]
            flagged = [x for x in lines if "==ERROR==" in x or "==WARNING==" in x]
            why = (flagged or lines or ["no output"])[0 if flagged else -1]
            print(f"error: ncu failed on {s} (rc {run.returncode}; log {args.out}/reports/{s}.log): {why}",
                  file=sys.stderr)
            return 1
        rows += [{"shape": s, **r} for r in parse_raw_csv(raw.stdout)]
    with open(args.out / "ncu_attention.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["shape", "id", "kernel", *METRICS], restval="")
        writer.writeheader()
        writer.writerows(rows)
    from fastmae.benchmark.peak import measure_matmul_tflops

    text = summary(rows, shapes, args.tflops, args.hbm_tbs, measure_matmul_tflops(torch.device("cuda")))
    (args.out / "ncu_attention.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
