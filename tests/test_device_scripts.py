"""The prepared GPU checks of bench/device_check.sh (its ``perf`` and ``large`` step sets) and what they run, proven
on the CPU: the script's syntax and plans, bench/make_jpeg_set.py, the checkers of bench/check_runs.py on
synthetic runs, bench/readme_table.py, the ``kernels_per_step`` and ``input_detail`` columns, ``fastmae bench``'s
loader input, a smoke step of the script, and the tie between ``fastmae pretrain``'s default step on CUDA and the
committed H200 results."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from fastmae.benchmark import results
from fastmae.benchmark.registry import impl_of_step
from fastmae.benchmark.run import BenchConfig, run_bench
from fastmae.benchmark.timing import count_kernels, kernels_in_trace
from fastmae.benchmark.train_step import FASTMAE_IMPLS
from fastmae.train.exit_codes import EXIT_NONFINITE

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.sh"
H200_CSV = ROOT / "bench" / "results" / "nvidia-h200.csv"
TINY = "mae_vit_tiny_patch16"


def _bench_module(name: str) -> ModuleType:
    """bench/<name>.py as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_jpeg_set = _bench_module("make_jpeg_set")
check_runs = _bench_module("check_runs")
readme_table = _bench_module("readme_table")


def _script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTMAE_CHECK")}
    env.pop("TRITON_INTERPRET", None)  # the script's own processes decide; this file's conftest set it
    return {**env, **extra}


# --- the script ------------------------------------------------------------------------------------------------
def test_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _plan(step_set: str, smoke: bool, tmp_path: Path) -> list[str]:
    env = _script_env(FASTMAE_CHECK_PLAN="1", **({"FASTMAE_CHECK_SMOKE": "1"} if smoke else {}))
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "plan"), step_set], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_perf_plan_measures_every_implementation_at_one_batch_per_comparison(tmp_path: Path) -> None:
    lines = _plan("perf", smoke=False, tmp_path=tmp_path)
    assert lines[0].startswith("plan (GPU, budget 470 s")
    steps = {line.split()[0]: line for line in lines[1:-1]}
    assert list(steps) == ["perf_install", "perf_256", "perf_compile_L", "perf_attention", "perf_attention_csv",
                           "perf_512", "perf_report"]
    fp8 = [name for name in FASTMAE_IMPLS if "fp8" in name]
    measured = set()
    for name in ("perf_256", "perf_compile_L", "perf_512"):
        words = steps[name].split()
        measured |= set(words[words.index("--impls") + 1].split(","))
        assert words[words.index("--batch-size") + 1] == ("512" if name == "perf_512" else "256")
    assert {"fastmae-cudagraph", "fastmae-compile-cudagraph", "fastmae-cudagraph-bf16params", "modern",
            "modern-cudagraph", "hf", "official", *fp8} <= measured
    assert "mae_vit_base_patch16" in steps["perf_256"] and "mae_vit_huge_patch14" in steps["perf_512"]
    assert "bench/test_bench_attention.py" in steps["perf_attention"]


def test_large_plan_and_its_smoke_twin(tmp_path: Path) -> None:
    gpu = {line.split()[0]: line for line in _plan("large", smoke=False, tmp_path=tmp_path)[1:-1]}
    smoke = {line.split()[0]: line for line in _plan("large", smoke=True, tmp_path=tmp_path)[1:-1]}
    assert list(gpu) == list(smoke) == [
        "large_install", "large_jpegs", "large_loader", "large_dali_restore", "large_parallel", "large_resume",
        "large_nonfinite", "large_bench_rows", "large_memory_rows", "large_memory", "large_train_L", "large_train_H"]
    assert "--count 5000" in gpu["large_jpegs"] and "--batch-size 256 --img-size 224" in gpu["large_loader"]
    assert "--results-dir bench/results" in gpu["large_bench_rows"]
    assert str(tmp_path / "plan" / "results") in smoke["large_bench_rows"]  # a smoke run leaves bench/results alone
    assert "--device cpu" in smoke["large_loader"]


