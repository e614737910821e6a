"""Summarise a pytest-benchmark JSON of bench/test_bench_ops.py: one line per op and backend with the
mean time, GB/s and the fraction of the measured copy bandwidth (the >= 80% target of DESIGN.md).

    python bench/summarize_ops.py OPS_BENCH.json [--csv OUT.csv]
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
        if "op" not in info:
            continue
        rows.append({"op": info["op"], "backend": info["backend"], "device": info["device"], "dtype": info["dtype"],
                     "batch": info.get("batch", ""), "mean_us": bench["stats"]["mean"] * 1e6,
                     "GB/s": info.get("GB/s", float("nan"))})
    copy = next((r["GB/s"] for r in rows if r["op"] == "copy"), float("nan"))
    for r in rows:
        r["copy_fraction"] = r["GB/s"] / copy
    machine = data.get("machine_info", {})
    for r in rows:
        r["machine"] = machine.get("node", "")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    rows = rows_from(args.json_path)
    print(f"{'op':<24} {'backend':<10} {'dtype':<15} {'mean us':>10} {'GB/s':>8} {'of copy':>8}")
    for r in sorted(rows, key=lambda r: (r["op"], r["backend"])):
        print(f"{r['op']:<24} {r['backend']:<10} {r['dtype']:<15} {r['mean_us']:>10.1f} {r['GB/s']:>8.1f} "
              f"{100 * r['copy_fraction']:>7.0f}%")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
