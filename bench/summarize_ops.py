"""Summarise a pytest-benchmark JSON of bench/test_bench_ops.py: one line per op and backend with the
GPU time (when measured), the wall-clock mean, GB/s (from the GPU time where there is one) and its
fraction of the measured copy bandwidth (the >= 80% target of DESIGN.md); and of
bench/test_bench_attention.py: one line per shape and backend with the GPU time, TFLOP/s and the fraction of
the fastest backend's TFLOP/s at that shape.

    python bench/summarize_ops.py BENCH.json [--csv OUT.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys


def rows_from(path: str) -> list[dict]:
    data = json.load(open(path))
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "op" not in info or "TFLOP/s" in info:  # attention rows: flop_rows_from
            continue
        rows.append({"op": info["op"], "backend": info["backend"], "device": info["device"], "dtype": info["dtype"],
                     "batch": info.get("batch", ""), "gpu_us": info.get("gpu_us", float("nan")),
                     "mean_us": bench["stats"]["mean"] * 1e6, "GB/s": info.get("GB/s", float("nan"))})
    copy = next((r["GB/s"] for r in rows if r["op"] == "copy"), float("nan"))
    for r in rows:
        r["copy_fraction"] = r["GB/s"] / copy
    machine = data.get("machine_info", {})
    for r in rows:
        r["machine"] = machine.get("node", "")
    return rows


def flop_rows_from(path: str) -> list[dict]:
    """The rows of bench/test_bench_attention.py (those with TFLOP/s), with ``of_fastest`` per shape."""
    infos = [b.get("extra_info", {}) for b in json.load(open(path))["benchmarks"]]
    rows = [{"case": i["case"], "backend": i["backend"], "dtype": i["dtype"], "batch": i["batch"],
             "gpu_us": i.get("gpu_us", float("nan")), "wall_us": i.get("wall_us", float("nan")),
             "TFLOP/s": i["TFLOP/s"], "TFLOP/s_wall": i.get("TFLOP/s_wall", float("nan")),
             "launch_hidden": i.get("launch_hidden", ""),
             **{k: i.get(k, "") for k in ("gpu", "torch", "triton", "cuda", "xformers")}}
            for i in infos if "TFLOP/s" in i]
    fastest: dict[str, float] = {}
    for r in rows:
        fastest[r["case"]] = max(fastest.get(r["case"], 0.0), r["TFLOP/s"])
    for r in rows:
        r["of_fastest"] = r["TFLOP/s"] / fastest[r["case"]]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    rows = rows_from(args.json_path)
    if rows:
        print(f"{'op':<24} {'backend':<10} {'dtype':<15} {'gpu us':>9} {'wall us':>9} {'GB/s':>8} {'of copy':>8}")
    for r in sorted(rows, key=lambda r: (r["op"], r["backend"])):
        print(f"{r['op']:<24} {r['backend']:<10} {r['dtype']:<15} {r['gpu_us']:>9.1f} {r['mean_us']:>9.1f} "
              f"{r['GB/s']:>8.1f} {100 * r['copy_fraction']:>7.0f}%")
    flop_rows = flop_rows_from(args.json_path)
    if flop_rows:
        print(f"{'attention fwd+bwd':<18} {'backend':<16} {'gpu us':>9} {'TFLOP/s':>8} {'of best':>8} "
              f"{'wall us':>9} {'TFLOP/s wall':>13}")
    for r in flop_rows:
        print(f"{r['case']:<18} {r['backend']:<16} {r['gpu_us']:>9.1f} {r['TFLOP/s']:>8.1f} "
              f"{100 * r['of_fastest']:>7.0f}% {r['wall_us']:>9.1f} {r['TFLOP/s_wall']:>13.1f}")
    if args.csv:
        all_rows = rows + flop_rows
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in all_rows for k in r)), restval="")
            writer.writeheader()
            writer.writerows(all_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
