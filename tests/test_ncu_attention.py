"""bench/ncu_attention.py: ncu's raw CSV parsed, the bound rule, the floors, the dry run and the error paths on CPU;
on a GPU with Nsight Compute, one profile at a small decoder shape.

The fixture (tests/fixtures/ncu_attention_raw.csv) is hand-written in the layout of ``ncu --import R --page raw
--csv --print-units base``: a header of launch columns then one column per metric, a units row, one row per launch;
its numbers are invented (a decoder pass, 797 us as bench/results measured), chosen to hit each verdict.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
FIXTURE = Path(__file__).parent / "fixtures" / "ncu_attention_raw.csv"
DECODER = "vit_bl_decoder"


@pytest.fixture
def ncu(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 -- the bench script as a module
    monkeypatch.syspath_prepend(str(BENCH))
    import ncu_attention

    return ncu_attention


def _stall(reason: str) -> str:
    return f"smsp__average_warps_issue_stalled_{reason}_per_issue_active.ratio"


def test_parses_the_raw_page_into_one_row_per_launch(ncu) -> None:  # noqa: ANN001
    rows = ncu.parse_raw_csv(FIXTURE.read_text())
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    assert [r["kernel"] for r in rows] == ncu.expected_kernels(197, 32)  # the decoder's split backward
    first = rows[0]
    assert first[ncu.DURATION] == 231_456.0  # ns, thousands separator dropped
    assert first["dram__bytes_read.sum"] == pytest.approx(160.25e6)  # Mbyte -> bytes
    assert first["dram__bytes_write.sum"] == 53_477_376.0
    assert first[ncu.REGS] == 128.0 and first["launch__grid_size"] == 8192.0
    assert set(ncu.METRICS) <= set(first)  # every metric asked for, nothing of the launch columns beyond id/kernel
    assert "device__attribute_display_name" not in first and "Block Size" not in first


def test_parser_names_a_missing_header(ncu) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="no ncu raw CSV header"):
        ncu.parse_raw_csv("==ERROR== Failed to find metric foo\n")


def test_bound_verdicts_of_the_fixture(ncu) -> None:  # noqa: ANN001
    verdicts = [ncu.bound(r) for r in ncu.parse_raw_csv(FIXTURE.read_text())]
    assert verdicts[0].startswith("latency-bound") and "top stall long_scoreboard" in verdicts[0]
    assert verdicts[1].startswith("DRAM-bound")
    assert verdicts[2].startswith("tensor-bound") and verdicts[2].endswith("spills 1.6 MB local")
    assert verdicts[3].startswith("L1/L2/shared-bound")


@pytest.mark.parametrize("metrics,verdict", [
    ({"SM": 20, "MEM": 59, "DRAM": 59, _stall("barrier"): 4.0, _stall("wait"): 1.0}, "latency-bound"),
    ({"SM": 61, "MEM": 70, "DRAM": 65}, "DRAM-bound"),  # DRAM >= HIGH and >= SM
    ({"SM": 70, "MEM": 75, "DRAM": 65}, "L1/L2/shared-bound"),  # DRAM below SM: the caches are the busiest
    ({"SM": 80, "MEM": 40, "DRAM": 10, "TENSOR": 75}, "tensor-bound"),
    ({"SM": 80, "MEM": 40, "DRAM": 10, "TENSOR": 30}, "compute-bound off the tensor cores"),
])
def test_bound_rule(ncu, metrics: dict, verdict: str) -> None:  # noqa: ANN001
    row = {getattr(ncu, k, k): v for k, v in metrics.items()}
    text = ncu.bound(row)
    assert text.startswith(verdict), text
    assert "spills" not in text
    if verdict == "latency-bound":
        assert "top stall barrier" in text


def test_floors_with_the_h200_defaults(ncu) -> None:  # noqa: ANN001
    n, s, h, dh = ncu.SHAPES[DECODER][1]
    f = ncu.floor((n, s, h, dh), ncu.PEAK_TFLOPS)
    elements = n * s * h * dh
    assert f["bytes"] == 11 * elements * 2  # qkv + out, dO + qkv, d(qkv), bf16
    assert f["flops"] == 7 * 4 * n * h * s * s * dh // 2
    assert ncu.PEAK_TFLOPS == 989.0 and ncu.HBM_TBS == 4.8
    assert f["byte_us"] == pytest.approx(118.35, abs=0.01) and f["flop_us"] == pytest.approx(72.01, abs=0.01)
    assert f["floor_us"] == f["byte_us"]  # the decoder is bytes-bound at its floor
    assert ncu.floor(ncu.SHAPES["vit_h_encoder"][1], 989.0)["floor_us"] == pytest.approx(97.62, abs=0.01)
    assert ncu.floor((n, s, h, dh), 989.0, hbm_tbs=10.0)["floor_us"] == pytest.approx(72.01, abs=0.01)  # FLOPs then


def test_summary_of_the_fixture(ncu) -> None:  # noqa: ANN001
    rows = [{"shape": DECODER, **r} for r in ncu.parse_raw_csv(FIXTURE.read_text())]
    text = ncu.summary(rows, [DECODER], 989.0, 4.8, 780.0)
    assert "forward+backward **797.3 us**" in text and "6.7x the floor" in text
    assert "| _attention_bwd_dkdv_kernel | 352.7 | 44% |" in text
    assert "measured matmul rate 780 TFLOP/s" in text and "expected" not in text
    assert "**kernels profiled" in ncu.summary(rows[:2], [DECODER], 989.0, 4.8, None)  # a kernel went missing


def test_shape_names_are_the_benchmarks(ncu) -> None:  # noqa: ANN001
    with open(BENCH / "results" / "nvidia-h200-attention.csv") as f:
        cases = {row["case"] for row in csv.DictReader(f)}
    assert {case for case, _ in ncu.SHAPES.values()} == cases
    assert ncu.shape_of("8x197x16x32") == (8, 197, 16, 32)


def test_dry_run_prints_the_commands_and_floors(ncu, tmp_path: Path,  # noqa: ANN001
                                                capsys: pytest.CaptureFixture) -> None:
    assert ncu.main(["--out", str(tmp_path), "--dry-run", "--shapes", f"{DECODER},vit_h_encoder"]) == 0
    out = capsys.readouterr().out
    assert "--kernel-name 'regex:^_attention_'" in out and f"--metrics {','.join(ncu.METRICS)}" in out
    assert "--profile-from-start off" in out and f"--child {DECODER}" in out and "--page raw --csv" in out
    assert f"{DECODER} (256, 197, 16, 32)" in out and "floor 118.3 us" in out and "floor 97.6 us" in out
    assert not (tmp_path / "reports").exists()  # nothing run


@pytest.mark.parametrize("argv,message", [
    (["--shapes", "decoder"], "unknown shape 'decoder'"),
    (["--ncu", "/nonexistent/ncu"], "no ncu binary (/nonexistent/ncu)"),
])
def test_errors_are_one_line(ncu, tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],  # noqa: ANN001
                             message: str) -> None:
    assert ncu.main(["--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def _fake_ncu(tmp_path: Path, profile_status: int) -> Path:
    """An ``ncu`` that answers ``--import`` with the fixture, and a profile run with ``profile_status``."""
    fake = tmp_path / "ncu"
    fake.write_text(f"""#!/bin/sh