def test_finetune_plan_measures_fastmae_against_timm_eager_and_compiled(tmp_path: Path) -> None:
    lines = _plan("finetune", smoke=False, tmp_path=tmp_path)
    assert lines[0].startswith("plan (GPU, budget 470 s")
    steps = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert list(steps) == ["finetune_install", "finetune_eager", "finetune_compile_L", "finetune_compile_B",
                           "finetune_report"]
    measured: dict[str, set[str]] = {}
    for name in ("finetune_eager", "finetune_compile_L", "finetune_compile_B"):
        words = steps[name]
        assert words[words.index("--task") + 1] == "finetune" and "--img-size 224" in " ".join(words)
        assert words[words.index("--batch-size") + 1] == "128"  # one batch for every row of a comparison
        for model in words[words.index("--models") + 1].split(","):
            measured.setdefault(model, set()).update(words[words.index("--impls") + 1].split(","))
    full = {"fastmae-finetune", "fastmae-finetune-compile", "timm", "timm-compile"}
    assert measured == {"vit_base_patch16": full, "vit_large_patch16": full}


# --- bench/make_jpeg_set.py --------------------------------------------------------------------------------------
def test_make_jpeg_set_writes_imagenet_like_jpegs(tmp_path: Path) -> None:
    out = tmp_path / "set"
    manifest = make_jpeg_set.make_jpeg_set(out, count=12, classes=3, workers=1)
    files = sorted(out.rglob("*.jpg"))
    assert [f.relative_to(out) for f in files] == sorted(make_jpeg_set.relative_path(i, 3) for i in range(12))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["class_000", "class_001", "class_002"]
    sizes = {shape for shape, _ in make_jpeg_set.SIZES}
    for i in range(12):
        path = out / make_jpeg_set.relative_path(i, 3)
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size in sizes
            assert img.size == make_jpeg_set.image_size(0, i)
        encoded = io.BytesIO()
        make_jpeg_set.render(0, i).save(encoded, format="JPEG", quality=90)
        assert path.read_bytes() == encoded.getvalue()  # image i of seed 0 at quality 90, whoever wrote it
    assert 60_000 < manifest["mean_bytes"] < 160_000  # a photo's entropy: ImageNet's files average ~110 KB
    assert make_jpeg_set.make_jpeg_set(out, count=12, classes=3) == manifest  # the same set: reused
    with pytest.raises(ValueError, match="exists and holds no set written with"):
        make_jpeg_set.make_jpeg_set(out, count=13, classes=3)
    with pytest.raises(ValueError, match="classes must be <= count"):
        make_jpeg_set.make_jpeg_set(tmp_path / "other", count=2, classes=3)


