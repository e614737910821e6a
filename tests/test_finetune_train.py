"""``fastmae finetune`` / ``linprobe`` / ``eval`` end to end on a tiny ImageFolder of coloured PNGs (CPU, fp32, the
demo ViT at 32 px): the freezing rule, the lr schedule against the official formula, runs that resume exactly
and are preempted cleanly, pretrained encoders loaded (and kept frozen where frozen), the evaluation's accuracy
and class matching, and bad inputs refused with exit 2 before anything is written."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from finetune_runs import TINY, cli_args, write_color_tree
from pretrain_runs import torchrun

import fastmae.finetune.trainer as trainer_module
from fastmae.cli import main
from fastmae.data import eval_loader
from fastmae.finetune.classifier import add_linprobe_head, build_classifier, freeze, train_mode
from fastmae.finetune.config import FinetuneConfig
from fastmae.finetune.evaluate import class_index_map, evaluate
from fastmae.model import PRESETS, mae_vit_demo_patch8_dec128d2b
from fastmae.train.checkpoint import checkpoint_path, list_checkpoints
from fastmae.train.config import SettingError
from fastmae.train.distributed import init_ranks
from fastmae.train.hooks import TrainHooks


@pytest.fixture(scope="module")
def train_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_color_tree(tmp_path_factory.mktemp("train"), per_class=4)  # 12 images: 3 batches of 4


@pytest.fixture(scope="module")
def val_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_color_tree(tmp_path_factory.mktemp("val"), per_class=2, seed=1)


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-style MAE checkpoint ``{"model": state_dict}`` of the demo MAE (whose encoder is vit_demo_patch8)."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("mae") / "mae_demo.pth"
    torch.save({"model": mae_vit_demo_patch8_dec128d2b(img_size=32).state_dict()}, path)
    return path


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_path(out / "checkpoints", step), weights_only=True)


def _rows(out: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


# ------------------------------------------------------------------------------------------------ freezing
@pytest.mark.parametrize("global_pool", [True, False])
def test_partial_fine_tuning_trains_the_last_blocks_the_final_norm_and_the_head(global_pool: bool) -> None:
    model = build_classifier("vit_demo_patch8", 32, 3, global_pool, drop_path=0.5)  # 4 blocks
    norm = "fc_norm" if global_pool else "norm"
    frozen = freeze(model, linprobe=False, trainable_blocks=1)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters() if n.startswith(("blocks.3.", f"{norm}.", "head."))}
    train_mode(model, frozen)
    assert [b.training for b in model.blocks] == [False, False, False, True]  # no drop path in frozen blocks
    assert not model.patch_embed.training and model.head.training
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trained

    zero = build_classifier("vit_demo_patch8", 32, 3, global_pool)
    freeze(zero, linprobe=False, trainable_blocks=0)
    assert {n.split(".")[0] for n, p in zero.named_parameters() if p.requires_grad} == {norm, "head"}
    full = build_classifier("vit_demo_patch8", 32, 3, global_pool)
    assert freeze(full, linprobe=False, trainable_blocks=4) == [] and all(p.requires_grad for p in full.parameters())


def test_linear_probing_trains_the_batchnorm_head_alone() -> None:
    model = build_classifier("vit_demo_patch8", 32, 3, global_pool=False)
    add_linprobe_head(model)
    frozen = freeze(model, linprobe=True, trainable_blocks=None)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    bn = model.head[0]
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    train_mode(model, frozen)
    assert bn.training and not any(b.training for b in model.blocks) and not model.norm.training


# ------------------------------------------------------------------------------------------------ schedule
@pytest.mark.slow  # a few seconds on 2 cores
def test_lr_schedule_is_the_official_per_iteration_cosine(train_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    recorded: list[list[tuple[float, float]]] = []
    apply_lr = trainer_module.apply_lr

    def recording(optimizer: torch.optim.Optimizer, lr: float) -> None:
        apply_lr(optimizer, lr)
        recorded.append([(g["lr"], g["lr_scale"]) for g in optimizer.param_groups])

    monkeypatch.setattr(trainer_module, "apply_lr", recording)
    settings = {**TINY, "batch_size": 2, "accum": 2}  # 6 passes per epoch, 3 optimiser steps
    cfg = FinetuneConfig(**settings, data=str(train_root), output=str(tmp_path / "run"), epochs=2.0,
                         warmup_epochs=1.0, blr=0.1, min_lr=1e-3, layer_decay=0.5)
    summary = trainer_module.train_classifier(cfg, progress=False)
    assert summary.steps == 6 and len(recorded) == 6

    base = 0.1 * 2 * 2 / 256  # blr x effective batch / 256
    for step, groups in enumerate(recorded):
        # util/lr_sched.adjust_learning_rate at the official fractional epoch, data_iter_step / len(loader) + epoch
        epoch = step // 3 + (step % 3) * 2 / 6
        if epoch < 1.0:
            official = base * epoch / 1.0
        else:
            official = 1e-3 + (base - 1e-3) * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1.0) / (2.0 - 1.0)))
        for lr, scale in groups:
            assert math.isclose(lr, official * scale, rel_tol=1e-12, abs_tol=1e-15)
    assert {scale for _, scale in recorded[0]} == {0.5 ** k for k in range(6)}


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow  # a few seconds on 2 cores
def test_finetune_resumes_exactly_validates_and_evaluates(train_root: Path, val_root: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    flags = {"val": val_root, "save_every": 2, "deterministic": True, "warmup_epochs": 1}
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(cli_args("finetune", train_root, whole, steps=5, **flags)) == 0
    assert main(cli_args("finetune", train_root, split, steps=4, **flags)) == 0
    capsys.readouterr()
    assert main(cli_args("finetune", train_root, split, steps=5, **flags)) == 0
    assert f"resuming from {checkpoint_path(split / 'checkpoints', 4)} (step 4)" in capsys.readouterr().out
    a, b = _weights(whole, 5), _weights(split, 5)  # mixup, RandAugment, erasing and drop path all repeat
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["classifier"] == {"model": "vit_demo_patch8", "img_size": 32, "num_classes": 3, "global_pool": True,
                               "linprobe_head": False, "classes": ["class0", "class1", "class2"],
                               "command": "finetune"}

    rows = _rows(split)
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert [s for s, r in rows.items() if "val_acc1" in r] == [3, 4, 5]  # epoch end (3 steps/epoch) and each run's end
    assert rows[3]["epoch"] == 1.0 and 0 <= rows[5]["val_acc1"] <= 100 and rows[5]["val_acc5"] == 100  # top-3 of 3

    assert main(["eval", str(split), "--data", str(val_root), "--device", "cpu", "--loader", "torch",
                 "--num-workers", "0", "--precision", "fp32"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"fastmae eval: top-1 {rows[5]['val_acc1']:.3f}%, top-3 100.000%, loss {rows[5]['val_loss']:.4f} "
                    f"on 6 images")
    assert main(cli_args("finetune", train_root, split, steps=5, **flags)) == 0  # complete: nothing changes
    assert "is already complete" in capsys.readouterr().out and len(list_checkpoints(split / "checkpoints")) == 3


def test_partial_finetune_from_an_mae_keeps_the_frozen_encoder(train_root: Path, mae_checkpoint: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(cli_args("finetune", train_root, out, steps=2, pretrained=mae_checkpoint, freeze_blocks=1)) == 0
    saved, mae = _weights(out, 2), torch.load(mae_checkpoint, weights_only=True)["model"]
    model = saved["model"]
    frozen = [k for k in model if k.startswith(("blocks.0.", "blocks.1.", "blocks.2.", "patch_embed.", "cls_token",
                                                "pos_embed"))]
    assert len(frozen) == 3 * 12 + 4 and all(torch.equal(model[k], mae[k]) for k in frozen)
    assert not torch.equal(model["blocks.3.attn.qkv.weight"], mae["blocks.3.attn.qkv.weight"])  # trained
    optimized = [n for g in saved["optimizer"]["param_groups"] for n in g["param_names"]]
    assert sorted(optimized) == sorted(k for k in model if k.startswith(("blocks.3.", "fc_norm.", "head.")))


def test_linprobe_from_an_mae_then_eval(train_root: Path, val_root: Path, mae_checkpoint: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(cli_args("linprobe", train_root, out, steps=3, accum=2, batch_size=2, pretrained=mae_checkpoint,
                         val=val_root)) == 0
    saved, mae = _weights(out, 3), torch.load(mae_checkpoint, weights_only=True)["model"]
    model = saved["model"]
    assert all(torch.equal(model[k], mae[k]) for k in model if not k.startswith("head."))  # norm included
    assert saved["classifier"]["linprobe_head"] and not saved["classifier"]["global_pool"]
    assert model["head.0.num_batches_tracked"] == 6  # the BatchNorm saw every pass
    assert len(saved["optimizer"]["state"]) == 2  # LARS momentum of the head's weight and bias
    assert saved["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert saved["optimizer"]["param_groups"][0]["trust_coefficient"] == 0.001
    capsys.readouterr()
    assert main(["eval", str(checkpoint_path(out / "checkpoints", 3)), "--data", str(val_root), "--device", "cpu",
                 "--loader", "torch", "--num-workers", "0"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("fastmae eval: top-1 ")


@pytest.mark.slow  # a few seconds on 2 cores
def test_sigterm_saves_and_exits_75_then_the_run_resumes(train_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    class Sigterm(TrainHooks):
        def before_step(self, step: int) -> None:
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer_module, "fault_hooks", lambda rank: Sigterm())
    out = tmp_path / "run"
    assert main(cli_args("finetune", train_root, out, steps=4)) == 75
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["ckpt-00000002.pt"]
    assert "preempted: saved step 2" in capsys.readouterr().out
    monkeypatch.setattr(trainer_module, "fault_hooks", lambda rank: TrainHooks())
    assert main(cli_args("finetune", train_root, out, steps=4)) == 0
    assert list_checkpoints(out / "checkpoints")[-1].name == "ckpt-00000004.pt"


# ------------------------------------------------------------------------------------------------ evaluation
class ChannelMeans(nn.Module):
    """Logits = each image's mean per colour channel: predicts class ``c`` for images bright in channel ``c``."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))  # (N, 3, S, S) -> (N, 3)


