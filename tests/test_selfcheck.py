"""fastmae.selfcheck: its commands are valid ``fastmae`` command lines with the settings it documents, its verdict
follows the margins, and (slow) the whole chain learns on the synthetic shapes: pretrain -> linear probe and
fine-tuning far above chance, fine-tuning from the MAE above fine-tuning from scratch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fastmae.cli import build_parser
from fastmae.finetune.config import FinetuneConfig, LinprobeConfig
from fastmae.selfcheck import (
    MARGINS,
    STAGES,
    Margins,
    Recipe,
    SelfCheckResult,
    Stage,
    run_selfcheck,
    stage_commands,
)
from fastmae.train.config import PretrainConfig


def _config(argv: list[str], cls: type) -> object:
    """The config ``fastmae <argv>`` builds (the flags given, as the CLI merges them)."""
    args = build_parser(with_bench_flags=False).parse_args(argv)
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None})


def test_stage_commands_are_valid_with_the_documented_settings(tmp_path) -> None:
    recipe = Recipe()
    data = {split: tmp_path / split for split in ("train", "val", "pretrain")}
    commands = stage_commands(tmp_path, data, seed=3, recipe=recipe)
    assert list(commands) == list(STAGES)

    pre = _config(commands["pretrain"], PretrainConfig)
    assert (pre.data, pre.steps, pre.mask_ratio, pre.norm_pix_loss, pre.seed) == (
        str(data["pretrain"]), recipe.pretrain_steps, 0.5, True, 3)

    probe = _config(commands["linprobe"], LinprobeConfig)
    assert probe.pretrained == str(tmp_path / "pretrain") and probe.data == str(data["train"])
    assert probe.resolved_accum(1) == 1 and probe.steps == recipe.probe_steps
    assert probe.global_pool is False  # the recipe's cls token
    epochs = recipe.probe_steps * recipe.probe_batch / (recipe.labelled_per_class * 8)
    assert probe.warmup_epochs == pytest.approx(epochs / 10, rel=1e-3)

    tuned, scratch = _config(commands["finetune"], FinetuneConfig), _config(commands["scratch"], FinetuneConfig)
    assert tuned.pretrained == str(tmp_path / "pretrain") and scratch.pretrained is None
    assert tuned.output != scratch.output
    # apart from the initialisation and the output, the two fine-tuning runs are the same command
    differs = {f.name for f in dataclasses.fields(FinetuneConfig) if getattr(tuned, f.name) != getattr(scratch, f.name)}
    assert differs == {"pretrained", "output"}
    assert not tuned.mixup_active and tuned.auto_augment is None and tuned.reprob == 0 and tuned.drop_path == 0
    assert tuned.resolved_accum(1) == 1 and tuned.layer_decay == 0.65 and tuned.smoothing == 0.1

    args = build_parser(with_bench_flags=False).parse_args(commands["eval"])
    assert (args.checkpoint, args.data) == (str(tmp_path / "finetune"), str(data["val"]))


def _result(probe: float, tuned: float, scratch: float, scored: float) -> SelfCheckResult:
    stages = [Stage("pretrain", [])] + [Stage(name, [], acc1=acc) for name, acc in
                                        (("linprobe", probe), ("finetune", tuned), ("scratch", scratch),
                                         ("eval", scored))]
    return SelfCheckResult(seed=0, stages=stages, chance=12.5, data_seconds=0.0)


def test_failures_follow_the_margins() -> None:
    margins = Margins(probe_over_chance=5.0, finetune_over_chance=10.0, mae_over_scratch=2.0)
    assert _result(17.5, 40.0, 38.0, 40.0).failures(margins) == []
    assert [line.split()[0] for line in _result(17.4, 22.4, 21.0, 22.5).failures(margins)] == [
        "linear", "fine-tuned", "fine-tuned", "fastmae"]
    only_gap = _result(30.0, 40.0, 38.1, 40.0).failures(margins)
    assert len(only_gap) == 1 and "from scratch 38.1%" in only_gap[0]
    with pytest.raises(ValueError, match="these did not run: \\['eval'\\]"):
        SelfCheckResult(0, _result(30, 40, 30, 40).stages[:-1], 12.5, 0.0).failures(margins)


def test_bad_stage_or_threads_raise(tmp_path) -> None:
    with pytest.raises(ValueError, match="stages must be among"):
        run_selfcheck(tmp_path, stages=("pretrain", "distill"))
    with pytest.raises(ValueError, match="threads must be an int >= 1 or None"):
        run_selfcheck(tmp_path, threads=0)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_the_chain_learns(tmp_path: Path) -> None:
    """The whole check, seed 0 (about 3 minutes on 2 cores): pretraining, the probe, fine-tuning from the MAE and
    from scratch, and ``fastmae eval``, judged by ``MARGINS`` (set from several seeds: see fastmae/selfcheck.py)."""
    result = run_selfcheck(tmp_path, seed=0)
    print("\n" + result.table())
    assert [stage.name for stage in result.stages] == list(STAGES)
    assert (tmp_path / "pretrain" / "reconstruction.png").is_file()
    assert result.failures(MARGINS) == []
