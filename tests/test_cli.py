"""``fastmae pretrain`` from the command line: bad settings stop before anything is read or written, a finished
run is left as it is, and building the parser imports no training or benchmark code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmae.cli import main
from fastmae.data import demo_dataset
from fastmae.extension import _why_not_loaded
from fastmae.model import PRESETS
from fastmae.train.checkpoint import list_checkpoints
from fastmae.train.config import PretrainConfig, SettingError, patch_size_of


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_dataset(tmp_path_factory.mktemp("cache"), crops_per_photo=4, size=64)  # 36 images


def _tiny(data: Path, out: Path, steps: int) -> list[str]:
    return ["pretrain", "--data", str(data), "--output", str(out), "--steps", str(steps), "--model",
            "mae_vit_tiny_patch16", "--img-size", "32", "--batch-size", "8", "--log-every", "1", "--save-every", "2",
            "--num-workers", "0", "--device", "cpu", "--loader", "torch", "--no-progress"]


@pytest.mark.parametrize("flags, message", [
    (["--model", "mae_vit_tiny_patch16", "--img-size", "100"], "--img-size must be a multiple of 16, the patch size of mae_vit_tiny_patch16, got 100"),
    (["--model", "mae_vit_tiny_patch16", "--img-size", "32", "--mask-ratio", "0.8"],
     "--mask-ratio must keep at least one of the 4 patches of --img-size 32 (patch size 16) and remove at least one, "
     "i.e. be in (0, 0.75]; got 0.8, which keeps 0"),
    (["--mask-ratio", "0"], "--mask-ratio must be in (0, 1), got 0.0"),
    (["--parallel", "fsdp", "--precision", "fp16"],
     "--precision must be bf16 or fp32 with --parallel fsdp (fp16's loss scaling is not sharded), got fp16"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--data", "/no/such/folder"], "--data must be an image folder or a text file listing image paths, got "
                                    "'/no/such/folder', which does not exist"),
    (["--device", "gpu"], "--device must be a name torch knows, such as cpu, cuda or cuda:1, got 'gpu'"),
])
def test_bad_settings_exit_2_with_one_line_and_touch_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch, flags: list[str],
                                                             message: str) -> None:
    out = tmp_path / "run"
    monkeypatch.setattr("fastmae.train.pretrain.demo_dataset", lambda *_, **__: pytest.fail("the data was touched"))
    assert main(["pretrain", "--output", str(out), *flags]) == 2
    assert capsys.readouterr().err == f"fastmae pretrain: {message}\n"
    assert not out.exists()


def test_a_batch_larger_than_the_data_exits_2_before_writing(tmp_path: Path, demo_root: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = _tiny(demo_root, out, 2)
    assert main([*args, "--batch-size", "40"]) == 2
    assert capsys.readouterr().err == ("fastmae pretrain: 36 images cannot fill one batch of 40 on each of 1 ranks "
                                       f"(--data '{demo_root}', --batch-size 40)\n")
    assert main([*args, "--batch-size", "8", "--accum", "5"]) == 2  # 4 batches of 8, 5 needed per step
    assert capsys.readouterr().err == (f"fastmae pretrain: --batch-size x --accum must fit one step into each rank's "
                                       f"share of the 36 images of '{demo_root}' (1 rank(s)), got 8 x 5\n")
    assert not out.exists()
    (tmp_path / "list.txt").write_text("")
    assert main([*args[:1], "--data", str(tmp_path / "list.txt"), *args[3:]]) == 2
    listing = str(tmp_path / "list.txt")
    assert capsys.readouterr().err.startswith(f"fastmae pretrain: the image list {listing!r} names no files")


def test_the_api_names_config_keys() -> None:
    with pytest.raises(SettingError, match=r"^img_size must be a multiple of 14, the patch size of "
                                           r"mae_vit_huge_patch14, got 96$") as caught:
        PretrainConfig(model="mae_vit_huge_patch14", img_size=96)
    assert caught.value.keys == ("img_size",) and isinstance(caught.value, ValueError)
    PretrainConfig(model="mae_vit_huge_patch14", img_size=224, mask_ratio=0.75)  # 256 patches, 64 kept: fine
    PretrainConfig(img_size=32, mask_ratio=0.75)  # 4 patches, 1 kept: the smallest fine case


def test_every_preset_name_gives_its_patch_size() -> None:
    for name, factory in PRESETS.items():
        with torch.device("meta"):
            model = factory()
        assert model.patch_embed.patch_size == (patch_size_of(name),) * 2, name


def test_rerunning_a_finished_run_changes_nothing_and_says_how_to_extend_it(tmp_path: Path, demo_root: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(_tiny(demo_root, out, 2)) == 0
    capsys.readouterr()
    written = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "reconstruction.png", "metrics.jsonl"} <= {p.name for p in written}

    assert main(_tiny(demo_root, out, 2)) == 0  # the same command again
    printed = capsys.readouterr()
    assert printed.out == (f"fastmae pretrain: {out} is already complete: its newest checkpoint is at step 2 of 2; "
                           "nothing to do. To train longer, run again with the same --output and a larger --steps or "
                           "--epochs: it continues from step 2.\n")
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == written

    assert main(_tiny(demo_root, out, 3)) == 0  # a larger --steps continues the run
    assert "resuming from " + str(out / "checkpoints" / "ckpt-00000002.pt") + " (step 2)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["total_steps"] == 3
    assert list_checkpoints(out / "checkpoints")[-1].name == "ckpt-00000003.pt"


def test_the_parser_imports_no_training_or_benchmark_code() -> None:
    probe = ("import sys\nimport fastmae.cli as cli\ncli.build_parser(with_bench_flags=False)\n"
             "print(sorted(m for m in sys.modules if m.startswith(('fastmae.train.pretrain', 'fastmae.benchmark', "
             "'fastmae.data', 'fastmae.train.nonfinite', 'fastmae.train.distributed'))))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_bench_flags_are_there_when_bench_is_the_command(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--results-dir" in capsys.readouterr().out


def test_extension_reasons_name_what_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = ModuleNotFoundError("No module named 'fastmae._C'", name="fastmae._C")
    assert "torch 2.9.0 is a CPU-only build" in _why_not_loaded(missing, "2.9.0", None)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # no nvcc there (nor looked for elsewhere)
    why = _why_not_loaded(missing, "2.9.0", "12.8")
    assert "no nvcc under CUDA_HOME" in why and "CPU-only" not in why and "is a CUDA 12.8 build" in why
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "nvcc").chmod(0o755)
    assert f"{tmp_path}/bin/nvcc is here" in _why_not_loaded(missing, "2.9.0", "12.8")
    broken = ImportError("undefined symbol: _ZN3c10", name="_C", path="/x/_C.so")  # as a failed dlopen raises it
    assert "is installed but does not load (undefined symbol" in _why_not_loaded(broken, "2.9.0", "12.8")
