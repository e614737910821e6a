"""The golden-loss test: the fixed-seed tiny CPU run of ``tests/golden_run.py`` against its committed record.

Tolerances, measured on a 2-core x86 CPU with torch 2.14.1: the same run with 2 threads instead of 1, or with
every op on the ``reference`` or the ``cuda`` (C++ CPU) backend instead of the default ones, moves a step's
loss by at most 2.2e-7 (relative) and a weight tensor's sum of squares by at most 3.4e-7 (relative). The
tolerances are 10x that: 2e-6 and 3e-6. Changing norm_pix's eps from 1e-6 to 1e-5 moves the losses by 6.6e-5
and the weights by 2e-5; scaling the loss by 1 + 1e-5 moves the losses by 1e-5: both fail.

A change that alters numerics on purpose rewrites the record: ``python tests/golden_run.py --update``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fastmae.extension import extension_status
from golden_run import GOLDEN, golden_data, run

LOSS_RTOL = 2e-6
SUMSQ_RTOL = 3e-6
SUM_TOL = 1e-3  # |sum - golden sum| <= SUM_TOL * sqrt(numel * sumsq): sums cancel, so only gross changes
INPUT_RTOL = 1e-6
UPDATE = "python tests/golden_run.py --update"


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return golden_data(tmp_path_factory.mktemp("golden-cache"))


def _backends() -> list[object]:
    loaded, why = extension_status()
    return [None, "reference",
            pytest.param("cuda", marks=pytest.mark.skipif(not loaded, reason=f"the cuda backend needs fastmae._C: {why}"))]


@pytest.mark.parametrize("backend", _backends())
def test_golden_run_matches_its_record(golden: dict, data: Path, tmp_path: Path, backend: str | None) -> None:
    result = run(data, tmp_path / "run", backend)
    assert result["settings"] == golden["settings"], f"the golden settings changed; rerun {UPDATE}"
    for got, want in zip(result["first_batch"], golden["first_batch"]):
        assert math.isclose(got, want, rel_tol=INPUT_RTOL), (
            f"the first input batch differs from the record ({result['first_batch']} vs {golden['first_batch']}): "
            "the data pipeline (decode, crop, normalise) changed, not the model")
    assert result["masks"] == golden["masks"], "the masks differ from the record (masking or its seeding changed)"
    assert len(result["losses"]) == len(golden["losses"])
    for step, (got, want) in enumerate(zip(result["losses"], golden["losses"]), start=1):
        assert math.isclose(got, want, rel_tol=LOSS_RTOL), (
            f"step {step}: loss {got!r}, the record has {want!r} (rel. {abs(got - want) / abs(want):.2e} > "
            f"{LOSS_RTOL}); if the change of numerics is intended, rerun {UPDATE}")
    assert result["weights"].keys() == golden["weights"].keys()
    for name, (got_sum, got_sq) in result["weights"].items():
        want_sum, want_sq = golden["weights"][name]
        assert math.isclose(got_sq, want_sq, rel_tol=SUMSQ_RTOL), (
            f"final {name}: sum of squares {got_sq!r}, the record has {want_sq!r}; if intended, rerun {UPDATE}")
        numel = golden["numel"][name]
        assert abs(got_sum - want_sum) <= SUM_TOL * math.sqrt(numel * want_sq), (
            f"final {name}: sum {got_sum!r}, the record has {want_sum!r}; if intended, rerun {UPDATE}")
