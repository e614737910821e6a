"""The settings of ``fastmae finetune`` / ``linprobe`` / ``eval``: the official recipe per model size, and bad
settings refused before anything is read or written (exit 2, one line naming the flag)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastmae.cli import main
from fastmae.finetune.config import FinetuneConfig, LinprobeConfig, eval_crop_fraction
from fastmae.train.config import SettingError


@pytest.mark.parametrize("model, expected", [
    # FINETUNE.md (epochs, blr, layer decay, drop path): B 100 / 5e-4 / 0.65 / 0.1, L 50 / 1e-3 / 0.75 / 0.2,
    # H 50 / 1e-3 / 0.75 / 0.3
    ("vit_base_patch16", (100.0, 5e-4, 0.65, 0.1)),
    ("mae_vit_large_patch16", (50.0, 1e-3, 0.75, 0.2)),
    ("vit_huge_patch14", (50.0, 1e-3, 0.75, 0.3)),
    ("vit_tiny_patch16", (100.0, 5e-4, 0.65, 0.1)),  # smaller than B: B's recipe
])
def test_finetune_recipe_per_model_size(model: str, expected: tuple) -> None:
    cfg = FinetuneConfig(data=".", model=model)
    assert (cfg.epochs, cfg.blr, cfg.layer_decay, cfg.drop_path) == expected
    assert (cfg.warmup_epochs, cfg.min_lr, cfg.weight_decay, cfg.global_pool, cfg.batch_size) == (
        5, 1e-6, 0.05, True, 32)
    assert (cfg.auto_augment, cfg.smoothing, cfg.reprob, cfg.remode, cfg.recount) == (
        "rand-m9-mstd0.5-inc1", 0.1, 0.25, "pixel", 1)
    assert (cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, cfg.clip_grad) == (0.8, 1.0, 1.0, 0.5, None)
    assert cfg.resolved_accum(1) == 32 and cfg.resolved_accum(8) == 4  # effective batch 1024
    assert FinetuneConfig(data=".", model=model, epochs=3, blr=0.1).blr == 0.1  # given values win


@pytest.mark.parametrize("model, epochs", [("vit_base_patch16", 90.0), ("vit_large_patch16", 50.0),
                                           ("vit_huge_patch14", 50.0)])
def test_linprobe_recipe_per_model_size(model: str, epochs: float) -> None:
    cfg = LinprobeConfig(data=".", model=model)
    assert (cfg.epochs, cfg.blr, cfg.weight_decay, cfg.min_lr, cfg.warmup_epochs, cfg.global_pool) == (
        epochs, 0.1, 0.0, 0.0, 10.0, False)
    assert cfg.batch_size * cfg.resolved_accum(1) == 16384 and cfg.resolved_accum(32) == 1


def test_eval_crop_is_the_official_one() -> None:
    assert eval_crop_fraction(224) == 0.875 and eval_crop_fraction(32) == 0.875 and eval_crop_fraction(448) == 1.0


def test_the_api_names_config_keys() -> None:
    with pytest.raises(SettingError, match=r"^batch_size must be even with mixup or cutmix") as caught:
        FinetuneConfig(data=".", batch_size=33)
    assert caught.value.keys == ("batch_size", "mixup", "cutmix")
    FinetuneConfig(data=".", batch_size=33, mixup=0.0, cutmix=0.0)  # no mixing: any batch
    LinprobeConfig(data=".", batch_size=33)  # linear probing never mixes
    with pytest.raises(SettingError, match=r"^freeze_blocks must be in \[0, 24\], the number of blocks of "
                                           r"vit_large_patch16 to fine-tune, got 25$"):
        FinetuneConfig(data=".", model="vit_large_patch16", freeze_blocks=25)
    with pytest.raises(TypeError, match="config key epochs must be float or None, got 'x'"):
        FinetuneConfig(data=".", epochs="x")


@pytest.mark.parametrize("command, flags, message", [
    ("finetune", ["--batch-size", "5"], "--batch-size must be even with --mixup or --cutmix (timm's Mixup mixes each "
     "image with its mirror in the batch), got 5; or turn both off with --mixup 0 and --cutmix 0"),
    ("finetune", ["--model", "vit_demo_patch8", "--freeze-blocks", "5"],
     "--freeze-blocks must be in [0, 4], the number of blocks of vit_demo_patch8 to fine-tune, got 5"),
    ("finetune", ["--model", "vit_demo_patch8", "--freeze-blocks", "-1"],
     "--freeze-blocks must be in [0, 4], the number of blocks of vit_demo_patch8 to fine-tune, got -1"),
    ("finetune", ["--model", "vit_demo_patch8", "--img-size", "36"],
     "--img-size must be a multiple of 8, the patch size of vit_demo_patch8, got 36"),
    ("finetune", ["--layer-decay", "0"], "--layer-decay must be in (0, 1], got 0.0"),
    ("finetune", ["--auto-augment", "rand-q3"],
     "--auto-augment must be a timm RandAugment policy such as rand-m9-mstd0.5-inc1, or none, got 'rand-q3'"),
    ("finetune", ["--remode", "blur"], "--remode must be one of ['const', 'rand', 'pixel'], got 'blur'"),
    ("linprobe", ["--steps", "2", "--epochs", "1"], "give either --steps or --epochs, not both; got --steps 2 and "
     "--epochs 1.0"),
    ("linprobe", ["--val", "/no/such/val"], "--val must be an ImageFolder tree of validation images, got "
     "'/no/such/val', which does not exist"),
    ("linprobe", ["--pretrained", "/no/such.pth"], "--pretrained must be a checkpoint file (or a pretraining run "
     "folder), got '/no/such.pth', which does not exist"),
    ("linprobe", ["--device", "gpu"], "--device must be a name torch knows, such as cpu, cuda or cuda:1, got 'gpu'"),
])
def test_bad_settings_exit_2_with_one_line_and_touch_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             command: str, flags: list[str], message: str) -> None:
    out = tmp_path / "run"
    assert main([command, "--data", str(tmp_path), "--output", str(out), *flags]) == 2
    assert capsys.readouterr().err == f"fastmae {command}: {message}\n"
    assert not out.exists()


def test_missing_data_and_unknown_models_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["finetune", "--output", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("fastmae finetune: --data must be the training images, an ImageFolder tree "
                                       "(one folder per class), got None\n")
    assert main(["linprobe", "--data", str(tmp_path), "--model", "resnet50"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmae linprobe: --model must be a ViT preset (vit_base_patch16, vit_demo_patch8, ")
    assert "mae_vit_base_patch16" in err and err.endswith("got 'resnet50'\n")
    assert main(["eval", str(tmp_path / "none.pt"), "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"fastmae eval: CHECKPOINT must be a checkpoint file or a run folder, got "
                                       f"'{tmp_path / 'none.pt'}', which does not exist\n")


def test_a_config_file_gives_keys_and_flags_win(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "ft.toml"
    config.write_text('batch_size = 7\nmixup = 0.5\n')
    args = ["finetune", "--config", str(config), "--data", str(tmp_path), "--output", str(tmp_path / "run")]
    assert main(args) == 2  # the file's odd batch with its mixup
    assert capsys.readouterr().err.startswith("fastmae finetune: --batch-size must be even with --mixup or --cutmix")
    assert main([*args, "--batch-size", "8", "--steps", "0"]) == 2  # the flag replaced the file's batch
    assert capsys.readouterr().err == "fastmae finetune: --steps must be >= 1 (or unset), got 0\n"
    config.write_text('batch_sise = 8\n')
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("fastmae finetune: unknown config keys ['batch_sise']")
