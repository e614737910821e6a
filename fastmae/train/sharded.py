"""Sharded checkpoints for FSDP: a ``torch.distributed.checkpoint`` (DCP) folder per step, committed by a
marker file, readable by any number of ranks (a run saved on 8 ranks resumes on 1, and the other way round).

Layout of ``ckpt-<step:08d>/``: DCP's ``.metadata`` and ``__<rank>_0.distcp`` shards of the model and
optimiser state, ``extra.pt`` (step, scaler, loader position, RNG state of every rank), then ``COMMITTED``,
written by rank 0 after every rank has finished writing. A folder without the marker is ignored.

Loading unpickles nothing arbitrary: DCP's metadata goes through an unpickler that admits only DCP's own
metadata classes and torch's dtype/layout/size types, and its non-tensor items are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fastmae.train.checkpoint import COMMIT_MARKER, EXTRA_STATE, checkpoint_path, fsync_dir, write_atomic
from fastmae.train.distributed import Ranks, barrier

_TORCH_TYPES = (torch.dtype, torch.layout, torch.memory_format)
_ADMITTED = {  # besides DCP's own classes: plain containers, torch.Size, paths, and torch's layout-by-name lookup
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("builtins", "set"),
    ("builtins", "frozenset"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits the classes of DCP metadata and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ADMITTED:
            return super().find_class(module, name)
        if module.startswith("torch.distributed.checkpoint.") and "." not in name:  # a dotted name walks attributes
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__.startswith("torch.distributed.checkpoint."):
                return found  # a class DCP defines (not one of the modules or functions it imports)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_TYPES):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from checkpoint metadata")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} does not hold DCP metadata, got {type(metadata).__name__}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` reading non-tensor items with ``weights_only=True`` (the base class does not)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        item = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], item)
        else:
            self.state_dict[read_item.dest_index.fqn] = item


def _app_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict[str, Any], ranks: Ranks, before_commit: Callable[[], None] | None = None) -> Path:
    """Collective: every rank writes its shards of ``ckpt-<step>/``; rank 0 writes ``extra`` and then the marker
    (``before_commit()`` runs on rank 0 between the two)."""
    final = checkpoint_path(directory, step, sharded=True)
    if ranks.is_main:
        if final.exists():  # the leftover of a crashed save of this step
            shutil.rmtree(final)
        final.mkdir(parents=True)
    barrier(ranks)
    dcp.save(_app_state(model, optimizer), storage_writer=FileSystemWriter(final, sync_files=True))
    if ranks.is_main:
        write_atomic(final / EXTRA_STATE, lambda f: torch.save(extra, f))
        if before_commit is not None:
            before_commit()
        marker = json.dumps({"step": step, "world_size": ranks.world_size}).encode()
        write_atomic(final / COMMIT_MARKER, lambda f: f.write(marker))
        fsync_dir(directory)
    barrier(ranks)
    return final


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read the model and optimiser state of the checkpoint folder ``path`` into ``model`` and ``optimizer``,
    resharded for however many ranks run now (collective when distributed).

    A damaged shard raises ``RuntimeError`` on every rank (DCP's ``CheckpointException``, a ``BaseException``
    carrying every failing rank's traceback, becomes one line per failing rank)."""
    state = _app_state(model, optimizer)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    except dcp.CheckpointException as exc:
        failures = "; ".join(f"rank {rank}: " + ": ".join([type(error).__name__, *str(error).splitlines()[:1]])
                             for rank, (error, _) in exc.failures.items())
        raise RuntimeError(f"cannot read the shards of {path}: {failures}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
