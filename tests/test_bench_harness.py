"""``fastmae bench`` end to end on CPU with the tiny preset, the CSV upsert and compare, the MFU arithmetic."""

from __future__ import annotations

import csv
import importlib.util
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fastmae.benchmark import baselines
from fastmae.benchmark.baselines import steps as baseline_steps
from fastmae.benchmark.peak import mfu, spec_tflops
from fastmae.benchmark.registry import BASELINE_IMPLS, CPU_DEFAULT_IMPLS, load_builders, unavailable_reason
from fastmae.benchmark.report import best_baselines, format_table, speedups
from fastmae.benchmark.results import COLUMNS, CPU_ONLY_EMPTY, read_rows, upsert_rows
from fastmae.benchmark.run import (
    CPU_DEFAULTS,
    DEFAULT_RESULTS_DIR,
    GPU_DEFAULTS,
    Attempt,
    BenchConfig,
    RunContext,
    _row,
    _train_flops,
    bench_defaults,
    run_bench,
)
from fastmae.benchmark.timing import Timing
from fastmae.benchmark.train_step import TrainStep, build_fastmae_step
from fastmae.cli import main
from fastmae.flops import mae_flops
from fastmae.model import PRESETS

ROOT = Path(__file__).resolve().parents[1]
TINY = "mae_vit_tiny_patch16"
Run = Callable[[torch.Tensor], torch.Tensor]


def _oom(imgs: torch.Tensor) -> torch.Tensor:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")


def _fake(impl: str, run_for_batch: Callable[[int, Run], Run]) -> Callable[..., TrainStep]:
    """A stand-in baseline builder: fastmae's eager step relabelled ``impl``, running ``run_for_batch(batch, run)``."""
    def build(model_name: str, batch_size: int, img_size: int, device: torch.device) -> TrainStep:
        step = build_fastmae_step("fastmae", model_name, batch_size, img_size, device)
        step.impl, step.run = impl, run_for_batch(batch_size, step.run)
        return step

    return build


def _fail(imgs: torch.Tensor) -> torch.Tensor:
    raise ValueError("simulated failure\nsecond line")


@pytest.fixture
def fake_baselines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in baselines: official runs out of memory above batch 2, modern always, hf fails otherwise."""
    monkeypatch.setitem(baseline_steps.BUILDERS, "official", _fake("official", lambda b, run: _oom if b > 2 else run))
    monkeypatch.setitem(baseline_steps.BUILDERS, "modern", _fake("modern", lambda b, run: _oom))
    monkeypatch.setitem(baseline_steps.BUILDERS, "hf", _fake("hf", lambda b, run: _fail))
    monkeypatch.setattr(baseline_steps, "NEEDS_TRANSFORMERS", ())  # the fake hf runs without transformers


@pytest.fixture(autouse=True)
def one_thread() -> None:
    """Tiny steps on a shared 2-core machine: more threads only oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("fake_baselines")
