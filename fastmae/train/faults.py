"""Faults injected on purpose, for the tests of resume, preemption and non-finite handling.

``FASTMAE_FAULT`` holds comma-separated ``KIND@STEP`` or ``KIND@STEP:RANK`` items (steps count optimiser
steps from 1, as ``metrics.jsonl`` and checkpoint names do; no rank means every rank):

- ``nan@S:R``: from step ``S`` on, rank ``R``'s loss is NaN;
- ``signal@S:R``: rank ``R`` sends itself SIGUSR1 during step ``S`` (a preemption notice);
- ``sigterm@S:R``: the same with SIGTERM (what a scheduler sends a single process before killing it);
- ``pause_in_save@S``: the save of step ``S`` stops after writing its data and before committing it;
- ``pause_after_save@S``: the run stops after committing checkpoint ``S``.

A pause prints ``fastmae-fault: paused <kind> <step>`` to stderr and sleeps until the process is killed.
``fault_hooks(rank)`` is the ``TrainHooks`` the training loop gets: ``FaultHooks`` when ``FASTMAE_FAULT`` is set,
else the no-op base class.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from functools import cache

import torch

from fastmae.train.hooks import TrainHooks

KINDS = ("nan", "signal", "sigterm", "pause_in_save", "pause_after_save")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None


@cache
def faults() -> tuple[Fault, ...]:
    items = []
    for text in filter(None, os.environ.get("FASTMAE_FAULT", "").split(",")):
        kind, _, where = text.partition("@")
        step, _, rank = where.partition(":")
        if kind not in KINDS or not step.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(f"FASTMAE_FAULT items are KIND@STEP[:RANK] with KIND in {KINDS}, got {text!r}")
        items.append(Fault(kind, int(step), int(rank) if rank else None))
    return tuple(items)


def _active(kind: str, step: int, rank: int, from_step_on: bool = False) -> bool:
    return any(f.kind == kind and (f.step <= step if from_step_on else f.step == step) and f.rank in (None, rank)
               for f in faults())


class FaultHooks(TrainHooks):
    """The faults of ``FASTMAE_FAULT`` (module docstring), injected into rank ``rank``'s training loop."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def before_step(self, step: int) -> None:
        """Send this process the preemption signal a ``signal`` (SIGUSR1) or ``sigterm`` fault names for ``step``."""
        for kind, sig in (("signal", signal.SIGUSR1), ("sigterm", signal.SIGTERM)):
            if _active(kind, step, self.rank):
                os.kill(os.getpid(), sig)

    def on_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """``loss``, or NaN from the step a ``nan`` fault names on."""
        return loss * float("nan") if _active("nan", step, self.rank, from_step_on=True) else loss

    def before_commit(self, step: int) -> None:
        self._maybe_pause("pause_in_save", step)

    def after_save(self, step: int) -> None:
        self._maybe_pause("pause_after_save", step)

    def _maybe_pause(self, kind: str, step: int) -> None:
        if _active(kind, step, self.rank):
            print(f"fastmae-fault: paused {kind} {step}", file=sys.stderr, flush=True)
            while True:
                time.sleep(60)


def fault_hooks(rank: int) -> TrainHooks:
    """``FaultHooks(rank)`` when ``FASTMAE_FAULT`` names any fault (checked here), else the no-op ``TrainHooks()``."""
    return FaultHooks(rank) if faults() else TrainHooks()
