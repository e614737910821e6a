"""The table printed at the end of ``fastmae bench``: one line per row, sorted by model then img/s,
with each row's speed-up over the ``official`` and ``modern`` baselines measured in the same run."""

from __future__ import annotations

SPEEDUP_OVER = ("official", "modern")


def _number(row: dict[str, object], column: str) -> float | None:
    value = row.get(column)
    return float(value) if value not in (None, "") else None


def speedups(rows: list[dict[str, object]]) -> list[dict[str, float | None]]:
    """Per row, ``{baseline: row img/s / baseline img/s}`` over the same model, input and image size."""
    reference = {}
    for r in rows:
        if r["impl"] in SPEEDUP_OVER and r["status"] == "ok":
            reference[(r["impl"], r["model"], r["input"], str(r["img_size"]))] = _number(r, "img_per_s")
    out = []
    for r in rows:
        speed = _number(r, "img_per_s") if r["status"] == "ok" else None
        ratios = {}
        for base in SPEEDUP_OVER:
            base_speed = reference.get((base, r["model"], r["input"], str(r["img_size"])))
            ratios[base] = speed / base_speed if speed is not None and base_speed else None
        out.append(ratios)
    return out


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def format_table(rows: list[dict[str, object]]) -> str:
    """Plain-text table of ``rows`` (results rows, skipped ones included), sorted by model then img/s."""
    ordered = sorted(rows, key=lambda r: (str(r["model"]), str(r["input"]), -(_number(r, "img_per_s") or -1.0)))
    header = ["model", "input", "impl", "batch", "img/s", "ms/step", "MFU meas", "MFU spec", "mem GiB", "setup s",
              *(f"x {b}" for b in SPEEDUP_OVER), "status"]
    lines = [header]
    for r, ratios in zip(ordered, speedups(ordered)):
        batch = str(r["batch"])
        if r.get("batch_used") not in (None, "", r["batch"], str(r["batch"])):
            batch += f"->{r['batch_used']}"
        img_per_s, ms = _number(r, "img_per_s"), _number(r, "ms_per_step")
        lines.append([
            str(r["model"]), str(r["input"]), str(r["impl"]), batch,
            "" if img_per_s is None else f"{img_per_s:.1f}",
            "" if ms is None else f"{ms:.2f}",
            _percent(_number(r, "mfu_measured")), _percent(_number(r, "mfu_spec")),
            str(r.get("peak_mem_gib") or ""), str(r.get("setup_s") or ""),
            *("" if ratios[b] is None else f"{ratios[b]:.2f}x" for b in SPEEDUP_OVER),
            str(r["status"])[:120],
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)
