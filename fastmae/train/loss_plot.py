"""``loss.png``: the training loss (and, where logged, the held-out loss and its flat-patch baseline) against the
step, log-scale y, drawn from ``metrics.jsonl``: learning is visible without TensorBoard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    """The complete rows of ``metrics.jsonl`` (a half-written last row is left out)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def save_loss_plot(metrics: Path, path: Path, title: str = "") -> bool:
    """Draw ``metrics``' losses to ``path`` (PNG, written atomically); False when there is no row to draw."""
    rows = [r for r in read_metrics(metrics) if isinstance(r.get("loss"), (int, float))]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss (mean of each log interval)")
    held = [r for r in rows if isinstance(r.get("heldout_loss"), (int, float))]
    if held:
        ax.plot([r["step"] for r in held], [r["heldout_loss"] for r in held], marker=".",
                label="held-out loss (images never trained on, fixed masks)")
        base = [r for r in held if isinstance(r.get("heldout_baseline"), (int, float))]
        if base:
            ax.axhline(base[-1]["heldout_baseline"], color="grey", linestyle="--",
                       label="held-out flat-patch baseline (mean colour)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-patch MSE (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True
