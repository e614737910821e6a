"""``fastmae bench --task finetune``: the fine-tuning rows (fastmae's ViT and timm's, one recipe), on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastmae.benchmark.finetune_step import FINETUNE_IMPLS, build_finetune_step
from fastmae.benchmark.registry import ALL_IMPLS, BASELINE_IMPLS, TASK_IMPLS
from fastmae.benchmark.results import read_rows
from fastmae.benchmark.run import FINETUNE_GPU_DEFAULTS, BenchConfig, bench_defaults
from fastmae.cli import main
from fastmae.flops import classifier_flops
from fastmae.vit import VIT_PRESETS

TINY = "vit_tiny_patch16"
CPU = torch.device("cpu")


def test_fine_tuning_rows_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None) -> None:
    """The command writes one row per implementation: no mask ratio, the classifier's FLOPs, the recipe's loss."""
    code = main(["bench", "--task", "finetune", "--models", TINY, "--batch-size", "4", "--img-size", "32",
                 "--steps", "1", "--warmup", "1", "--device", "cpu", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {r["impl"]: r for r in read_rows(tmp_path / "cpu.csv")}
    assert set(rows) == {"fastmae-finetune", "timm"}  # the CPU defaults: the eager rows
    with torch.device("meta"):
        flops = classifier_flops(VIT_PRESETS[TINY](img_size=32, num_classes=1000)).train_step
    for row in rows.values():
        assert (row["status"], row["model"], row["mask_ratio"], row["dtype"]) == ("ok", TINY, "", "fp32")
        assert row["gflops_per_img"] == f"{flops / 1e9:.2f}"
        # soft-target cross-entropy over 1000 classes at initialisation: about ln(1000) = 6.9
        assert 6.0 < float(row["loss"]) < 8.0
    assert "best baseline for vit_tiny_patch16 synthetic 32px: timm" in out


def _clone_inputs(batch: int, img_size: int) -> torch.Tensor:
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))


def test_fastmae_and_timm_rows_run_the_same_recipe(one_thread: None) -> None:
    """Given fastmae's weights, timm's row computes fastmae's row: the same mixup draws, loss, layer-decay AdamW
    update of every parameter (fp32, drop path off so that no randomness differs). So a ratio between the rows is
    the models' speed, not two recipes'."""
    torch.manual_seed(0)
    fastmae_step = build_finetune_step("fastmae-finetune", TINY, 4, 32, CPU, drop_path=0.0)
    initial = {k: v.clone() for k, v in fastmae_step.model.state_dict().items()}
    fastmae_losses = [float(fastmae_step.run(_clone_inputs(4, 32))) for _ in range(2)]
    timm_step = build_finetune_step("timm", TINY, 4, 32, CPU, drop_path=0.0)  # re-seeds the mixup draws
    timm_step.model.load_state_dict(initial, strict=True)
    timm_losses = [float(timm_step.run(_clone_inputs(4, 32))) for _ in range(2)]
    assert fastmae_losses == pytest.approx(timm_losses, rel=1e-5, abs=1e-6)
    assert fastmae_losses[0] != fastmae_losses[1]  # the second step saw updated weights and other mixup draws
    after_fastmae, after_timm = fastmae_step.model.state_dict(), timm_step.model.state_dict()
    moved = 0
    for name, value in after_fastmae.items():
        torch.testing.assert_close(after_timm[name], value, rtol=1e-4, atol=1e-6, msg=name)
        moved += not torch.equal(value, initial[name])
    assert moved == len(initial)  # every parameter was trained


def test_registry_and_defaults() -> None:
    assert set(TASK_IMPLS["finetune"]) == set(FINETUNE_IMPLS)
    assert not set(TASK_IMPLS["finetune"]) & set(TASK_IMPLS["pretrain"])  # a row's impl names its task
    assert set(ALL_IMPLS) == set(TASK_IMPLS["pretrain"]) | set(TASK_IMPLS["finetune"])
    assert {"timm", "timm-compile"} <= set(BASELINE_IMPLS)
    gpu = bench_defaults(torch.device("cuda"), "finetune")
    assert gpu == FINETUNE_GPU_DEFAULTS
    assert (gpu.models, gpu.batch_size) == (("vit_base_patch16", "vit_large_patch16"), 128)
    assert set(gpu.impls) == set(FINETUNE_IMPLS)  # timm with SDPA, eager and compiled, against fastmae's two


def test_bad_settings_are_value_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="unknown fine-tuning model 'mae_vit_base_patch16'; expected a ViT preset"):
        BenchConfig(task="finetune", models=("mae_vit_base_patch16",), device="cpu")
    with pytest.raises(ValueError, match=r"unknown impl\(s\) \['fastmae'\] for task finetune"):
        BenchConfig(task="finetune", models=(TINY,), impls=("fastmae",), device="cpu")
    with pytest.raises(ValueError, match=r"unknown impl\(s\) \['timm'\] for task pretrain"):
        BenchConfig(models=("mae_vit_tiny_patch16",), impls=("timm",), device="cpu")
    with pytest.raises(ValueError, match="finetune task takes synthetic input only"):
        BenchConfig(task="finetune", models=(TINY,), inputs=("loader",), device="cpu")
    with pytest.raises(ValueError, match="task must be one of"):
        BenchConfig(task="probe", device="cpu")
    with pytest.raises(ValueError, match="needs even batch sizes"):
        BenchConfig(task="finetune", models=(TINY,), batch_sizes=(5,), device="cpu")
    with pytest.raises(ValueError, match="even int >= 2"):
        build_finetune_step("timm", TINY, 3, 32, CPU)
    assert main(["bench", "--task", "finetune", "--models", "vit_giant", "--device", "cpu"]) == 2
    assert "unknown fine-tuning model 'vit_giant'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("impl", sorted(FINETUNE_IMPLS))
def test_fine_tuning_rows_on_gpu(impl: str) -> None:
    step = build_finetune_step(impl, "vit_base_patch16", 8, 224, torch.device("cuda"))
    imgs = torch.randn(8, 3, 224, 224, device="cuda")
    losses = [float(step.run(imgs)) for _ in range(3)]
    assert step.dtype == "bf16" and all(6.0 < loss < 8.0 for loss in losses), losses
