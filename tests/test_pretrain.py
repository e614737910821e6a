"""fastmae pretrain: outputs, resume, atomic checkpoints, the command line."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastmae.data import demo_dataset, list_images
from fastmae.data.demo import DEMO_PHOTOS
from fastmae.train.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
import fastmae.train.pretrain as pretrain_module
from fastmae.cli import main
from fastmae.train.config import PretrainConfig
from fastmae.train.hooks import TrainHooks
from fastmae.train.pretrain import pretrain


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_dataset(tmp_path_factory.mktemp("cache"), crops_per_photo=4, size=64)


def test_demo_dataset_is_real_jpegs(demo_root: Path) -> None:
    files = list_images(demo_root)
    assert len(files) == 4 * len(DEMO_PHOTOS) == 36
    assert sorted(p.name for p in demo_root.iterdir()) == sorted(Path(n).stem for n in DEMO_PHOTOS)
    with Image.open(files[0]) as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 64)
    assert demo_dataset(demo_root.parent, crops_per_photo=4, size=64) == demo_root  # written once
    assert not list(demo_root.parent.glob(".demo-*"))  # no leftover temporary folder


def _cfg(out: Path, data: Path, steps: int) -> PretrainConfig:
    return PretrainConfig(model="mae_vit_tiny_patch16", data=str(data), output=str(out), steps=steps, img_size=32, batch_size=8, log_every=2,
                          save_every=2, keep_last=2, num_workers=0, device="cpu")


def test_pretrain_outputs_and_resume(tmp_path: Path, demo_root: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    summary = pretrain(_cfg(out, demo_root, 4), progress=False)
    assert summary.steps == 4 and summary.img_per_s > 0
    config = json.loads((out / "config.json").read_text())
    assert config["total_steps"] == 4 and config["precision"] == "fp32" and config["lr"] == 1.5e-4 * 8 / 256
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all({"step", "loss", "lr", "img_per_s"} <= r.keys() and r["loss"] > 0 for r in rows)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    with Image.open(out / "reconstruction.png") as fig:
        assert fig.format == "PNG" and fig.size[0] > 400

    summary = pretrain(_cfg(out, demo_root, 6), progress=False)  # same output folder: resumes
    printed = capsys.readouterr().out
    assert "resuming from" in printed
    # the CPU's foreach AdamW has no device-side skip: the log line that names it says so
    assert ("optimizer torch.optim.AdamW(foreach=True) (the parameters are on cpu, not CUDA); host sync per step for "
            "the non-finite check with torch.optim.AdamW(foreach=True)") in printed
    assert summary.steps == 6
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]  # continued, not restarted
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["ckpt-00000004.pt", "ckpt-00000006.pt"]
    _, state = load_latest_checkpoint(out / "checkpoints")
    assert state["step"] == 6 and set(state) >= {"model", "optimizer", "scaler", "loader", "rng", "skipped_steps"}
    assert state["loader"]["epoch"] * 4 + state["loader"]["batch"] == 6  # 36 images: 4 batches of 8 per epoch
    assert state["rng"]["cpu"].shape[0] == 1  # one row per rank


def test_half_written_and_damaged_checkpoints_are_ignored(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 10, {"step": 10, "w": torch.ones(3)})
    (tmp_path / "ckpt-00000020.pt.tmp").write_bytes(b"\x80half")  # a crash mid-save
    (tmp_path / "ckpt-00000030.pt").write_bytes(b"not a checkpoint")  # damaged after the fact
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*ckpt-00000030.pt"):
        path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "ckpt-00000010.pt" and state["step"] == 10
    assert load_latest_checkpoint(tmp_path / "missing") is None


def test_defaults_paper_with_data_demo_without() -> None:
    paper, demo = PretrainConfig(data="/data/imagenet"), PretrainConfig()
    assert (paper.model, paper.img_size, paper.blr, paper.norm_pix_loss) == ("mae_vit_base_patch16", 224, 1.5e-4, True)
    assert (demo.model, demo.img_size, demo.batch_size, demo.norm_pix_loss) == ("mae_vit_demo_patch8_dec128d2b", 64,
                                                                              32, False)
    assert paper.batch_size == 64
    assert PretrainConfig(steps=10).epochs is None and PretrainConfig(data="d", blr=1e-3).blr == 1e-3


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="model must be one of"):
        PretrainConfig(model="mae_vit_gigantic")
    with pytest.raises(ValueError, match="either steps or epochs"):
        PretrainConfig(steps=3, epochs=1.0)
    with pytest.raises(ValueError, match=r"unknown config keys \['lr_rate'\]"):
        PretrainConfig.from_dict({"lr_rate": 1.0})
    for key, value, expected in [("steps", 0, ">= 1"), ("epochs", 0.0, "> 0"), ("keep_last", -1, ">= 0"),
                                 ("num_workers", -2, ">= 0"), ("warmup_fraction", 1.5, r"in \[0, 1\]")]:
        with pytest.raises(ValueError, match=rf"{key} must be {expected}, got {value}"):
            PretrainConfig(**{key: value})


def test_config_types_are_checked_naming_key_type_and_value(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for values, message in [({"batch_size": "8"}, "config key batch_size must be int or None, got '8' (str)"),
                            ({"steps": True}, "config key steps must be int or None, got True (bool)"),
                            ({"norm_pix_loss": 1}, "config key norm_pix_loss must be bool or None, got 1 (int)"),
                            ({"clip_grad": "1.0"}, "config key clip_grad must be float or None, got '1.0' (str)"),
                            ({"output": 5}, "config key output must be str, got 5 (int)")]:
        with pytest.raises(TypeError) as caught:
            PretrainConfig.from_dict(values)
        assert str(caught.value) == message
    assert PretrainConfig.from_dict({"epochs": 3, "clip_grad": 1}).epochs == 3.0  # TOML ints for float keys
    config = tmp_path / "cfg.toml"
    config.write_text('batch_size = "8"\n')
    assert main(["pretrain", "--config", str(config)]) == 2
    assert "config key batch_size must be int or None, got '8' (str)" in capsys.readouterr().err


class _LoaderCalled(Exception):
    pass


def test_bad_file_settings_reach_the_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"max_skip_fraction must be in \[0, 1\), got 1.0"):
        PretrainConfig(max_skip_fraction=1.0)
    with pytest.raises(ValueError, match="bad_file_check must be one of \\['header', 'decode'\\], got 'full'"):
        PretrainConfig(bad_file_check="full")
    seen = {}

    def loader(*args: object, **kwargs: object) -> None:
        seen.update(kwargs)
        raise _LoaderCalled

    monkeypatch.setattr(pretrain_module, "pretrain_loader", loader)
    with pytest.raises(_LoaderCalled):
        main(["pretrain", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--on-bad-file", "skip",
              "--max-skip-fraction", "0.2", "--bad-file-check", "decode"])
    assert (seen["on_bad_file"], seen["max_skip_fraction"], seen["check"]) == ("skip", 0.2, "decode")
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "stop when more than max_skip_fraction of the files are bad" in usage and "1%" not in usage
    assert "--max-skip-fraction" in usage and "--bad-file-check" in usage


def _fastmae(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastmae.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cli_help_documents_every_key() -> None:
    result = _fastmae("pretrain", "--help")
    assert result.returncode == 0
    for key in PretrainConfig.__dataclass_fields__:
        assert "--" + key.replace("_", "-") in result.stdout, key


def test_cli_config_file_flags_override_and_bad_key(tmp_path: Path, demo_root: Path) -> None:
    config = tmp_path / "cfg.toml"
    config.write_text(f'model = "mae_vit_tiny_patch16"\ndata = "{demo_root}"\nepochs = 3\nimg_size = 32\n'
                      'batch_size = 4\nlog_every = 1\n')
    result = _fastmae("pretrain", "--config", str(config), "--output", str(tmp_path / "o"), "--batch-size", "6",
                      "--steps", "2", "--no-progress", "--num-workers", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fastmae pretrain: 2 steps" in result.stdout
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert saved["batch_size"] == 6 and saved["img_size"] == 32  # flag over file over default
    assert saved["steps"] == 2 and saved["epochs"] is None  # --steps replaces the file's epochs
    bad = tmp_path / "bad.json"
    bad.write_text('{"bacth_size": 4}')
    result = _fastmae("pretrain", "--config", str(bad))
    assert result.returncode == 2 and "unknown config keys ['bacth_size']" in result.stderr


def test_cli_info_lists_every_op_and_backend() -> None:
    result = _fastmae("info")
    assert result.returncode == 0
    for op in ("random_masking", "patch_embed_visible", "unshuffle", "masked_mse", "attention", "layer_norm"):
        assert op in result.stdout
    assert "fastmae._C:" in result.stdout and re.search(r"\breference +available", result.stdout)
    assert "by priority in bf16/fp16 at S <= 257 and head dim <= 80 only" in result.stdout  # attention's auto_when


class _RecordingHooks(TrainHooks):
    """Records each call; the loss of step 3 becomes NaN."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.calls: list[tuple[str, int]] = []

    def before_step(self, step: int) -> None:
        self.calls.append(("before_step", step))

    def on_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        self.calls.append(("on_loss", step))
        return loss * float("nan") if step == 3 else loss

    def before_commit(self, step: int) -> None:
        self.calls.append(("before_commit", step))
        assert not (self.out / "checkpoints" / f"ckpt-{step:08d}.pt").exists()  # not yet renamed into place

    def after_save(self, step: int) -> None:
        self.calls.append(("after_save", step))
        assert (self.out / "checkpoints" / f"ckpt-{step:08d}.pt").is_file()


def test_hooks_are_called_in_order_and_can_change_the_loss(tmp_path: Path, demo_root: Path) -> None:
    cfg = dataclasses.replace(_cfg(tmp_path / "run", demo_root, 4), accum=2, batch_size=4)
    hooks = _RecordingHooks(tmp_path / "run")
    summary = pretrain(cfg, progress=False, hooks=hooks)
    assert summary.steps == 4 and summary.skipped_steps == 1  # step 3's NaN loss: skipped, counted
    def per_step(s: int) -> list[tuple[str, int]]:
        return [("before_step", s), ("on_loss", s), ("on_loss", s)]  # two accumulated passes per step

    saved = [("before_commit", 2), ("after_save", 2)]
    assert hooks.calls == [*[c for s in (1, 2) for c in per_step(s)], *saved,
                           *[c for s in (3, 4) for c in per_step(s)], ("before_commit", 4), ("after_save", 4)]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1]
