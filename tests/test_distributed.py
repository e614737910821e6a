"""``torchrun --standalone --nproc_per_node=2`` on the CPU (gloo): DDP and FSDP2 match one process with the same
global batch; a preemption signal on one rank saves and the rerun continues; a NaN on one rank stops both ranks
with the last good checkpoint intact; an FSDP checkpoint saved on 2 ranks resumes on 1."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmae.train.checkpoint import COMMIT_MARKER, list_checkpoints
from pretrain_runs import (GLOBAL_BATCH, STEPS, Reference, cli_args, demo_root, fastmae_env, final_weights,  # noqa: F401
                           reference, step_losses, torchrun)

RTOL = 1e-3  # fp32 reductions in another order, through a few AdamW steps; a wrong mask or image moves ~1e-2


def _assert_close_losses(losses: dict[int, float | None], reference: Reference, steps: range) -> None:
    for step in steps:
        assert losses[step] == pytest.approx(reference.losses[step], rel=RTOL), (step, losses, reference.losses)


def _exit_codes(result: subprocess.CompletedProcess) -> list[int]:
    """The workers' exit codes as torchrun's failure report lists them."""
    return [int(m.group(1)) for m in re.finditer(r"^\s*exitcode\s*:\s*(-?\d+)", result.stderr, re.MULTILINE)]


def test_ddp_matches_one_process_and_resumes_after_preemption(tmp_path: Path, demo_root: Path,  # noqa: F811
                                                              reference: Reference) -> None:
    out = tmp_path / "ddp"
    args = cli_args(demo_root, out, batch_size=GLOBAL_BATCH // 2, parallel="ddp")
    preempted = torchrun(args, fault="signal@3:1")  # rank 1 receives SIGUSR1 during step 3
    assert sorted(_exit_codes(preempted)) == [75, 75], preempted.stderr[-3000:]
    assert "fastmae pretrain (rank 1): SIGUSR1 received" in preempted.stdout
    assert "preempted: saved step 3 and stopped" in preempted.stdout
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    assert set(step_losses(out)) == {1, 2, 3}

    resumed = torchrun(args)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from " + str(out / "checkpoints" / "ckpt-00000003.pt") + " (step 3)" in resumed.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["effective_batch_size"]) == (2, GLOBAL_BATCH)
    _assert_close_losses(step_losses(out), reference, range(1, STEPS + 1))
    weights = final_weights(out)
    for name, value in reference.weights.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-4, msg=name)
    assert list((out / "tensorboard").iterdir())


def test_fsdp_nan_on_one_rank_stops_both_and_resumes_on_one_process(tmp_path: Path, demo_root: Path,  # noqa: F811
                                                                    reference: Reference) -> None:
    out = tmp_path / "fsdp"
    args = cli_args(demo_root, out, batch_size=GLOBAL_BATCH // 2, parallel="fsdp", max_nonfinite=2)
    stopped = torchrun(args, fault="nan@5:1")  # rank 1's loss is NaN from step 5 on
    assert sorted(_exit_codes(stopped)) == [3, 3], stopped.stderr[-3000:]
    for rank in (0, 1):  # both ranks stop at the same step, and say where the NaN came from
        assert f"fastmae pretrain (rank {rank}): step 6: non-finite loss on rank 1;" in stopped.stderr
    kept = list_checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == ["ckpt-00000002", "ckpt-00000004"]  # sharded folders; 6 never saved
    assert all((p / COMMIT_MARKER).is_file() and len(list(p.glob("*.distcp"))) == 2 for p in kept)
    losses = step_losses(out)
    assert losses[5] is None and 6 not in losses
    _assert_close_losses(losses, reference, range(1, 5))

    one = subprocess.run([sys.executable, "-m", "fastmae.cli", *cli_args(demo_root, out, parallel="fsdp")],
                         capture_output=True, text=True, env=fastmae_env(), timeout=180)  # 1 process, batch 8
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resuming from " + str(kept[-1]) + " (step 4)" in one.stdout
    _assert_close_losses(step_losses(out), reference, range(5, STEPS + 1))
    weights = final_weights(out)  # a one-file checkpoint now: one process
    for name, value in reference.weights.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-4, msg=name)
