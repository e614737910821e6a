"""``fastmae finetune`` / ``linprobe`` with ``--parallel fsdp`` under ``torchrun --nproc_per_node=2`` on the CPU
(gloo), against one process with the same global batch: the same losses, sharded checkpoints that carry the
classifier record, a resume from one, frozen blocks left as loaded, the linear probe's BatchNorm statistics agreed
between validation and the checkpoint, and ``fastmae eval`` reading the sharded folder. The validation set has an
odd number of images, so one rank has a batch fewer: FSDP's collective forwards must stay in step."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from finetune_runs import cli_args, write_color_tree
from pretrain_runs import step_losses, torchrun

from fastmae.cli import main
from fastmae.finetune.config import FinetuneConfig, LinprobeConfig
from fastmae.interop.checkpoints import read_sharded_model
from fastmae.model import mae_vit_demo_patch8_dec128d2b
from fastmae.train.checkpoint import COMMIT_MARKER, EXTRA_STATE, checkpoint_path, list_checkpoints
from fastmae.train.config import SettingError

RTOL = 1e-3  # as tests/test_distributed.py: fp32 reductions in another order through a few AdamW steps
EVAL_FLAGS = ["--device", "cpu", "--loader", "torch", "--num-workers", "0", "--precision", "fp32"]
# What makes one process with batch 4 and two ranks with batch 2 see the same images: no per-batch or per-rank
# draws (mixup, random erasing, drop path); crops, flips and RandAugment are drawn per image.
SAME_IMAGES = {"reprob": 0, "mixup": 0, "cutmix": 0, "drop_path": 0}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Training images (12: 3 steps of 4), validation images (5: 3 on rank 0, 2 on rank 1), a demo MAE file."""
    base = tmp_path_factory.mktemp("fsdp")
    train = write_color_tree(base / "train", per_class=4)
    val = write_color_tree(base / "val", per_class=2, seed=1)
    (val / "class2" / "001.png").unlink()
    torch.manual_seed(7)
    mae = base / "mae_demo.pth"
    torch.save({"model": mae_vit_demo_patch8_dec128d2b(img_size=32).state_dict()}, mae)
    return train, val, mae


def _eval_line(checkpoint: Path, val: Path, capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--data", str(val), *EVAL_FLAGS]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def _eval_numbers(line: str) -> tuple[float, float]:
    """Top-1 and loss of a ``fastmae eval`` result line."""
    found = re.fullmatch(r"fastmae eval: top-1 ([\d.]+)%, top-3 [\d.]+%, loss ([\d.]+) on 5 images", line)
    assert found is not None, line
    return float(found.group(1)), float(found.group(2))


def test_parallel_is_checked_as_pretrain_checks_it(roots: tuple[Path, Path, Path]) -> None:
    data = str(roots[0])
    assert FinetuneConfig(data=data, parallel="fsdp").parallel == "fsdp"
    with pytest.raises(SettingError, match="parallel must be one of \\['ddp', 'fsdp'\\], got 'zero'"):
        LinprobeConfig(data=data, parallel="zero")
    with pytest.raises(SettingError, match="precision must be bf16 or fp32 with parallel fsdp") as info:
        FinetuneConfig(data=data, parallel="fsdp", precision="fp16")
    assert info.value.keys == ("precision", "parallel")
    with pytest.raises(ValueError, match="unknown config keys \\['sharding'\\]"):
        FinetuneConfig.from_dict({"data": data, "sharding": "fsdp"})


@pytest.mark.slow  # one process, then torchrun twice (~30 s on 2 cores)
def test_fsdp_finetune_matches_one_process_resumes_and_evaluates(roots: tuple[Path, Path, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    train, val, mae = roots
    flags = {**SAME_IMAGES, "steps": 3, "save_every": 2, "warmup_epochs": 0, "blr": 0.5, "val": val,
             "pretrained": mae, "freeze_blocks": 2}  # blocks 0-1 (and the embeddings) frozen, 2-3 trained
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    assert main(cli_args("finetune", train, one, batch_size=4, **flags)) == 0
    reference = step_losses(one)
    args = cli_args("finetune", train, fsdp, batch_size=2, parallel="fsdp", **flags)
    run = torchrun(args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 rank(s) (fsdp)" in run.stdout
    losses = step_losses(fsdp)
    assert sorted(losses) == [1, 2, 3] and losses[3] != pytest.approx(losses[1], rel=1e-2)  # it trains
    for step in (1, 2, 3):
        assert losses[step] == pytest.approx(reference[step], rel=RTOL), (step, losses, reference)

    kept = list_checkpoints(fsdp / "checkpoints")
    assert [p.name for p in kept] == ["ckpt-00000002", "ckpt-00000003"]
    assert all((p / COMMIT_MARKER).is_file() and len(list(p.glob("*.distcp"))) == 2 for p in kept)
    file_state = torch.load(checkpoint_path(one / "checkpoints", 3), weights_only=True)
    assert torch.load(kept[-1] / EXTRA_STATE, weights_only=True)["classifier"] == file_state["classifier"]
    weights, loaded = read_sharded_model(kept[-1]), torch.load(mae, weights_only=True)["model"]
    assert weights.keys() == file_state["model"].keys()
    assert all(torch.equal(weights[k], loaded[k]) for k in weights if k.startswith(("blocks.0.", "blocks.1.")))
    assert not torch.equal(weights["blocks.3.attn.qkv.weight"], loaded["blocks.3.attn.qkv.weight"])

    # fastmae eval reads the sharded folder (gathered in this process) and scores as the one-file checkpoint
    top1_one, loss_one = _eval_numbers(_eval_line(one, val, capsys))
    top1_fsdp, loss_fsdp = _eval_numbers(_eval_line(kept[-1], val, capsys))
    assert top1_fsdp == top1_one and loss_fsdp == pytest.approx(loss_one, rel=RTOL, abs=1e-4)

    shutil.rmtree(kept[-1])  # back to step 2: the same command resumes from the sharded folder
    resumed = torchrun(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {kept[0]} (step 2)" in resumed.stdout
    assert step_losses(fsdp)[3] == pytest.approx(reference[3], rel=RTOL)
    assert _eval_numbers(_eval_line(fsdp, val, capsys)) == pytest.approx((top1_one, loss_one), rel=RTOL, abs=1e-4)


@pytest.mark.slow  # torchrun once (~15 s on 2 cores)
def test_fsdp_linprobe_keeps_the_encoder_and_saves_the_batchnorm_it_validated_with(
        roots: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train, val, mae = roots
    out = tmp_path / "lp"
    run = torchrun(cli_args("linprobe", train, out, batch_size=2, steps=2, warmup_epochs=0, parallel="fsdp",
                            pretrained=mae, val=val))
    assert run.returncode == 0, run.stderr[-3000:]
    (saved,) = list_checkpoints(out / "checkpoints")
    weights, loaded = read_sharded_model(saved), torch.load(mae, weights_only=True)["model"]
    assert all(torch.equal(weights[k], loaded[k]) for k in weights if not k.startswith("head."))  # frozen
    assert int(weights["head.0.num_batches_tracked"]) == 2  # rank 0's BatchNorm: one pass per step
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    top1, loss = _eval_numbers(_eval_line(out, val, capsys))
    assert (top1, loss) == pytest.approx((last["val_acc1"], last["val_loss"]), rel=0, abs=1e-4)
