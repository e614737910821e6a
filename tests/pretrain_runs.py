"""Shared by the resume and distributed tests: the tiny deterministic fp32 run, its command line, and one
uninterrupted single-process reference run of it (made once per session)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fastmae.train.pretrain as pretrain_module
from fastmae.data import demo_dataset
from fastmae.train.checkpoint import checkpoint_path
from fastmae.train.config import PretrainConfig
from fastmae.train.pretrain import pretrain

STEPS = 6
GLOBAL_BATCH = 8
# the tiny preset on 32 px crops (4 patches, 1 kept): a few steps take seconds on two CPU cores
SETTINGS = {"model": "mae_vit_tiny_patch16", "steps": STEPS, "img_size": 32, "batch_size": GLOBAL_BATCH,
            "log_every": 1, "save_every": 2, "keep_last": 3, "num_workers": 0, "device": "cpu",
            "deterministic": True, "precision": "fp32", "loader": "torch", "seed": 3}


def config(data: Path, out: Path, **overrides: object) -> PretrainConfig:
    return PretrainConfig(**{**SETTINGS, "data": str(data), "output": str(out), **overrides})


def cli_args(data: Path, out: Path, **overrides: object) -> list[str]:
    """``fastmae pretrain`` flags equal to :func:`config` with the same arguments."""
    args = ["pretrain", "--no-progress"]
    for key, value in {**SETTINGS, "data": str(data), "output": str(out), **overrides}.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def step_losses(out: Path) -> dict[int, float | None]:
    """Per-step loss from ``metrics.jsonl``; a step logged twice (before a kill, after the resume) keeps the last."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


@dataclass
class Reference:
    out: Path
    losses: dict[int, float | None]
    noise: dict[int, torch.Tensor]  # Philox counter -> the (B, L) noise given to the model
    weights: dict[str, torch.Tensor]


def record_noise(monkeypatch: pytest.MonkeyPatch) -> dict[int, torch.Tensor]:
    """Record every mask noise the training loop draws, by Philox counter."""
    recorded: dict[int, torch.Tensor] = {}
    draw = pretrain_module.mask_noise

    def recording(seed: int, counter: int, *args: object) -> torch.Tensor:
        recorded[counter] = draw(seed, counter, *args)
        return recorded[counter]

    monkeypatch.setattr(pretrain_module, "mask_noise", recording)
    return recorded


def final_weights(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_path(out / "checkpoints", step), weights_only=True)["model"]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_dataset(tmp_path_factory.mktemp("cache"), crops_per_photo=4, size=64)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> Reference:
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as monkeypatch:
        noise = record_noise(monkeypatch)
        summary = pretrain(config(demo_root, out), progress=False)
    assert summary.steps == STEPS and summary.status == "complete"
    return Reference(out, step_losses(out), noise, final_weights(out))


def fastmae_env(fault: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FASTMAE_FAULT", None)
    if fault:
        env["FASTMAE_FAULT"] = fault
    return env


def run_until_paused(args: list[str], fault: str, timeout: float = 180) -> None:
    """Run ``fastmae <args>`` with a ``pause_*`` fault, wait for it to pause there, and SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-m", "fastmae.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=fastmae_env(fault))
    kind, _, step = fault.partition("@")
    marker = f"fastmae-fault: paused {kind} {step}"
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if marker in line:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        timer.cancel()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and any(marker in line for line in seen), "".join(seen)[-3000:]


def torchrun(args: list[str], fault: str | None = None, nproc: int = 2,
             timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fastmae.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=fastmae_env(fault), timeout=timeout)