def test_make_jpeg_set_command_with_worker_processes(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "make_jpeg_set.py"), str(tmp_path / "set"), "--count",
                           "6", "--classes", "2", "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "6 JPEGs (quality 90, 2 classes" in done.stdout and "2 processes" in done.stdout
    single = make_jpeg_set.make_jpeg_set(tmp_path / "single", count=6, classes=2, workers=1)
    for i in range(6):  # the processes wrote the same files as one process does
        rel = make_jpeg_set.relative_path(i, 2)
        assert (tmp_path / "set" / rel).read_bytes() == (tmp_path / "single" / rel).read_bytes()
    assert single["count"] == 6


# --- bench/check_runs.py ----------------------------------------------------------------------------------------
def _run(folder: Path, losses: dict[int, float], img_per_s: float = 100.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for step, loss in losses.items():
            f.write(json.dumps({"step": step, "loss": loss, "lr": 1e-4, "img_per_s": img_per_s}) + "\n")
    return folder


def test_loss_checker(tmp_path: Path) -> None:
    ref = _run(tmp_path / "ref", {1: 1.0, 2: 0.9, 3: 0.8})
    close = _run(tmp_path / "close", {1: 1.004, 2: 0.9, 3: 0.801})
    assert check_runs.main(["losses", str(ref), str(close), "--rtol", "0.01"]) == 0
    assert check_runs.main(["losses", str(ref), str(close), "--rtol", "0.001"]) == 1
    assert check_runs.main(["losses", str(ref), str(close)]) == 1  # rtol 0: bit for bit
    resumed = _run(tmp_path / "resumed", {1: 1.0, 2: 0.9, 3: 0.5})
    with open(resumed / "metrics.jsonl", "a") as f:  # logged before the preemption, again after the resume
        f.write(json.dumps({"step": 3, "loss": 0.8}) + "\n")
    assert check_runs.compare_losses(ref, [resumed], 0.0, 0.0)[0].startswith(f"{resumed}: steps 1-3 match")
    short = _run(tmp_path / "short", {1: 1.0, 2: 0.9})
    with pytest.raises(check_runs.CheckFailed, match="step 3 loss None"):
        check_runs.compare_losses(ref, [short], 0.1, 0.0)
    with pytest.raises(check_runs.CheckFailed, match="does not exist"):
        check_runs.compare_losses(ref, [tmp_path / "nowhere"], 0.1, 0.0)


def test_nonfinite_checker(tmp_path: Path) -> None:
    assert check_runs.EXIT_NONFINITE == EXIT_NONFINITE
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(3), "steps": torch.tensor(2)}}, run / "checkpoints" / "ckpt-00000002.pt")
    log = tmp_path / "log.txt"
    log.write_text("fastmae pretrain: 1 rank(s) (one process) on cuda, bf16, optimizer torch.optim.AdamW(fused=True)\n"
                   "fastmae pretrain (rank 0): step 5: non-finite loss on rank 0; 3 consecutive steps skipped\n")
    args = ["nonfinite", str(run), "--log", str(log), "--max-nonfinite", "3"]
    assert check_runs.main([*args, "--exit-code", "3"]) == 0
    assert check_runs.main([*args, "--exit-code", "0"]) == 1
    assert check_runs.main([*args[:-1], "4", "--exit-code", "3"]) == 1  # the log names another streak
    log.write_text(log.read_text() + "host sync per step for the non-finite check\n")
    assert check_runs.main([*args, "--exit-code", "3"]) == 1
    assert check_runs.main([*args, "--exit-code", "3", "--host-skip-ok"]) == 0
    torch.save({"model": {"w": torch.tensor([1.0, float("nan")])}}, run / "checkpoints" / "ckpt-00000004.pt")
    with pytest.raises(check_runs.CheckFailed, match=r"non-finite weights in \['w'\]"):
        check_runs.check_nonfinite(run, log, 3, 3, host_skip_ok=True)


def _bench_csv(path: Path, rows: list[tuple[str, str, str, float | None]]) -> Path:
    """rows: (impl, input, peak GiB or "", img/s) of mae_vit_huge_patch14 at batch 256."""
    results.upsert_rows(path, [{"impl": impl, "model": "mae_vit_huge_patch14", "batch": 256, "img_size": 224,
                                "dtype": "bf16", "compile": "false", "cuda_graph": "false", "input": mode,
                                "peak_mem_gib": peak, "img_per_s": speed, "status": "ok"}
                               for impl, mode, peak, speed in rows])
    return path


