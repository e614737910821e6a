"""bench/tune_attention.py on CPU: the kernels in the interpreter, the GPU clock replaced by a cost per plan.

What is checked is the sweep's logic: every alternative timed once and written as a row, a plan that raises
or disagrees with the default recorded as an error and never chosen, and the tuned plan assembled from the
fastest forward and the faster backward form (the split one from its fastest dK/dV and dQ launches).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fastmae.kernels.attention import attention
from fastmae.kernels.attention_plan import AttentionPlan, default_plan
from fastmae.kernels.attention_tuning import tuning_plans

BENCH = Path(__file__).resolve().parents[1] / "bench"
SHAPE = (1, 17, 1, 32)  # (N, S, H, Dh): one small tile, every plan runs in a fraction of a second


@pytest.fixture
def tune(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 -- the bench script as a module
    monkeypatch.syspath_prepend(str(BENCH))
    import tune_attention

    return tune_attention


def _fake_clock(tune, monkeypatch: pytest.MonkeyPatch, cost: Callable[[str, AttentionPlan], float]) -> None:  # noqa: ANN001
    """``gpu_seconds`` = the summed ``cost`` of the launches a step makes (100 s for a step with none: SDPA)."""
    used: list[tuple[str, AttentionPlan]] = []
    forward, backward = tune.attention, tune.attention_backward

    def record_forward(qkv, h, plan):  # noqa: ANN001, ANN202
        used.append(("forward", plan))
        return forward(qkv, h, plan)

    def record_backward(grad, qkv, out, lse, h, plan):  # noqa: ANN001, ANN202
        used.append(("backward", plan))
        return backward(grad, qkv, out, lse, h, plan)

    def gpu_seconds(step: Callable[[], object], calls: int = 25) -> tuple[float, bool]:
        used.clear()
        step()
        return (sum(cost(kind, plan) for kind, plan in used) if used else 100.0), True

    monkeypatch.setattr(tune, "attention", record_forward)
    monkeypatch.setattr(tune, "attention_backward", record_backward)
    monkeypatch.setattr(tune, "gpu_seconds", gpu_seconds)


def _cost(kind: str, plan: AttentionPlan) -> float:
    """Fastest forward: 32 rows on 8 warps, the whole K/V; the split backward is fastest with dK/dV B16 T32 w8 and
    dQ B32 T64 w4."""
    if kind == "forward":
        return 1.0 + (plan.fwd_block_m != 32) + (plan.fwd_warps != 8) + (plan.fwd_loop != 0)
    if plan.bwd_fused:
        return 4.0
    return (1.0 + (plan.dkdv_block != 16) + (plan.dkdv_step != 32) + (plan.dkdv_warps != 8) + (plan.dq_block != 32)
            + (plan.dq_step != 64) + (plan.dq_warps != 4))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_tuned_plan_takes_the_fastest_parts(tune, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # noqa: ANN001
    _fake_clock(tune, monkeypatch, _cost)
    rows: list[dict] = []
    result = tune.tune_shape(tune.ShapeTuner("tiny", SHAPE, rows.append, torch.float32, "cpu"))
    s, dh = SHAPE[1], SHAPE[3]
    want = replace(default_plan(s, dh), fwd_block_m=32, fwd_warps=8, fwd_loop=0, bwd_fused=False, dkdv_block=16,
                   dkdv_step=32, dkdv_warps=8, dq_block=32, dq_step=64, dq_warps=4)
    assert result["tuned"] == want
    assert result["times"]["tuned"] == pytest.approx(1e6 * 2.0)  # 1 s forward + 1 s backward
    alternatives = sum(len(plans) for plans in tuning_plans(s, dh).values())
    timed = [r for r in rows if r["part"] in ("forward", "fused backward", "dkdv", "dq")]
    assert len(timed) == alternatives and all("gpu_us" in r and "error" not in r for r in timed)
    assert {r["plan"] for r in rows if r["part"] == "fwd+bwd"} >= {"tuned: " + tune.plan_label(want)}


def test_failing_or_wrong_plans_are_rows_never_choices(tune, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    forward = attention

    def flaky_forward(qkv, h, plan):  # noqa: ANN001, ANN202
        if plan.fwd_block_m == 32 and plan.fwd_warps == 8:
            raise RuntimeError("out of resources (simulated)")
        out, lse = forward(qkv, h, plan)
        return (out * 1.1 if plan.fwd_block_m == 16 else out), lse  # 16 rows: a wrong answer

    monkeypatch.setattr(tune, "attention", flaky_forward)
    _fake_clock(tune, monkeypatch, lambda kind, plan: 0.5 if kind == "forward" and plan.fwd_block_m == 16 else 1.0)
    rows: list[dict] = []
    result = tune.tune_shape(tune.ShapeTuner("tiny", SHAPE, rows.append, torch.float32, "cpu"))
    errors = {r["plan"]: r["error"] for r in rows if r["part"] == "forward" and "error" in r}
    assert any("out of resources (simulated)" in e for e in errors.values())
    assert sum("differs from the default plan's" in e for e in errors.values()) == 2  # M16 on 4 and 8 warps
    assert result["tuned"].fwd_block_m not in (16,) and (result["tuned"].fwd_block_m, result["tuned"].fwd_warps) != (32, 8)


def test_main_writes_the_csv_and_refuses_without_a_gpu(tune, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    out = tmp_path / "tuning.csv"
    if not torch.cuda.is_available():
        assert tune.main(["--csv", str(out)]) == 2
        assert "no CUDA device" in capsys.readouterr().err and not out.exists()
    _fake_clock(tune, monkeypatch, _cost)
    monkeypatch.setattr(tune.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tune.torch.cuda, "get_device_name", lambda: "Fake GPU")
    monkeypatch.setitem(tune.SHAPES, "tiny", SHAPE)
    monkeypatch.setattr(tune, "DEVICE", "cpu")
    monkeypatch.setattr(tune, "DTYPE", torch.float32)
    with pytest.raises(SystemExit):
        tune.main(["--csv", str(out), "--cases", "no such case"])
    assert tune.main(["--csv", str(out), "--cases", "tiny", "--warm-workers", "0"]) == 0
    rows = _rows(out)
    assert rows and {r["gpu"] for r in rows} == {"Fake GPU"} and {r["case"] for r in rows} == {"tiny"}
    printed = capsys.readouterr().out
    assert "(17, 32): AttentionPlan(**{" in printed and "tiny: default" in printed
    assert tune.main(["--csv", str(out), "--cases", "tiny", "--warm-workers", "0"]) == 0  # appended, one header
    assert len(_rows(out)) == 2 * len(rows)


def test_a_plan_with_nan_results_is_an_error_row(tune, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """NaN in a result compares False with any bound: it must still count as disagreeing, never be timed."""
    forward = attention

    def nan_forward(qkv, h, plan):  # noqa: ANN001, ANN202
        out, lse = forward(qkv, h, plan)
        return (out.clone().fill_(float("nan")) if plan.fwd_block_m == 16 else out), lse

    monkeypatch.setattr(tune, "attention", nan_forward)
    _fake_clock(tune, monkeypatch, lambda kind, plan: 0.5 if kind == "forward" and plan.fwd_block_m == 16 else 1.0)
    rows: list[dict] = []
    result = tune.tune_shape(tune.ShapeTuner("tiny", SHAPE, rows.append, torch.float32, "cpu"))
    nan_rows = [r for r in rows if r["part"] == "forward" and " fwd M16 " in r["plan"]]
    assert nan_rows and all("differs from the default plan's" in r.get("error", "") for r in nan_rows)
    assert result["tuned"].fwd_block_m != 16


def test_warm_up_runs_every_alternative_in_workers_and_reports_failures(tune, monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:  # noqa: ANN001
    """Two spawned processes run every alternative once (interpreter, CPU); a plan that raised there is an error
    row of the timing and never timed again."""
    monkeypatch.setitem(tune.SHAPES, "tiny", SHAPE)
    failed = tune.warm_up(["tiny"], 2, "cpu", "float32")
    assert failed == {"tiny": {}}  # every tiling runs
    bad = tuning_plans(SHAPE[1], SHAPE[3])["dq"][0]
    _fake_clock(tune, monkeypatch, _cost)
    rows: list[dict] = []
    tune.tune_shape(tune.ShapeTuner("tiny", SHAPE, rows.append, torch.float32, "cpu"),
                    {("dq", tune.plan_label(bad)): "RuntimeError: out of resources (simulated)"})
    bad_rows = [r for r in rows if r["part"] == "dq" and r["plan"] == tune.plan_label(bad)]
    assert len(bad_rows) == 1 and bad_rows[0]["error"] == "warm-up: RuntimeError: out of resources (simulated)"
    assert "gpu_us" not in bad_rows[0]


def test_warm_part_reports_each_failing_plan(tune, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    backward = tune.attention_backward

    def flaky(grad, qkv, out, lse, h, plan):  # noqa: ANN001, ANN202
        if not plan.bwd_fused and plan.dq_block == 64:
            raise RuntimeError("PTXAS error (simulated)")
        return backward(grad, qkv, out, lse, h, plan)

    monkeypatch.setattr(tune, "attention_backward", flaky)
    failed = tune.warm_part("tiny", SHAPE, "dq", "cpu", "float32")
    want = {tune.plan_label(p) for p in tuning_plans(SHAPE[1], SHAPE[3])["dq"] if p.dq_block == 64}
    assert set(failed) == want and all("PTXAS error (simulated)" in e for e in failed.values())


def test_default_plan_is_the_measured_tuned_plan(tune) -> None:  # noqa: ANN001
    """At every shape of the committed sweep, default_plan launches what the sweep measured fastest (its
    "tuned:" fwd+bwd row), and that plan beat SDPA's fastest kernel there: the ``triton`` backend's priority
    (ops/attention.py) rests on these rows."""
    rows = _rows(BENCH / "results" / "nvidia-h200-attention-tuning.csv")
    shapes = {(int(r["seq"]), int(r["head_dim"])) for r in rows}
    assert shapes == {(50, 64), (65, 80), (197, 32), (257, 32)}
    for case in {r["case"] for r in rows}:
        fwd_bwd = {r["plan"]: r for r in rows if r["case"] == case and r["part"] == "fwd+bwd"}
        [tuned] = [label for label in fwd_bwd if label.startswith("tuned: ")]
        seq, head_dim = int(fwd_bwd[tuned]["seq"]), int(fwd_bwd[tuned]["head_dim"])
        assert tuned == "tuned: " + tune.plan_label(default_plan(seq, head_dim)), case
        sdpa = [float(r["gpu_us"]) for label, r in fwd_bwd.items() if label.startswith("torch-") and r["gpu_us"]]
        assert sdpa and float(fwd_bwd[tuned]["gpu_us"]) < min(sdpa), case