def test_evaluation_matches_classes_by_name(tmp_path: Path) -> None:
    ranks = init_ranks("cpu")
    amp = torch.autocast("cpu", enabled=False)
    classes = ["class0", "class1", "class2"]
    subset = write_color_tree(tmp_path / "subset", 3, classes=("class0", "class2"), channels=(0, 2))
    loader = eval_loader(subset, 4, img_size=32, backend="torch", device="cpu", num_workers=0)
    result = evaluate(ChannelMeans(), loader, class_index_map(classes, loader.classes, "val"), ranks, amp)
    assert (result.acc1, result.acc5, result.images, result.k) == (100.0, 100.0, 6, 3)
    images, labels = zip(*loader)
    logits = torch.cat(images).mean(dim=(2, 3))
    expected_loss = nn.functional.cross_entropy(logits, torch.tensor([0, 2])[torch.cat(labels)])
    assert math.isclose(result.loss, expected_loss.item(), rel_tol=1e-6)
    swapped = write_color_tree(tmp_path / "swapped", 3, channels=(0, 2, 1))  # class1 and class2 look alike swapped
    loader = eval_loader(swapped, 4, img_size=32, backend="torch", device="cpu", num_workers=0)
    result = evaluate(ChannelMeans(), loader, class_index_map(classes, loader.classes, "val"), ranks, amp)
    assert math.isclose(result.acc1, 100 / 3)
    with pytest.raises(SettingError, match=r"^val must hold only classes the classifier was trained on \(3 classes, "
                                           r"e.g. 'class0', 'class1', 'class2'\), got 2 unknown: 'cat', 'dog'$"):
        class_index_map(classes, ["cat", "class1", "dog"], "val")


