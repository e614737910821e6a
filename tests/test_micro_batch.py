"""--micro-batch auto (fastmae.train.memory): the plan from measured peaks (injected here as functions of the pass
size), its refusals, the split run against the unsplit one on the CPU (with the device memory injected), the
choice kept on resume, and an out-of-memory error turned into a message. The real measurement needs CUDA: see the
gpu-marked tests at the end."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import fastmae.train.pretrain as pretrain_module
from fastmae.cli import main
from fastmae.train.config import SettingError
from fastmae.train.distributed import Ranks
from fastmae.train.memory import (MemoryPlan, agree_micro_batch, measure_pass_peak, plan_micro_batch,
                                  recorded_micro_batch)
from fastmae.train.pretrain import pretrain
from pretrain_runs import cli_args, config, demo_root, record_noise, step_losses  # noqa: F401  (demo_root: a fixture)

MB = 1 << 20


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _peaks(fixed: int, per_image: int, oom_above: int | None = None, jump: tuple[int, int] | None = None
           ) -> tuple[Callable[[int], int | None], list[int]]:
    """A measured-peak function ``fixed + per_image * n`` (bytes; ``None`` above ``oom_above`` images; ``jump``:
    (from n, extra bytes), a peak the line through small probes does not predict) and the list of sizes probed."""
    calls: list[int] = []

    def peak_of(n: int) -> int | None:
        calls.append(n)
        if oom_above is not None and n > oom_above:
            return None
        return fixed + per_image * n + (jump[1] if jump is not None and n >= jump[0] else 0)

    return peak_of, calls


def test_the_whole_batch_when_it_fits() -> None:
    peak_of, calls = _peaks(1000 * MB, 10 * MB)
    plan = plan_micro_batch(64, 10_000 * MB, peak_of, 100 * MB)
    assert (plan.micro_batch, plan.passes, plan.reason) == (64, 1, "the whole batch fits")
    assert calls == [8, 16, 64]  # two probes for the line, then the choice measured
    assert plan.describe() == ("micro-batch 64: one pass per batch of 64 images (the whole batch fits; measured "
                               "peak 1.60 GiB + AdamW state 0.10 GiB of 9.77 GiB usable)")


@pytest.mark.parametrize("batch, micro", [(64, 32), (96, 32), (90, 30)])
def test_the_fewest_equal_passes_that_fit(batch: int, micro: int) -> None:
    peak_of, calls = _peaks(1000 * MB, 100 * MB)  # 1000 + 100 n + 500 of state <= 5000: n <= 35
    plan = plan_micro_batch(batch, 5000 * MB, peak_of, 500 * MB)
    assert plan.micro_batch == micro and plan.passes == batch // micro
    assert plan.reason == "the whole batch does not fit: about 0.10 GiB per image"
    assert f"{batch // micro} passes of {micro} images per batch of {batch}" in plan.describe()
    assert calls == [batch // 8, 2 * (batch // 8), micro]  # the line's probes, then only the choice measured


def test_a_pass_the_line_wrongly_predicts_to_fit_is_measured_and_passed_over() -> None:
    peak_of, calls = _peaks(1000 * MB, 100 * MB, jump=(25, 2000 * MB))  # 32 images need 2000 MB more
    plan = plan_micro_batch(96, 5000 * MB, peak_of, 500 * MB)
    assert plan.micro_batch == 24 and calls == [12, 24, 32]  # 32 measured and refused; 24 already measured


def test_probes_that_run_out_of_memory_count_as_not_fitting() -> None:
    peak_of, calls = _peaks(1000 * MB, 100 * MB, oom_above=40)
    plan = plan_micro_batch(256, 20_000 * MB, peak_of, 500 * MB)
    assert plan.micro_batch == 32 and calls == [32, 64, 128]  # 64 and 128 run out of memory; 32 is known to fit
    peak_of, calls = _peaks(1000 * MB, 100 * MB, oom_above=2)
    assert plan_micro_batch(256, 20_000 * MB, peak_of, 0).micro_batch == 2  # 32 fails: probes at 1 and 2


def test_refused_when_one_image_does_not_fit() -> None:
    peak_of, _ = _peaks(10_000 * MB, MB)
    with pytest.raises(SettingError) as err:
        plan_micro_batch(64, 5000 * MB, peak_of, 500 * MB)
    assert str(err.value).startswith("batch_size 64 cannot fit on this device even as 64 passes of one image: one "
                                     "pass measured 9.77 GiB at its peak, plus 0.49 GiB of AdamW state, over the "
                                     "4.88 GiB usable (90% of the free device memory)")
    assert err.value.with_flags().startswith("--batch-size 64 cannot fit")
    with pytest.raises(SettingError, match="one forward\\+backward of a single image runs out of memory"):
        plan_micro_batch(64, 5000 * MB, lambda n: None, 0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        plan_micro_batch(0, 5000 * MB, peak_of, 0)


def test_a_resumed_runs_choice_is_kept_while_it_fits() -> None:
    peak_of, calls = _peaks(1000 * MB, 10 * MB)
    plan = plan_micro_batch(64, 10_000 * MB, peak_of, 0, keep=16)  # the whole batch would fit: 16 is kept
    assert (plan.micro_batch, plan.reason, calls) == (16, "kept from the run being resumed", [16])
    peak_of, _ = _peaks(1000 * MB, 100 * MB)
    plan = plan_micro_batch(64, 5000 * MB, peak_of, 500 * MB, keep=64)
    assert plan.micro_batch == 32 and plan.reason.endswith("; the resumed run's micro-batch 64 no longer fits")


def test_recorded_micro_batch_reads_config_json(tmp_path: Path) -> None:
    assert recorded_micro_batch(tmp_path, 64) is None
    (tmp_path / "config.json").write_text(json.dumps({"batch_size": 64, "micro_batch_size": 16}))
    assert recorded_micro_batch(tmp_path, 64) == 16
    assert recorded_micro_batch(tmp_path, 32) is None  # another batch size: decided again
    (tmp_path / "config.json").write_text("{not json")
    assert recorded_micro_batch(tmp_path, 64) is None


def test_one_process_agrees_with_itself() -> None:
    alone = Ranks(0, 1, 0, torch.device("cpu"), None)
    plan = MemoryPlan(64, 16, 1, 0, 2, "why")
    assert agree_micro_batch(plan, None, alone) is plan
    error = SettingError("too big", ("batch_size",))
    with pytest.raises(SettingError, match="too big"):
        agree_micro_batch(None, error, alone)


def _inject_device_memory(monkeypatch: pytest.MonkeyPatch, usable: int, per_image: int) -> list[int]:
    """The CPU trainer measures with a fake device: ``usable`` bytes, a pass of n images peaking at
    ``per_image * n``, no optimiser state; returns the sizes probed."""
    calls: list[int] = []

    def peak(model: torch.nn.Module, amp: torch.autocast, img_size: int, mask_ratio: float,
             device: torch.device, batch: int) -> int:
        calls.append(batch)
        return per_image * batch

    monkeypatch.setattr(pretrain_module, "usable_memory", lambda device: usable)
    monkeypatch.setattr(pretrain_module, "measure_pass_peak", peak)
    monkeypatch.setattr(pretrain_module, "adamw_state_bytes", lambda model: 0)
    return calls


@pytest.mark.slow
def test_split_run_trains_as_the_unsplit_one_and_resume_keeps_the_split(
        tmp_path: Path, demo_root: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture) -> None:
    """Batches of 8 in 2 passes of 4: the same images, the same masks (same Philox counters, noise rows split),
    the same losses up to the rounding of the split gradient sums (tolerance 1e-5 relative; fp32)."""
    monkeypatch.setattr(pretrain_module, "_save_figure", lambda *args: None)  # figures: seconds, not tested here
    monkeypatch.setattr(pretrain_module, "save_loss_plot", lambda *args, **kwargs: None)
    settings = {"steps": 3, "save_every": 3}
    with monkeypatch.context() as patch:
        whole_noise = record_noise(patch)
        pretrain(config(demo_root, tmp_path / "whole", **settings), progress=False)
    with monkeypatch.context() as patch:
        split_noise = record_noise(patch)
        probed = _inject_device_memory(patch, usable=5, per_image=1)  # 4 images fit, 8 do not
        pretrain(config(demo_root, tmp_path / "split", micro_batch="auto", **settings), progress=False)
    assert probed == [1, 2, 4]  # the line from 1 and 2 images, then 4 measured
    printed = capsys.readouterr().out
    assert "micro-batch 4: 2 passes of 4 images per batch of 8 (the whole batch does not fit" in printed
    saved = json.loads((tmp_path / "split" / "config.json").read_text())
    assert saved["micro_batch_size"] == 4 and saved["effective_batch_size"] == 8 and saved["micro_batch"] == "auto"
    assert split_noise.keys() == whole_noise.keys() == {0, 1, 2}
    assert all(torch.equal(split_noise[c], whole_noise[c]) for c in whole_noise)
    whole, split = step_losses(tmp_path / "whole"), step_losses(tmp_path / "split")
    for step in whole:
        assert split[step] == pytest.approx(whole[step], rel=1e-5), step

    with monkeypatch.context() as patch:  # now the whole batch would fit: the resumed run keeps its 4
        probed = _inject_device_memory(patch, usable=100, per_image=1)
        pretrain(config(demo_root, tmp_path / "split", micro_batch="auto", **{**settings, "steps": 4}),
                 progress=False)
    assert probed == [4]
    assert "micro-batch 4: 2 passes of 4 images per batch of 8 (kept from the run being resumed" in (
        capsys.readouterr().out)


def test_auto_needs_a_device_that_measures_memory(tmp_path: Path, demo_root: Path,  # noqa: F811
                                                  capsys: pytest.CaptureFixture) -> None:
    code = main(cli_args(demo_root, tmp_path / "run", micro_batch="auto"))
    assert code == 2
    assert ("--micro-batch auto measures GPU memory: it needs a CUDA device, the device is cpu"
            in capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_out_of_memory_in_training_is_a_message_not_a_traceback(tmp_path: Path, demo_root: Path,  # noqa: F811
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    def out_of_memory(self: pretrain_module.Trainer) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pretrain_module.Trainer, "train_step", out_of_memory)
    assert main(cli_args(demo_root, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert ("fastmae pretrain: --batch-size 8 ran out of cpu memory (8 images per pass); run with --micro-batch auto "
            "(the same batch, masks and learning rate, split into passes that are measured to fit), or a smaller "
            "--batch-size with a larger --accum") in err
    assert "Traceback" not in err


# --- on a GPU ------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_measured_peak_grows_with_the_pass_and_frees_its_gradients() -> None:
    import fastmae

    device = torch.device("cuda")
    model = fastmae.mae_vit_base_patch16(img_size=224, norm_pix_loss=True).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16)
    peaks = [measure_pass_peak(model, amp, 224, 0.75, device, n) for n in (8, 16, 32)]
    assert all(p is not None for p in peaks) and peaks[0] < peaks[1] < peaks[2]
    per_image = (peaks[1] - peaks[0]) / 8
    assert abs((peaks[2] - peaks[1]) / 16 - per_image) <= 0.2 * per_image  # linear in the pass size, within 20%
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.gpu
def test_auto_split_on_the_gpu_trains_as_the_whole_batch(tmp_path: Path, demo_root: Path,  # noqa: F811
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The real measurement, with the usable memory capped at what half the batch measures to need."""
    settings = {"steps": 4, "device": "cuda", "deterministic": False, "precision": "fp32", "img_size": 64,
                "batch_size": 16, "compile": False, "cuda_graph": False}
    pretrain(config(demo_root, tmp_path / "whole", **settings), progress=False)

    def capped(batch_size: int, usable: int, peak_of: Callable[[int], int | None], state: int,
               keep: int | None = None) -> MemoryPlan:  # usable: what a pass of half the batch measures to need
        return plan_micro_batch(batch_size, peak_of(batch_size // 2) + state, peak_of, state, keep)

    monkeypatch.setattr(pretrain_module, "plan_micro_batch", capped)
    pretrain(config(demo_root, tmp_path / "split", micro_batch="auto", **settings), progress=False)
    assert json.loads((tmp_path / "split" / "config.json").read_text())["micro_batch_size"] == 8
    whole, split = step_losses(tmp_path / "whole"), step_losses(tmp_path / "split")
    for step in whole:
        assert split[step] == pytest.approx(whole[step], rel=1e-4), step