def test_throughput_and_memory_checkers(tmp_path: Path) -> None:
    csv_path = _bench_csv(tmp_path / "gpu.csv", [("fastmae-cudagraph", "synthetic", "41.8", 1200.0),
                                                 ("fastmae-cudagraph", "loader-dali", "41.9", 1150.0),
                                                 ("fastmae", "synthetic", "44.0", 1100.0),
                                                 ("fastmae-actckpt", "synthetic", "20.5", 900.0)])
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 10 * k, "loss": 1.0, "img_per_s": speed} for k, speed in enumerate([300.0, 1000, 1100, 1050], 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["throughput", str(run), "--csv", str(csv_path), "--model", "mae_vit_huge_patch14", "--impl",
            "fastmae-cudagraph", "--batch", "256"]
    lines = check_runs.check_throughput(run, csv_path, "mae_vit_huge_patch14", "fastmae-cudagraph", 256, 0.8)
    assert "1050.0 img/s, median of 3 intervals" in lines[0]  # the first interval (start-up) left out
    assert any("input loader-dali: 1150.0 img/s" in line for line in lines)
    assert check_runs.main([*args, "--min-ratio", "0.9"]) == 1  # 1050 / 1200 = 0.875
    assert check_runs.main([*args, "--impl", "hf"]) == 1  # no such row
    assert check_runs.main(["memory", str(csv_path), "--model", "mae_vit_huge_patch14", "--batch", "256"]) == 0
    assert check_runs.main(["memory", str(csv_path), "--model", "mae_vit_huge_patch14", "--batch", "256",
                            "--max-gib", "40"]) == 1
    cpu = _bench_csv(tmp_path / "cpu.csv", [("fastmae", "synthetic", "", 10.0),
                                            ("fastmae-actckpt", "synthetic", "", 9.0)])
    assert "no peak memory" in check_runs.check_memory(cpu, "mae_vit_huge_patch14", 256, 80.0)[0]


# --- bench/readme_table.py --------------------------------------------------------------------------------------
def test_readme_table_rewrites_only_between_the_markers(tmp_path: Path) -> None:
    csv_path = tmp_path / "gpu.csv"
    base = {"gpu": "NVIDIA H200", "model": "mae_vit_large_patch16", "img_size": 224, "mask_ratio": 0.75,
            "dtype": "bf16", "compile": "false", "cuda_graph": "false", "input": "synthetic", "status": "ok",
            "gflops_per_img": 124.53, "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "git_rev": "abc",
            "date": "2026-11-27T09:20:04+00:00"}
    results.upsert_rows(csv_path, [
        {**base, "impl": "official", "batch": 256, "batch_used": 256, "img_per_s": 1000.0, "dtype": "fp16"},
        {**base, "impl": "modern-cudagraph", "batch": 256, "batch_used": 256, "img_per_s": 2000.0},
        {**base, "impl": "fastmae-cudagraph", "batch": 256, "batch_used": 256, "img_per_s": 3000.0,
         "kernels_per_step": 812, "mfu_measured": 0.5},
        {**base, "impl": "modern-cudagraph", "batch": 512, "batch_used": 512, "img_per_s": 2600.0},
        {**base, "impl": "fastmae-cudagraph", "batch": 512, "batch_used": 512, "img_per_s": 3900.0},
        {**base, "impl": "official", "batch": 512, "batch_used": 256, "img_per_s": 1100.0},  # fell back to half
        {**base, "impl": "hf", "batch": 256, "batch_used": 256, "img_per_s": None, "status": "oom"},
    ])
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\ntext before\n{readme_table.BEGIN}\nstale table\n{readme_table.END}\ntext after\n")
    assert readme_table.main([str(csv_path), str(readme), "--check"]) == 1
    assert readme_table.main([str(csv_path), str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"# title\n\ntext before\n{readme_table.BEGIN}\n| model |") and "stale" not in text
    assert text.endswith(f"{readme_table.END}\ntext after\n")
    rows = [line for line in text.splitlines() if line.startswith("| mae_vit")]
    assert rows[0] == ("| mae_vit_large_patch16 | 256 | `fastmae-cudagraph` | bf16 | 3,000 | 50.0% | 3.00x | 1.50x "
                       "| 812 |  |")
    assert "| 512 | `fastmae-cudagraph` | bf16 | 3,900 |  |  | 1.50x |" in rows[3]  # no official at 512: no ratio
    assert "| 512 (ran 256: out of memory) | `official`" in rows[5] and rows[5].endswith("|  |  |  |  |")
    assert not any("`hf`" in row for row in rows)  # only ok rows
    assert readme_table.main([str(csv_path), str(readme), "--check"]) == 0
    readme.write_text("no markers\n")
    assert readme_table.main([str(csv_path), str(readme)]) == 2
    assert readme_table.main([str(csv_path), "--table-out", str(tmp_path / "table.md")]) == 0
    assert (tmp_path / "table.md").read_text().startswith("| model | batch |")


def test_the_readme_table_is_the_committed_csv() -> None:
    """The README's results table is what bench/readme_table.py makes of bench/results/nvidia-h200.csv."""
    assert readme_table.main([str(ROOT / "bench/results/nvidia-h200.csv"), str(ROOT / "README.md"), "--check"]) == 0


# --- the results columns: kernels per step, which input -----------------------------------------------------------
def test_kernel_count_of_a_trace() -> None:
    trace = {"traceEvents": [{"cat": "kernel", "name": "gemm"}, {"cat": "kernel", "name": "softmax"},
                             {"cat": "gpu_memcpy", "name": "Memcpy DtoD"}, {"cat": "gpu_memset"},
                             {"cat": "cuda_runtime", "name": "cudaGraphLaunch"}, {"ph": "M"}]}
    assert kernels_in_trace(trace) == 2
    with pytest.raises(ValueError, match="traceEvents list"):
        kernels_in_trace({"events": []})
    assert count_kernels(None, lambda: torch.zeros(1), torch.device("cpu")) is None  # no CUDA, no count
    assert {"kernels_per_step", "input_detail"} <= set(results.COLUMNS)
    assert "kernels_per_step" in results.CPU_ONLY_EMPTY


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jpegs") / "set"
    make_jpeg_set.make_jpeg_set(root, count=8, classes=2, workers=1)
    return root


@pytest.mark.usefixtures("one_thread")
def test_loader_row_beside_the_synthetic_row(tiny_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = BenchConfig(models=(TINY,), impls=("fastmae",), batch_sizes=(4,), img_size=32, steps=1, warmup=1,
                      inputs=("synthetic", "loader-torch"), results_dir=tmp_path / "results", device="cpu",
                      data_dir=tiny_set, loader_workers=0)
    rows, csv_path = run_bench(cfg, log=lambda line: None)
    by_input = {r["input"]: r for r in rows}
    assert [by_input[m]["status"] for m in ("synthetic", "loader-torch")] == ["ok", "ok"]
    assert by_input["synthetic"]["input_detail"].startswith("synthetic: one random (4, 3, 32, 32) batch on cpu")
    detail = by_input["loader-torch"]["input_detail"]
    assert detail.startswith("torch loader (PIL decode in-process), 8 images") and detail.endswith(f"from {tiny_set}")
    assert all(r["kernels_per_step"] is None for r in rows)  # counted on CUDA only
    written = {r["input"]: r for r in results.read_rows(csv_path)}
    assert written["loader-torch"]["input_detail"] == detail and written["loader-torch"]["kernels_per_step"] == ""
    import fastmae.data.loader

    monkeypatch.setattr(fastmae.data.loader, "dali_available", lambda: False)
    cfg.inputs = ("loader-dali",)
    rows, _ = run_bench(cfg, log=lambda line: None)
    assert rows[0]["status"] == ("skipped: input loader-dali: NVIDIA DALI is not installed (pip install "
                                 "nvidia-dali-cuda130)")


# --- a smoke step of the script -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_nan_step_stops_with_exit_3(tmp_path: Path) -> None:
    """The large set's NaN check, run by the script in smoke mode: tiny model, CPU, torch loader."""
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(SCRIPT), str(out), "large"], capture_output=True, text=True, timeout=600,
                          env=_script_env(FASTMAE_CHECK_SMOKE="1", FASTMAE_CHECK_ONLY="large_jpegs large_nonfinite"))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("large_")}
    assert summary["large_jpegs"].split()[1:3] == ["exit", "0"], summary
    assert summary["large_nonfinite"].split()[1:3] == ["exit", "0"], (out / "large_nonfinite.log").read_text()
    assert "check_runs nonfinite: ok" in (out / "large_nonfinite.log").read_text()
    assert json.loads((out / "jpegs" / make_jpeg_set.MANIFEST).read_text())["count"] == 48