@pytest.mark.slow  # torchrun: two processes importing torch, ~10 s on 2 cores
def test_eval_under_torchrun_reduces_over_ranks(train_root: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    val = write_color_tree(tmp_path / "val", 2, seed=2)
    (val / "class2" / "001.png").unlink()  # 5 images: rank 0 scores 3 (2 batches), rank 1 scores 2 (1 batch)
    out = tmp_path / "run"
    assert main(cli_args("finetune", train_root, out, steps=1)) == 0
    args = ["eval", str(out), "--data", str(val), "--device", "cpu", "--loader", "torch", "--num-workers", "0",
            "--batch-size", "2"]
    capsys.readouterr()
    assert main(args) == 0
    alone = capsys.readouterr().out.strip().splitlines()[-1]
    assert alone.endswith("on 5 images")
    ranks = torchrun(args)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout.strip().splitlines()[-1] == alone  # printed by rank 0 only, over both ranks' images


def test_eval_of_plain_fine_tuned_weights_needs_the_model(val_root: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "vit_finetuned.pth"
    torch.save({"model": build_classifier("vit_demo_patch8", 32, 3, True).state_dict()}, path)  # as the official
    common = ["--data", str(val_root), "--device", "cpu", "--loader", "torch", "--num-workers", "0"]
    assert main(["eval", str(path), *common]) == 2
    assert capsys.readouterr().err.startswith(f"fastmae eval: --model must name the ViT preset of '{path}'")
    assert main(["eval", str(path), *common, "--model", "vit_tiny_patch16"]) == 2
    assert f"CHECKPOINT '{path}' does not fit vit_tiny_patch16" in capsys.readouterr().err
    assert main(["eval", str(path), *common, "--model", "mae_vit_demo_patch8_dec128d2b"]) == 0
    assert "on 6 images" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ bad inputs
def test_a_pretrained_checkpoint_of_another_architecture_exits_2(train_root: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "mae_tiny.pth"
    torch.save({"model": PRESETS["mae_vit_tiny_patch16"](img_size=32).state_dict()}, other)
    out = tmp_path / "run"
    assert main(cli_args("finetune", train_root, out, steps=2, pretrained=other)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastmae finetune: --pretrained '{other}' cannot initialise vit_demo_patch8: the "
                          "checkpoint is of another architecture")
    assert not out.exists()


def test_validation_classes_unknown_to_training_exit_2(train_root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    odd = write_color_tree(tmp_path / "odd", 2, classes=("class0", "class9"))
    out = tmp_path / "run"
    assert main(cli_args("finetune", train_root, out, steps=2, val=odd)) == 2
    assert capsys.readouterr().err == ("fastmae finetune: --val must hold only classes the classifier was trained on "
                                       "(3 classes, e.g. 'class0', 'class1', 'class2'), got 1 unknown: 'class9'\n")
    assert not out.exists()
    assert main(cli_args("linprobe", train_root, out, steps=1)) == 0
    assert main(["eval", str(out), "--data", str(odd), "--device", "cpu", "--loader", "torch"]) == 2
    assert capsys.readouterr().err.endswith("--data must hold only classes the classifier was trained on (3 classes, "
                                            "e.g. 'class0', 'class1', 'class2'), got 1 unknown: 'class9'\n")
