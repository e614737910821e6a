"""Comparison plots of a ``fastmae bench`` results CSV, written next to it.

    python bench/plot_results.py bench/results/nvidia-h100-80gb-hbm3.csv [more.csv ...]

For each input mode in the file (``synthetic``, ``loader``, ``loader-dali``, ``loader-torch``): one PNG
``<csv stem>-<input>.png`` with img/s per implementation, grouped by model, each bar labelled with its img/s
and measured MFU. Needs only matplotlib. Only rows with status ``ok`` are drawn; where a file holds several
rows of one (model, implementation), e.g. two batch sizes, the fastest is drawn. A CSV that is not a
``fastmae bench`` results file (the ``-loader`` and ``-attention`` files beside them) is named and passed over,
so ``bench/results/*.csv`` can be given as it is.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

IMPL_ORDER = ("official", "hf", "hf-compile", "modern", "modern-cudagraph", "fastmae-reference", "fastmae-actckpt",
              "fastmae", "fastmae-bf16params", "fastmae-compile", "fastmae-cudagraph", "fastmae-cudagraph-bf16params",
              "fastmae-compile-cudagraph")  # implementations not named here follow, sorted
RESULT_COLUMNS = ("gpu", "impl", "model", "input", "status", "img_per_s", "gflops_per_img")


def best_rows(rows: list[dict[str, str]], input_mode: str) -> dict[tuple[str, str], dict[str, str]]:
    """``{(model, impl): the fastest ok row}`` for one input mode."""
    best: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        if r["input"] != input_mode or r["status"] != "ok" or not r["img_per_s"]:
            continue
        key = (r["model"], r["impl"])
        if key not in best or float(r["img_per_s"]) > float(best[key]["img_per_s"]):
            best[key] = r
    return best


def plot_input_mode(rows: list[dict[str, str]], input_mode: str, out: Path) -> bool:
    """Write the img/s chart of one input mode to ``out``; False when there is nothing to draw."""
    best = best_rows(rows, input_mode)
    if not best:
        return False
    flops = {m: float(r.get("gflops_per_img") or 0.0) for (m, _), r in best.items()}
    models = sorted(flops, key=lambda m: (flops[m], m))  # smallest model first
    impls = [i for i in IMPL_ORDER if any(i == impl for _, impl in best)]
    impls += sorted({i for _, i in best} - set(impls))
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(models) * max(1.0, len(impls) / 4)), 4.8))
    for k, impl in enumerate(impls):
        xs, heights, labels = [], [], []
        for m, model in enumerate(models):
            row = best.get((model, impl))
            if row is None:
                continue
            xs.append(m - 0.4 + (k + 0.5) * width)
            heights.append(float(row["img_per_s"]))
            mfu = f"\n{100 * float(row['mfu_measured']):.0f}%" if row.get("mfu_measured") else ""
            labels.append(f"{float(row['img_per_s']):.0f}{mfu}")
        bars = ax.bar(xs, heights, width, label=impl)
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    gpu = next(iter(best.values()))["gpu"]
    ax.set_xticks(range(len(models)), models, fontsize=8)
    ax.set_ylabel("img/s (pretraining step)")
    ax.set_title(f"{gpu}: {input_mode} input\nbar labels: img/s and MFU vs measured bf16 matmul", fontsize=10)
    tallest = max(float(r["img_per_s"]) for r in best.values())
    ax.set_ylim(0, 1.2 * tallest)  # headroom for the two-line bar labels
    # Legend below the axes so it can never cover a bar or its label.
    ax.legend(fontsize=8, ncol=min(len(impls), 4), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", help="results CSV files written by fastmae bench")
    args = parser.parse_args(argv)
    for name in args.csv:
        path = Path(name)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            print(f"{path}: no rows", file=sys.stderr)
            return 1
        missing = [c for c in RESULT_COLUMNS if c not in rows[0]]
        if missing:
            print(f"{path}: not a fastmae bench results file (no {', '.join(missing)} columns); passed over")
            continue
        for input_mode in sorted({r["input"] for r in rows}):
            out = path.with_name(f"{path.stem}-{input_mode}.png")
            if plot_input_mode(rows, input_mode, out):
                print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