def test_cli_end_to_end_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--models", TINY, "--impls", "fastmae,hf,modern,official,fastmae-reference,fastmae-cudagraph",
                 "--batch-size", "4", "--img-size", "64", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--results-dir", str(tmp_path / "results")])
    out = capsys.readouterr().out
    assert code == 1, out  # the hf row failed
    rows = {r["impl"]: r for r in read_rows(tmp_path / "results" / "cpu.csv")}
    assert set(rows) == {"fastmae", "hf", "modern", "official", "fastmae-reference"}  # skipped rows are not written
    with open(tmp_path / "results" / "cpu.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    row = rows["fastmae"]
    assert row["status"] == "ok"
    for column in COLUMNS:
        if column in CPU_ONLY_EMPTY:
            assert row[column] == "", column
        else:
            assert row[column] != "", column
    assert (row["gpu"], row["model"], row["batch"], row["batch_used"], row["img_size"], row["dtype"]) == \
           ("cpu", TINY, "4", "4", "64", "fp32")
    assert (row["compile"], row["cuda_graph"], row["input"], row["steps"]) == ("false", "false", "synthetic", "2")
    assert float(row["img_per_s"]) == pytest.approx(4e3 / float(row["ms_per_step"]), rel=0.01)
    assert row["torch"] == torch.__version__
    assert float(row["gflops_per_img"]) == pytest.approx(_train_flops(TINY, 64) / 1e9, abs=0.005)
    assert rows["fastmae-reference"]["status"] == "ok"  # ran after the hf row failed
    assert (rows["official"]["status"], rows["official"]["batch"], rows["official"]["batch_used"]) == ("ok", "4", "2")
    assert (rows["modern"]["status"], rows["modern"]["batch_used"], rows["modern"]["img_per_s"]) == ("oom", "2", "")
    assert rows["hf"]["status"] == "error: ValueError: simulated failure | second line"
    assert "skipped: fastmae-cudagraph: CUDA graphs need a CUDA device, got cpu" in out
    assert "fastmae bench: no CUDA device" not in out  # every default-able flag was given: no CPU-defaults note
    fastmae_line = next(line for line in out.splitlines() if line.startswith(TINY) and " fastmae " in line)
    speedup = float(row["img_per_s"]) / float(rows["official"]["img_per_s"])
    assert fastmae_line.count(f"{speedup:.2f}x") == 2  # over official, which is also the best baseline (modern oom)
    assert f"best baseline for {TINY} synthetic 64px: official" in out


def test_loader_input_and_time_budget(tmp_path: Path) -> None:
    from fastmae.data import demo_dataset

    data = demo_dataset(tmp_path / "cache", crops_per_photo=1, size=64)  # 9 JPEGs
    cfg = BenchConfig(models=(TINY,), impls=("fastmae",), batch_sizes=(3,), img_size=64, steps=1, warmup=1,
                      inputs=("loader",), results_dir=tmp_path / "results", device="cpu", data_dir=data,
                      loader_workers=0)
    rows, csv_path = run_bench(cfg, log=lambda line: None)
    assert [(r["input"], r["status"]) for r in rows] == [("loader", "ok")]
    assert read_rows(csv_path)[0]["input"] == "loader"
    cfg.max_seconds, cfg.impls = 1e-9, ("fastmae", "fastmae-reference")
    rows, _ = run_bench(cfg, log=lambda line: None)
    assert [r["status"] for r in rows] == ["skipped: time budget of 1e-09 s spent"] * 2
    assert len(read_rows(csv_path)) == 1  # nothing written, nothing replaced


def _result(impl: str, img_per_s: float, batch: int = 256, status: str = "ok") -> dict[str, object]:
    return {"gpu": "NVIDIA H100 80GB HBM3", "impl": impl, "model": "mae_vit_large_patch16", "batch": batch,
            "img_size": 224, "dtype": "bf16", "compile": "false", "cuda_graph": "false", "input": "synthetic",
            "img_per_s": img_per_s, "status": status}


def test_upsert_replaces_the_matching_row_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "gpu.csv"
    upsert_rows(path, [_result("fastmae", 3000.0), _result("modern", 2000.0), _result("fastmae", 1500.0, batch=128)])
    upsert_rows(path, [_result("fastmae", 3300.0), _result("hf", 1800.0)])
    rows = read_rows(path)
    assert [(r["impl"], r["batch"], r["img_per_s"]) for r in rows] == [
        ("fastmae", "256", "3300.0"), ("modern", "256", "2000.0"), ("fastmae", "128", "1500.0"),
        ("hf", "256", "1800.0")]
    assert [p.name for p in tmp_path.iterdir()] == ["gpu.csv"]  # the temporary file was renamed into place
    with pytest.raises(ValueError, match="key columns"):
        upsert_rows(path, [{"impl": "fastmae"}])


def test_a_failed_row_never_replaces_a_measured_one(tmp_path: Path) -> None:
    path = tmp_path / "gpu.csv"
    upsert_rows(path, [_result("fastmae", 3000.0), _result("modern", 0.0, status="error: boom")])
    upsert_rows(path, [_result("fastmae", 0.0, status="oom"), _result("modern", 2000.0)])
    assert [(r["impl"], r["img_per_s"], r["status"]) for r in read_rows(path)] == [
        ("fastmae", "3000.0", "ok"), ("modern", "2000.0", "ok")]


def test_upsert_gives_the_csv_ordinary_permissions_and_keeps_them(tmp_path: Path) -> None:
    """The atomic rename must not leave mkstemp's owner-only 0o600 on the results file."""
    path = tmp_path / "gpu.csv"
    umask = os.umask(0o022)
    try:
        upsert_rows(path, [_result("fastmae", 3000.0)])
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.chmod(0o664)
    upsert_rows(path, [_result("modern", 2000.0)])
    assert stat.S_IMODE(path.stat().st_mode) == 0o664


def _load_bench_script(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loader_csv_upsert_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/bench_loader.py's CSV: a write that fails halfway leaves the old rows whole, no temporary file."""
    bench_loader = _load_bench_script("bench_loader")
    path = tmp_path / "gpu-loader.csv"
    row = {"backend": "torch", "device": "cpu", "batch": 8, "img_size": 64, "img_per_s": 100.0}
    bench_loader.upsert_rows(path, [row, {**row, "backend": "dali", "img_per_s": 300.0}])
    before = path.read_text()

    def fail_halfway(self, rows) -> None:  # noqa: ANN001
        self.writerow(next(iter(rows)))
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="simulated"):
        patch.setattr(csv.DictWriter, "writerows", fail_halfway)
        bench_loader.upsert_rows(path, [{**row, "img_per_s": 200.0}])
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    bench_loader.upsert_rows(path, [{**row, "img_per_s": 200.0}])
    assert [(r["backend"], r["img_per_s"]) for r in read_rows(path)] == [("dali", "300.0"), ("torch", "200.0")]


def test_compare_flags_a_regression(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    upsert_rows(old, [_result("fastmae", 3000.0), _result("modern", 2000.0), _result("hf", 1000.0)])
    upsert_rows(new, [_result("fastmae", 2800.0), _result("modern", 1950.0), _result("hf", 0.0, status="oom")])
    assert main(["bench", "--compare", str(old), "--against", str(new)]) == 1  # 2800 is 6.7% below 3000
    out = capsys.readouterr().out
    regressions = [line for line in out.splitlines() if "REGRESSION" in line]
    assert len(regressions) == 1 and " fastmae " in regressions[0] and "x0.933" in regressions[0]
    assert " modern " in out and " hf " not in out  # 2.5% slower is no regression; an oom row is not compared
    upsert_rows(new, [_result("fastmae", 2900.0)])
    assert main(["bench", "--compare", str(old), "--against", str(new)]) == 0


def test_unknown_names_are_value_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="unknown impl.*'fastmea'"):
        BenchConfig(models=(TINY,), impls=("fastmea",))
    with pytest.raises(ValueError, match="unknown model 'mae_vit_giant'"):
        BenchConfig(models=("mae_vit_giant",))
    with pytest.raises(ValueError, match="unknown input mode"):
        BenchConfig(models=(TINY,), inputs=("dali",))
    with pytest.raises(ValueError, match="one per model"):
        BenchConfig(models=(TINY,), batch_sizes=(4, 8))
    with pytest.raises(ValueError, match="device must be cuda, cuda:N or cpu, got 'mps'"):
        BenchConfig(models=(TINY,), device="mps")
    with pytest.raises(TypeError, match="device must be a str, a torch.device or None, got int"):
        BenchConfig(models=(TINY,), device=0)
    assert main(["bench", "--models", TINY, "--impls", "nope", "--device", "cpu"]) == 2
    assert "unknown impl(s) ['nope']" in capsys.readouterr().err


def test_baseline_builders_come_from_the_package_or_are_skipped_with_the_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The baselines are in fastmae.benchmark.baselines; what cannot run on a CPU is skipped, with why."""
    assert Path(baselines.__file__).parent == ROOT / "fastmae" / "benchmark" / "baselines"
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if transformers were not installed
    cpu = torch.device("cpu")
    builders = load_builders(("fastmae", "official", "modern", "modern-cudagraph", "hf", "hf-compile",
                              "fastmae-compile-cudagraph"), cpu)
    assert set(builders.builders) == {"fastmae", "official", "modern"}
    assert builders.builders["fastmae"].func is build_fastmae_step and builders.builders["fastmae"].args == ("fastmae",)
    assert builders.builders["official"] is baseline_steps.build_official_step
    assert builders.builders["modern"] is baseline_steps.BUILDERS["modern"]
    assert builders.unavailable == {
        "modern-cudagraph": "modern-cudagraph: CUDA graphs need a CUDA device, got cpu",
        "hf": "hf: transformers is not installed (pip install transformers)",
        "hf-compile": "hf-compile: transformers is not installed (pip install transformers)",
        "fastmae-compile-cudagraph": "fastmae-compile-cudagraph: CUDA graphs need a CUDA device, got cpu",
    }
    with pytest.raises(ValueError, match=r"unknown impl\(s\) \['nope'\]"):
        unavailable_reason("nope", cpu)


def test_cpu_defaults_results_in_the_current_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CUDA and without --models/--impls/--batch-size: the tiny preset, batch 8, the implementations
    that run on a CPU, a note saying so; the CSV goes to ./bench-results of the current directory, never
    into the source tree."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    monkeypatch.chdir(tmp_path)
    committed = ROOT / "bench" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in committed.iterdir()} if committed.is_dir() else {}
    cfg = BenchConfig()
    expected_impls = tuple(i for i in CPU_DEFAULT_IMPLS if unavailable_reason(i, torch.device("cpu")) is None)
    assert (cfg.device, cfg.models, cfg.batch_sizes, cfg.steps, cfg.warmup, cfg.impls) == (
        torch.device("cpu"), (TINY,), (8,), 3, 1, expected_impls)
    assert set(cfg.defaults_used) == {"models", "impls", "batch_sizes", "steps", "warmup"}
    assert {"fastmae", "fastmae-reference", "official", "modern"} <= set(expected_impls)
    assert not {"fastmae-compile", "hf-compile", "modern-cudagraph", "fastmae-cudagraph"} & set(expected_impls)

    assert main(["bench", "--steps", "1", "--warmup", "0", "--img-size", "64"]) == 0  # kept fast: 1 step, 64 px
    out = capsys.readouterr().out
    note = next(line for line in out.splitlines() if line.startswith("fastmae bench: no CUDA device"))
    assert f"--models {TINY} --impls {','.join(expected_impls)} --batch-size 8." in note
    assert "--steps" not in note.split("On a CUDA device")[0]  # given on the command line: not a default
    assert f"--models {','.join(GPU_DEFAULTS.models)} --batch-size 256" in note
    assert not DEFAULT_RESULTS_DIR.is_absolute()
    rows = read_rows(tmp_path / "bench-results" / "cpu.csv")
    assert [(r["impl"], r["model"], r["batch"], r["status"]) for r in rows] == [
        (impl, TINY, "8", "ok") for impl in expected_impls]
    after = {p.name: p.stat().st_mtime_ns for p in committed.iterdir()} if committed.is_dir() else {}
    assert after == before  # bench/results (the committed GPU results) untouched


def test_gpu_defaults_are_the_full_set() -> None:
    """On CUDA: ViT-B/L/H at batch 256 and every baseline, the compiled and CUDA-graphed ones included."""
    assert bench_defaults(torch.device("cuda")) == GPU_DEFAULTS
    assert (GPU_DEFAULTS.models, GPU_DEFAULTS.batch_size) == (
        ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"), 256)
    pretraining_baselines = {"official", "modern", "modern-cudagraph", "hf", "hf-compile"}
    assert set(BASELINE_IMPLS) == pretraining_baselines | {"timm", "timm-compile"}  # + fine-tuning's
    assert pretraining_baselines <= set(GPU_DEFAULTS.impls)
    assert {"fastmae", "fastmae-compile", "fastmae-cudagraph"} <= set(GPU_DEFAULTS.impls)
    assert CPU_DEFAULTS.models == (TINY,) and CPU_DEFAULTS.batch_size == 8


def _speed_row(impl: str, img_per_s: float | None, model: str = "mae_vit_large_patch16",
               status: str = "ok") -> dict[str, object]:
    return {"impl": impl, "model": model, "input": "synthetic", "img_size": 224, "batch": 256,
            "img_per_s": None if img_per_s is None else f"{img_per_s:.1f}", "status": status}


@pytest.mark.parametrize("best", ["modern-cudagraph", "hf-compile", "hf"])
def test_ratio_is_against_the_best_baseline_whichever_it_is(best: str) -> None:
    """The "x best baseline" column divides by the fastest ok baseline row of the same model, input and
    size; fastmae's own rows, failed rows and other models never count as the baseline."""
    speeds = {"official": 1000.0, "modern": 2000.0, "modern-cudagraph": 2100.0, "hf": 1500.0, "hf-compile": 1900.0}
    speeds[best] = 2500.0
    rows = [_speed_row(impl, speed) for impl, speed in speeds.items()]
    rows += [_speed_row("fastmae-cudagraph", 3000.0), _speed_row("fastmae", 9000.0, status="error: boom"),
             _speed_row("modern", 4000.0, status="oom"), _speed_row("hf", 5000.0, model="mae_vit_base_patch16")]
    assert best_baselines(rows)[("mae_vit_large_patch16", "synthetic", "224")]["impl"] == best
    ratios = dict(zip((r["impl"] for r in rows[:6]), speedups(rows)[:6]))
    assert ratios["fastmae-cudagraph"] == {"official": 3.0, "best baseline": 1.2}
    assert ratios[best] == {"official": 2.5, "best baseline": 1.0}
    table = format_table(rows)
    assert f"best baseline for mae_vit_large_patch16 synthetic 224px: {best} (2500.0 img/s)" in table
    assert "best baseline for mae_vit_base_patch16 synthetic 224px: hf (5000.0 img/s)" in table


def test_mfu_arithmetic_and_the_flop_count() -> None:
    with torch.device("meta"):
        expected = mae_flops(PRESETS["mae_vit_large_patch16"](img_size=224), 0.75).train_step
    assert _train_flops("mae_vit_large_patch16", 224) == expected
    assert round(expected / 1e9, 1) == 124.5  # DESIGN.md's ViT-L/16 training FLOPs per image
    assert mfu(expected, 3200.0, 790.0) == pytest.approx(expected * 3200.0 / 790e12)
    assert mfu(expected, 3200.0, None) is None
    ctx = RunContext(torch.device("cuda"), "NVIDIA H100 80GB HBM3", Path("x.csv"), 800.0, 989.0,
                     {"torch": "t", "triton": "t", "cuda": "c", "git_rev": "g"})
    cfg = BenchConfig(models=("mae_vit_large_patch16",), impls=("fastmae",), device="cpu")
    timing = Timing(batch_size=256, steps=10, seconds=0.8, warmup_seconds=1.0, peak_mem_bytes=3 * 2**30, loss=0.5)
    attempt = Attempt("ok", {"dtype": "bf16", "compile": False, "cuda_graph": True}, timing, setup_s=2.0)
    row = _row(ctx, cfg, "fastmae-cudagraph", "mae_vit_large_patch16", "synthetic", 256, attempt, expected)
    assert row["img_per_s"] == "3200.0" and row["ms_per_step"] == "80.00" and row["peak_mem_gib"] == "3.000"
    assert float(row["mfu_measured"]) == pytest.approx(expected * 3200 / 800e12, abs=1e-4)
    assert float(row["mfu_spec"]) == pytest.approx(expected * 3200 / 989e12, abs=1e-4)
    assert (row["cuda_graph"], row["compile"]) == ("true", "false")


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10", 125.0), ("NVIDIA A10G", None),
    ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA GH200 480GB", 989.0), ("Tesla V100-SXM2-16GB", None),
])
def test_spec_table(name: str, tflops: float | None) -> None:
    assert spec_tflops(name) == tflops


