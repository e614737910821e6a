"""The pieces of crash safety on their own: non-finite guard and step skipping, sharded-checkpoint commit
markers and the fallback past a damaged shard, the safe DCP metadata reader, loader-position translation, fault
specs."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata

from fastmae.train.checkpoint import (COMMIT_MARKER, NoLoadableCheckpointError, list_checkpoints,
                                      load_latest_checkpoint, prune_checkpoints, save_checkpoint)
from fastmae.train.distributed import Ranks
from fastmae.train.faults import FaultHooks, fault_hooks, faults
from fastmae.train.hooks import TrainHooks
from fastmae.train.nonfinite import NonFiniteError, NonFiniteGuard, optimizer_step, skip_syncs_host
from fastmae.train.run_log import RunLog
from fastmae.train.sharded import SafeFileSystemReader, _app_state, load_sharded, save_sharded
from fastmae.train.state import loader_position

ALONE = Ranks(0, 1, 0, torch.device("cpu"), None)


def test_guard_skips_counts_and_stops_naming_step_and_rank() -> None:
    guard = NonFiniteGuard(ALONE, max_consecutive=2)
    assert not guard.check(1, torch.tensor(1.0), torch.tensor(2.0))
    assert guard.check(2, torch.tensor(float("nan")), torch.tensor(2.0))
    guard.raise_if_exhausted()  # one bad step: not yet
    assert not guard.check(3, torch.tensor(1.0), torch.tensor(2.0))  # a good step resets the streak
    assert guard.check(4, torch.tensor(1.0), torch.tensor(float("inf")))
    assert guard.check(5, torch.tensor(float("inf")), None)
    assert guard.skipped_total() == 3
    with pytest.raises(NonFiniteError, match=r"step 5: non-finite loss on rank 0; 2 consecutive"):
        guard.raise_if_exhausted()


def test_guard_stops_after_a_streak_that_ended_before_the_check() -> None:
    """Checks run at log intervals: good steps after a full streak must not hide it."""
    guard = NonFiniteGuard(ALONE, max_consecutive=2)
    assert guard.check(1, torch.tensor(1.0), torch.tensor(float("nan")))
    assert guard.check(2, torch.tensor(float("nan")), torch.tensor(2.0))
    assert guard.check(3, torch.tensor(float("nan")), torch.tensor(2.0))
    assert not guard.check(4, torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite loss on rank 0; 2 consecutive"):
        guard.raise_if_exhausted()


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_step_skip_leaves_weights_and_state_alone(fused: bool) -> None:
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=fused, foreach=not fused)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    param.grad = torch.full((4,), 0.5)
    optimizer_step(optimizer, scaler, torch.tensor(True))
    assert torch.equal(param.detach(), torch.ones(4))
    assert not optimizer.state or float(optimizer.state[param]["step"]) == 0
    optimizer_step(optimizer, scaler, torch.tensor(False))
    assert not torch.equal(param.detach(), torch.ones(4)) and float(optimizer.state[param]["step"]) == 1


def test_only_torch_fused_adamw_skips_without_a_host_sync() -> None:
    params = [torch.nn.Parameter(torch.ones(2))]
    off, fp16 = torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=True)
    assert skip_syncs_host(torch.optim.AdamW(params, foreach=True), off)
    assert skip_syncs_host(torch.optim.SGD(params, lr=0.1), off)  # like apex's FusedAdam: no found_inf input
    assert not skip_syncs_host(torch.optim.AdamW(params, fused=True), off)
    assert not skip_syncs_host(torch.optim.AdamW(params, foreach=True), fp16)  # the GradScaler decides


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, as intended here
def test_damaged_shard_falls_back_to_the_previous_sharded_checkpoint(tmp_path: Path) -> None:
    saved = {}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.simplefilter("ignore")
        for step in (2, 4):
            model, optimizer = _trained(seed=step)
            saved[step] = model[0].weight.detach().clone()
            save_sharded(tmp_path, step, model, optimizer, {"step": step}, ALONE)
    shard = tmp_path / "ckpt-00000004" / "__0_0.distcp"
    shard.write_bytes(b"\0" * shard.stat().st_size)  # damaged after it was committed: extra.pt still reads
    model, optimizer = _trained(seed=0)
    applied = []

    def apply(path: Path, state: dict) -> None:
        applied.append(state["step"])
        load_sharded(path, model, optimizer)

    with pytest.warns(UserWarning, match=r"skipping unreadable checkpoint .*ckpt-00000004\b"):
        path, state = load_latest_checkpoint(tmp_path, apply, ALONE)
    assert path.name == "ckpt-00000002" and state["step"] == 2 and applied == [4, 2]
    assert torch.equal(model[0].weight, saved[2])

    (tmp_path / "ckpt-00000002" / "__0_0.distcp").write_bytes(b"")  # now every one is damaged
    with pytest.warns(UserWarning), pytest.raises(NoLoadableCheckpointError, match="none of the 2 checkpoints"):
        load_latest_checkpoint(tmp_path, apply, ALONE)


def test_sharded_folder_counts_only_with_its_commit_marker(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 2, {"step": 2})
    (tmp_path / "ckpt-00000004").mkdir()  # a sharded save that crashed before its marker
    (tmp_path / "ckpt-00000004" / "__0_0.distcp").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002.pt"]
    (tmp_path / "ckpt-00000006").mkdir()
    (tmp_path / "ckpt-00000006" / COMMIT_MARKER).write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002.pt", "ckpt-00000006"]
    prune_checkpoints(tmp_path, keep_last=1)  # old complete ones and the crashed leftover go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000006"]


class _Payload:
    def __reduce__(self) -> tuple:
        return (print, ("unpickled",))


def test_dcp_metadata_reader_refuses_arbitrary_objects(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.print"):
        SafeFileSystemReader(tmp_path).read_metadata()
    assert "unpickled" not in capsys.readouterr().out


def test_dcp_metadata_reader_refuses_callables_reached_through_dcp_modules(tmp_path: Path) -> None:
    """A protocol-4 dotted name walks attributes: ``<a DCP module>.os.mkdir`` must not resolve (it did)."""
    module, name, made = b"torch.distributed.checkpoint.metadata", b"os.mkdir", str(tmp_path / "made").encode()
    payload = (b"\x80\x04\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name + b"\x93"
               + b"\x8c" + bytes([len(made)]) + made + b"\x85R.")  # STACK_GLOBAL, (path,), REDUCE
    (tmp_path / ".metadata").write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle torch\.distributed\.checkpoint\.metadata\.os"):
        SafeFileSystemReader(tmp_path).read_metadata()
    assert not (tmp_path / "made").exists()


def test_dcp_metadata_reader_reads_real_metadata(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.simplefilter("ignore")
        dcp.save(_app_state(model, optimizer), storage_writer=FileSystemWriter(tmp_path, sync_files=False))
    metadata = SafeFileSystemReader(tmp_path).read_metadata()
    assert isinstance(metadata, Metadata) and "model.0.weight" in metadata.state_dict_metadata
    restored = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_sharded(tmp_path, restored, torch.optim.AdamW(restored.parameters()))
    assert torch.equal(restored[0].weight, model[0].weight)


def test_resumed_log_drops_the_rows_after_the_checkpoint(tmp_path: Path) -> None:
    rows = [json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 5, "lo')  # killed while writing step 5
    RunLog(tmp_path, ALONE, start_step=2, total_steps=6, images_per_step=8, progress=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(rows[:2])  # steps 3.. are logged again on resume


class _Loader:
    def __init__(self, batch_size: int, world_size: int, rank: int, batches: int) -> None:
        self.state = {"epoch": 0, "batch": 0, "seed": 0, "batch_size": batch_size, "world_size": world_size,
                      "rank": rank, "num_images": 100}
        self.batches = batches

    def __len__(self) -> int:
        return self.batches

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def test_loader_position_keeps_the_images_consumed_across_rank_counts() -> None:
    saved = {"epoch": 2, "batch": 3, "seed": 0, "batch_size": 4, "world_size": 2, "rank": 0, "num_images": 100}
    assert loader_position(saved, _Loader(8, 1, 0, 12)) == {**saved, "batch_size": 8, "world_size": 1, "batch": 3}
    assert loader_position(saved, _Loader(4, 2, 1, 12)) == {**saved, "rank": 1}
    end = {**saved, "batch": 12}  # taken after the last batch of the epoch
    assert loader_position(end, _Loader(4, 2, 0, 12))["epoch"] == 3
    with pytest.warns(UserWarning, match="not a whole number"):
        assert loader_position(saved, _Loader(16, 1, 0, 6))["batch"] == 1


def test_fault_specs_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    faults.cache_clear()
    monkeypatch.setenv("FASTMAE_FAULT", "nan@5:1,pause_after_save@2")
    assert [(f.kind, f.step, f.rank) for f in faults()] == [("nan", 5, 1), ("pause_after_save", 2, None)]
    faults.cache_clear()
    monkeypatch.setenv("FASTMAE_FAULT", "explode@3")
    with pytest.raises(ValueError, match="KIND@STEP"):
        faults()
    faults.cache_clear()


def test_fault_hooks_only_with_faults_and_only_on_their_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    faults.cache_clear()
    monkeypatch.delenv("FASTMAE_FAULT", raising=False)
    assert type(fault_hooks(0)) is TrainHooks  # unset: the no-op hooks
    faults.cache_clear()
    monkeypatch.setenv("FASTMAE_FAULT", "nan@3:1")
    hooks = fault_hooks(1)
    assert isinstance(hooks, FaultHooks)
    one = torch.tensor(1.0)
    assert hooks.on_loss(one, 2) is one and torch.isnan(hooks.on_loss(one, 3)) and torch.isnan(hooks.on_loss(one, 9))
    assert fault_hooks(0).on_loss(one, 3) is one  # another rank
    faults.cache_clear()
