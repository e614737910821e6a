"""Exact resume: an uninterrupted run against one SIGKILLed right after a checkpoint, rerun, SIGKILLed in the
middle of its next save, and resumed: identical per-step losses, masks and final weights (fp32, deterministic).
And a single process preempted by SIGTERM: it saves, exits 75, and the rerun continues from that step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmae.train.checkpoint import list_checkpoints
from fastmae.train.pretrain import pretrain
from pretrain_runs import (STEPS, Reference, cli_args, config, demo_root, fastmae_env, final_weights,  # noqa: F401
                           record_noise, reference, run_until_paused, step_losses)


def test_sigkill_after_and_during_saves_resumes_bit_exactly(tmp_path: Path, demo_root: Path,  # noqa: F811
                                                             reference: Reference, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    args = cli_args(demo_root, out)
    run_until_paused(args, "pause_after_save@2")  # killed right after checkpoint 2 is committed
    assert [p.name for p in list_checkpoints(ckpts)] == ["ckpt-00000002.pt"]

    run_until_paused(args, "pause_in_save@4")  # the same command resumes at 2; killed while writing 4
    assert (ckpts / "ckpt-00000004.pt.tmp").is_file()  # the half-written checkpoint
    assert [p.name for p in list_checkpoints(ckpts)] == ["ckpt-00000002.pt"]
    assert set(step_losses(out)) == {1, 2, 3, 4}

    noise = record_noise(monkeypatch)
    summary = pretrain(config(demo_root, out), progress=False)  # resumes from 2, ignoring the half-written 4
    assert "resuming from " + str(ckpts / "ckpt-00000002.pt") + " (step 2)" in capsys.readouterr().out
    assert summary.steps == STEPS and summary.status == "complete"
    assert sorted(noise) == list(range(2, STEPS))  # Philox counters of steps 3..6

    losses = step_losses(out)
    assert losses == reference.losses  # bit-identical, every step (those before the kill and after)
    assert len(set(losses.values())) == STEPS  # the losses do change from step to step
    for counter, drawn in noise.items():
        assert torch.equal(drawn, reference.noise[counter]), counter  # the same masks after the resume
    assert not torch.equal(noise[2], noise[3])  # and masks differ between steps
    weights = final_weights(out)
    assert weights.keys() == reference.weights.keys()
    for name, value in weights.items():
        assert torch.equal(value, reference.weights[name]), name
    assert not (ckpts / "ckpt-00000004.pt.tmp").exists()  # replaced by the completed checkpoint 4


def test_sigterm_in_one_process_saves_exits_75_and_resumes(tmp_path: Path, demo_root: Path,  # noqa: F811
                                                           reference: Reference, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    preempted = subprocess.run([sys.executable, "-m", "fastmae.cli", *cli_args(demo_root, out)], capture_output=True,
                               text=True, env=fastmae_env("sigterm@3"), timeout=120)  # SIGTERM during step 3
    assert preempted.returncode == 75, preempted.stderr[-3000:]
    assert "fastmae pretrain (rank 0): SIGTERM received" in preempted.stdout
    assert "preempted: saved step 3 and stopped" in preempted.stdout
    assert [p.name for p in list_checkpoints(ckpts)] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    assert set(step_losses(out)) == {1, 2, 3}

    summary = pretrain(config(demo_root, out), progress=False)  # the same settings, in this process
    assert "resuming from " + str(ckpts / "ckpt-00000003.pt") + " (step 3)" in capsys.readouterr().out
    assert summary.steps == STEPS and summary.status == "complete"
    assert step_losses(out) == reference.losses  # continued bit-exactly from the preemption checkpoint


def test_resuming_with_another_objective_is_refused_before_anything_is_written(
        tmp_path: Path, demo_root: Path, capsys: pytest.CaptureFixture[str], one_thread: None) -> None:  # noqa: F811
    """A run folder with checkpoints is resumed only by a run with the same model and objective: another mask
    strategy (or mask ratio, decoder, target) is exit 2 naming what differs, and the folder is left as it was."""
    from fastmae.cli import main

    out = tmp_path / "run"
    pretrain(config(demo_root, out, steps=2, save_every=2), progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(cli_args(demo_root, out, steps=4, mask_strategy="grid", mask_ratio=0.75)) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of another run" in err and "--mask-strategy 'random' (asked: 'grid')" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # the same objective with more steps resumes
    assert main(cli_args(demo_root, out, steps=4, save_every=2)) == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1].endswith("4.pt")