case "$*" in *--import*) cat '{FIXTURE}'; exit 0;; esac
echo '==PROF== Connected to process 1'
[ {profile_status} -eq 0 ] || echo '==ERROR== Failed to find metric sm__made_up.sum' >&2
exit {profile_status}
""")
    fake.chmod(0o755)
    return fake


def test_run_writes_the_rows_and_summary(ncu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                         capsys: pytest.CaptureFixture) -> None:
    """The orchestration with ncu and the GPU stood in for: an ncu replying with the fixture, a matmul rate."""
    import fastmae.benchmark.peak

    monkeypatch.setattr(ncu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fastmae.benchmark.peak, "measure_matmul_tflops", lambda device: 780.0)
    out = tmp_path / "out"
    assert ncu.main(["--out", str(out), "--shapes", DECODER, "--ncu", str(_fake_ncu(tmp_path, 0))]) == 0
    with open(out / "ncu_attention.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["shape"], r["kernel"]) for r in rows] == [(DECODER, k) for k in ncu.expected_kernels(197, 32)]
    assert float(rows[2][ncu.DURATION]) == 352_736.0 and rows[2][ncu.SPILLS[0]] == "1048576.0"
    summary = (out / "ncu_attention.md").read_text()
    assert "6.7x the floor" in summary and "at the measured matmul rate" in summary
    assert summary in capsys.readouterr().out
    assert "==PROF== Connected" in (out / "reports" / f"{DECODER}.log").read_text()


def test_a_failing_ncu_is_named_in_one_line(ncu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(ncu.torch.cuda, "is_available", lambda: True)
    argv = ["--out", str(tmp_path / "out"), "--shapes", DECODER, "--ncu", str(_fake_ncu(tmp_path, 1))]
    assert ncu.main(argv) == 1
    err = capsys.readouterr().err
    assert f"ncu failed on {DECODER} (rc 1" in err and "Failed to find metric sm__made_up.sum" in err
    assert err.count("\n") == 1 and not (tmp_path / "out" / "ncu_attention.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_the_cli_exits_2_without_a_traceback(tmp_path: Path) -> None:
    fake = tmp_path / "ncu"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    run = subprocess.run([sys.executable, str(BENCH / "ncu_attention.py"), "--out", str(tmp_path), "--ncu", str(fake)],
                         check=False, capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert run.returncode == 2 and "no CUDA device" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.gpu
def test_profiles_a_small_decoder_shape(ncu, tmp_path: Path) -> None:  # noqa: ANN001
    if ncu.find_ncu(None) is None:
        pytest.skip("Nsight Compute (ncu) is not installed on this machine")
    run = subprocess.run([sys.executable, str(BENCH / "ncu_attention.py"), "--out", str(tmp_path), "--shapes",
                          "8x197x16x32"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if run.returncode == 1 and any(s in run.stderr for s in ("LibraryNotLoaded", "ERR_NVGPUCTRPERM")):
        pytest.skip(f"ncu cannot read this GPU's counters here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stdout + run.stderr
    with open(tmp_path / "ncu_attention.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["kernel"] for r in rows] == ncu.expected_kernels(197, 32)
    assert all(float(r[ncu.DURATION]) > 0 and 0 < float(r[ncu.SM]) <= 100 for r in rows), rows
    assert "x the floor" in (tmp_path / "ncu_attention.md").read_text()