# --- the trainer's default step against the measured results ---------------------------------------------------------
def _h200_rows() -> list[dict[str, str]]:
    with open(H200_CSV, newline="") as f:
        return [r for r in csv.DictReader(f) if r["status"] == "ok" and r["input"] == "synthetic" and r["img_per_s"]]


def _default_cuda_impl(model: str) -> str:
    """The bench variant of the step ``fastmae pretrain --model MODEL`` runs by default on one CUDA GPU."""
    from fastmae.train.config import PretrainConfig
    from fastmae.train.cuda_graph import choose_fast_path

    fast = choose_fast_path(PretrainConfig(data="images", model=model), torch.device("cuda"), 1, "bf16", False)
    return impl_of_step(fast.compile, fast.cuda_graph, fast.param_dtype == "bf16", fast.fp8_recipe is not None)


AUTO_PATHS = {impl_of_step(c, g) for c in (False, True) for g in (False, True)}  # what compile/cuda_graph auto choose


@pytest.mark.parametrize("model", sorted({r["model"] for r in _h200_rows()}))
def test_the_default_step_on_cuda_is_the_fastest_measured_path(model: str) -> None:
    """Ties ``choose_fast_path``'s automatic choice (compile and CUDA graph on, for one CUDA process) to the committed
    H200 results: among fastmae's variants that the automatic settings choose between (compiled or not, CUDA graph or
    not), the default must be the fastest measured at each batch. Opt-ins (fp8, bf16 parameters) are not defaults."""
    default = _default_cuda_impl(model)
    assert default in AUTO_PATHS
    rows = [r for r in _h200_rows() if r["model"] == model and r["impl"] in AUTO_PATHS]
    batches = sorted({r["batch"] for r in rows if r["impl"] == default})
    if not batches:
        pytest.skip(f"{H200_CSV.name} has no row of the default step {default} for {model} yet; bench/device_check.sh "
                    f"perf measures it (measured there: {sorted({r['impl'] for r in rows})})")
    for batch in batches:
        at_batch = {r["impl"]: float(r["img_per_s"]) for r in rows if r["batch"] == batch}
        fastest = max(at_batch, key=at_batch.get)
        assert fastest == default, (f"{model} batch {batch}: {fastest} ({at_batch[fastest]:.0f} img/s) beats the "
                                    f"default {default} ({at_batch[default]:.0f} img/s); change the automatic choice "
                                    "in fastmae.train.cuda_graph.choose_fast_path or remeasure")


def test_bf16_parameters_stay_opt_in_until_measured_faster() -> None:
    """``param_dtype`` auto is fp32 because bf16 parameters are not measured faster: no committed row of
    fastmae-cudagraph-bf16params may beat fastmae-cudagraph at the same model and batch."""
    from fastmae.train.config import PretrainConfig
    from fastmae.train.cuda_graph import choose_fast_path

    cfg = PretrainConfig(data="images", model="mae_vit_large_patch16")
    assert choose_fast_path(cfg, torch.device("cuda"), 1, "bf16", False).param_dtype == "fp32"
    rows = {(r["impl"], r["model"], r["batch"]): float(r["img_per_s"]) for r in _h200_rows()}
    for (impl, model, batch), speed in rows.items():
        if impl == "fastmae-cudagraph-bf16params" and ("fastmae-cudagraph", model, batch) in rows:
            assert speed <= rows[("fastmae-cudagraph", model, batch)], (model, batch)
