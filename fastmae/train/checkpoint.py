"""Checkpoints that are never half-written, in two layouts; keep the last k.

- ``<dir>/ckpt-<step:08d>.pt``: one file (one process, DDP), written to a ``.tmp`` file, fsynced and renamed;
- ``<dir>/ckpt-<step:08d>/``: a ``torch.distributed.checkpoint`` folder (FSDP), complete only once its
  ``COMMITTED`` marker exists (see ``fastmae.train.sharded``).

A crash mid-save leaves a ``.tmp`` file or a folder without the marker, which are ignored. Loading never
unpickles arbitrary objects (``weights_only=True``) and falls back to the previous checkpoint when the newest
cannot be read or loaded (a damaged file, or a damaged shard of a sharded folder), every rank using the same one.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from fastmae.train.distributed import Ranks, all_ranks_agree

_NAME = re.compile(r"^ckpt-(\d{8})(\.pt)?$")
COMMIT_MARKER = "COMMITTED"
EXTRA_STATE = "extra.pt"  # a sharded folder's step, scaler, loader and RNG state


def checkpoint_path(directory: str | os.PathLike, step: int, sharded: bool = False) -> Path:
    return Path(directory) / (f"ckpt-{step:08d}" if sharded else f"ckpt-{step:08d}.pt")


def checkpoint_step(path: Path) -> int:
    match = _NAME.match(path.name)
    if match is None:
        raise ValueError(f"not a checkpoint name (ckpt-<8 digits>[.pt]): {path.name!r}")
    return int(match.group(1))


def _complete(path: Path) -> bool:
    return path.is_file() if path.suffix == ".pt" else (path / COMMIT_MARKER).is_file()


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of either layout in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in directory.iterdir() if _NAME.match(p.name) and _complete(p)]
    return [p for _, p in sorted(found)]


def fsync_dir(directory: Path) -> None:
    """Make renames and new files in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` into ``path.tmp``, fsync, rename to ``path``, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> None:
    """Delete all complete checkpoints but the newest ``keep_last`` (0: keep all), and leftovers of crashed saves
    older than the newest complete one."""
    directory = Path(directory)
    complete = list_checkpoints(directory)
    if keep_last > 0:
        for old in complete[:-keep_last]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    if complete:
        newest = checkpoint_step(complete[-1])
        for p in directory.iterdir():
            name = p.name.removesuffix(".tmp")
            if _NAME.match(name) and not _complete(p) and checkpoint_step(p.with_name(name)) < newest:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict[str, Any], keep_last: int = 3,
                    before_commit: Callable[[], None] | None = None) -> Path:
    """Write ``state`` atomically as the one-file checkpoint of ``step``; keep the newest ``keep_last``.
    ``before_commit()`` runs once the data is written and flushed, before the rename that commits it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)

    def write(f: BinaryIO) -> None:
        torch.save(state, f)
        f.flush()
        if before_commit is not None:
            before_commit()

    write_atomic(final, write)
    prune_checkpoints(directory, keep_last)
    return final


class NoLoadableCheckpointError(RuntimeError):
    """Checkpoints exist but none of them could be loaded."""


def load_latest_checkpoint(directory: str | os.PathLike, apply: Callable[[Path, dict[str, Any]], None] | None = None,
                           ranks: Ranks | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint ``(path, state)``, or ``None`` when ``directory`` holds none.

    For a sharded folder, ``state`` is its ``extra.pt`` (everything but the model and optimiser, which
    ``fastmae.train.sharded.load_sharded`` reads into the live modules). ``apply(path, state)`` loads it into the
    run (model, optimiser, training state); a checkpoint whose state file or ``apply`` raises is skipped with a
    warning naming it, and the one before is tried. Given ``ranks`` (distributed), this is a collective: the ranks
    agree on each read and each ``apply`` (an all-reduce of a success flag), so they all load the same checkpoint
    and enter ``apply``'s collectives together. Raises ``NoLoadableCheckpointError`` when ``apply`` was tried and
    failed on every readable checkpoint (it may have half-loaded the live modules, so starting afresh would be
    wrong); when no state file could be read at all, the result is ``None``.
    """
    def agreed(ok: bool) -> bool:
        return ok if ranks is None else all_ranks_agree(ok, ranks)

    applied_any = False
    found = list_checkpoints(directory)
    for path in reversed(found):
        state, error = None, None
        try:
            state = torch.load(path / EXTRA_STATE if path.is_dir() else path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file
            error = exc
        readable = agreed(error is None)
        if readable and apply is None:
            return path, state
        if readable:
            applied_any = True
            try:
                apply(path, state)
            except Exception as exc:  # a damaged shard, or state that does not fit this run
                error = exc
            if agreed(error is None):
                return path, state
        reason = f": {error}" if error is not None else ": another rank could not load it"
        warnings.warn(f"skipping unreadable checkpoint {path}{reason}", stacklevel=2)
    if applied_any:
        raise NoLoadableCheckpointError(f"none of the {len(found)} checkpoints in {directory} could be loaded (see "
                                        "the warnings); move them away to start afresh")
    return None
