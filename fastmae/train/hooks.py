"""``TrainHooks``: the points where code outside the training loop may act on it, each a no-op here.

The loop of ``fastmae.train.pretrain.Trainer`` calls them; ``fastmae.train.faults.FaultHooks`` (built only when
``FASTMAE_FAULT`` is set) uses them to inject the faults the resume, preemption and non-finite tests need.
Steps count optimiser steps from 1, as ``metrics.jsonl`` and checkpoint names do.
"""

from __future__ import annotations

import torch


class TrainHooks:
    """Called by the training loop at fixed points; every method of this base class does nothing."""

    def before_step(self, step: int) -> None:
        """Step ``step`` is about to run (its learning rate is set, no batch is read yet)."""

    def on_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss of one forward pass of step ``step``, before its backward pass; returns the loss to use."""
        return loss

    def before_commit(self, step: int) -> None:
        """The checkpoint of ``step`` is written but not yet committed (renamed into place / marked complete)."""

    def after_save(self, step: int) -> None:
        """The checkpoint of ``step`` is committed on every rank."""