def test_plot_script_writes_pngs(tmp_path: Path) -> None:
    path = tmp_path / "nvidia-h100-80gb-hbm3.csv"
    upsert_rows(path, [_result("fastmae", 3000.0), _result("modern", 2000.0), _result("hf", 0.0, status="oom")])
    spec = importlib.util.spec_from_file_location("plot_results", ROOT / "bench" / "plot_results.py")
    plot_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_results)
    assert plot_results.main([str(path)]) == 0
    png = tmp_path / "nvidia-h100-80gb-hbm3-synthetic.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
def test_fastmae_variants_on_gpu(tmp_path: Path) -> None:
    """Eager, CUDA-graph and reference fastmae steps on CUDA: every column filled, MFU and memory plausible."""
    cfg = BenchConfig(models=(TINY,), impls=("fastmae", "fastmae-cudagraph", "fastmae-reference"), batch_sizes=(16,),
                      img_size=64, steps=5, warmup=3, results_dir=tmp_path, device="cuda")
    rows, csv_path = run_bench(cfg, log=lambda line: None)
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    for row in read_rows(csv_path):
        assert all(row[c] != "" for c in COLUMNS if c != "spec_tflops" or spec_tflops(row["gpu"]) is not None), row
        assert 0 < float(row["mfu_measured"]) < 1 and float(row["peak_mem_gib"]) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastmae-cudagraph", "modern-cudagraph"])
def test_cuda_graph_step_updates_the_weights_on_every_replay(impl: str) -> None:
    """One CUDA graph per step (modern-cudagraph compiled too): each replay draws a new mask and moves the weights."""
    builders = load_builders((impl,), torch.device("cuda"))
    step = builders.builders[impl](TINY, 8, 64, torch.device("cuda"))
    assert (step.dtype, step.cuda_graph) == ("bf16", True)
    imgs = torch.randn(8, 3, 64, 64, device="cuda")
    weight = step.model.blocks[0].attn.qkv.weight
    losses, before = [], weight.detach().clone()
    for _ in range(3):
        losses.append(float(step.run(imgs)))
        after = weight.detach().clone()
        assert not torch.equal(after, before)  # the optimiser step is inside the graph
        before = after
    assert all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) == 3  # fresh noise and weights each replay
