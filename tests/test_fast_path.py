"""The trainer's step path (fastmae.train.cuda_graph): which path each config gets and the line it prints, the
refusals, and the captured step's logic run uncaptured on the CPU against the eager step. The capture itself
needs CUDA: the gpu-marked tests at the end compare graphed and eager trainer runs there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fastmae.train.pretrain as pretrain_module
from fastmae.cli import build_parser
from fastmae.train.checkpoint import checkpoint_path
from fastmae.train.config import PretrainConfig, SettingError
from fastmae.train.cuda_graph import FastPath, GraphedStep, capturable_adamw, choose_fast_path
from fastmae.train.hooks import TrainHooks
from fastmae.train.pretrain import pretrain
from pretrain_runs import config, demo_root, final_weights, step_losses  # noqa: F401  (demo_root: a fixture)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _path(device: torch.device = CUDA, world_size: int = 1, precision: str = "bf16", hooks: bool = False,
          **settings: object) -> FastPath:
    return choose_fast_path(PretrainConfig(**settings), device, world_size, precision, hooks)


def test_auto_path_on_cuda_one_process_is_graphed_not_compiled() -> None:
    """The fastest measured path (bench/results/nvidia-h200.csv: fastmae-cudagraph); compiled steps are unmeasured."""
    path = _path()
    assert (path.compile, path.cuda_graph, path.param_dtype, path.fp8_recipe) == (False, True, "fp32", None)
    assert path.describe() == ("step: eager + CUDA graph (not compiled: auto (a compiled step is not yet measured "
                               "faster than the eager one on a GPU; --compile compiles); CUDA graph: auto on CUDA, one "
                               "process; fp32 parameters: auto (bf16 parameters, --param-dtype bf16, are not yet "
                               "measured faster on a GPU))")
    fp8 = _path(precision="fp8")
    assert (fp8.compile, fp8.cuda_graph) == (True, True)
    assert "compile: auto for float8 on CUDA" in fp8.describe()


def test_auto_path_on_cpu_stays_eager() -> None:
    path = _path(CPU, precision="fp32")
    assert (path.compile, path.cuda_graph) == (False, False)
    line = path.describe()
    assert line.startswith("step: eager (not compiled: auto (a compiled step is not yet measured faster than the "
                           "eager one on a GPU; --compile compiles); no CUDA graph: CUDA graphs need a CUDA device, the "
                           "device is cpu;"), line


@pytest.mark.parametrize("case, why", [
    ({"world_size": 2}, "2 ranks: the DDP/FSDP gradient collectives are not captured"),
    ({"precision": "fp16"}, "fp16's GradScaler decides its skipped steps on the host"),
    ({"hooks": True}, "a hook (FASTMAE_FAULT) changes the loss in Python at chosen steps"),
])
def test_auto_falls_back_to_eager_steps_and_says_why(case: dict, why: str) -> None:
    path = _path(**case)
    assert not path.compile and not path.cuda_graph
    assert f"no CUDA graph: {why}" in path.describe()


def test_asked_for_cuda_graph_that_cannot_run_is_refused() -> None:
    with pytest.raises(SettingError, match="cuda_graph cannot be used here: CUDA graphs need a CUDA device") as err:
        _path(CPU, precision="fp32", cuda_graph=True)
    assert err.value.with_flags().startswith("--cuda-graph cannot be used here")
    with pytest.raises(SettingError, match="2 ranks"):
        _path(world_size=2, cuda_graph=True)


def test_flags_turn_each_part_off() -> None:
    path = _path(compile=False, cuda_graph=False)
    assert (path.compile, path.cuda_graph) == (False, False)
    assert "not compiled: --no-compile" in path.describe() and "no CUDA graph: --no-cuda-graph" in path.describe()
    args = build_parser(with_bench_flags=False).parse_args(
        ["pretrain", "--no-compile", "--no-cuda-graph", "--param-dtype", "bf16", "--micro-batch", "auto",
         "--precision", "fp8", "--fp8-recipe", "rowwise"])
    assert (args.compile, args.cuda_graph, args.param_dtype, args.micro_batch, args.precision, args.fp8_recipe) == (
        False, False, "bf16", "auto", "fp8", "rowwise")


def test_bf16_parameters_need_bf16_autocast_and_one_process() -> None:
    path = _path(param_dtype="bf16")
    assert path.param_dtype == "bf16" and "bf16 parameters with fp32 masters" in path.describe()
    with pytest.raises(SettingError, match="needs precision bf16, got fp32"):
        _path(CPU, precision="fp32", param_dtype="bf16")  # precision unset on a CPU: fp32
    with pytest.raises(SettingError, match="for one process"):
        _path(world_size=2, param_dtype="bf16")
    with pytest.raises(SettingError, match="needs precision bf16, got fp16"):
        PretrainConfig(param_dtype="bf16", precision="fp16")
    with pytest.raises(SettingError, match=r"param_dtype must be one of \['fp32', 'bf16'\]"):
        PretrainConfig(param_dtype="fp16")
    with pytest.raises(SettingError, match="cuda_graph cannot be used with precision fp16"):
        PretrainConfig(cuda_graph=True, precision="fp16")


# --- the captured step's logic, run uncaptured on the CPU (GraphedStep calls its body eagerly off CUDA) ---------

def test_capturable_adamw_reads_its_lr_tensor_and_saves_a_float() -> None:
    param = torch.nn.Parameter(torch.ones(4))
    optimizer, lr = capturable_adamw([{"params": [param], "weight_decay": 0.0}], 0.1, (0.9, 0.95), CPU)
    saved = optimizer.state_dict()
    assert type(saved["param_groups"][0]["lr"]) is float and saved["param_groups"][0]["lr"] == pytest.approx(0.1)
    optimizer.load_state_dict(saved)  # a checkpoint's float: the tensor is put back
    assert optimizer.param_groups[0]["lr"] is lr
    lr.fill_(0.0)
    param.grad = torch.ones(4)
    optimizer.step()
    assert torch.equal(param.detach(), torch.ones(4))  # lr 0: no change
    lr.fill_(0.5)
    optimizer.step()
    assert param.detach().lt(1).all()  # the tensor is what the step reads


def test_graphed_step_copies_batches_into_fixed_buffers() -> None:
    seen: list[float] = []

    def body(batches: list, no_update: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seen.append(float(batches[0][0].sum()))
        return (batches[0][0].sum() + batches[1][1].sum(),)

    lr = torch.zeros(())
    step = GraphedStep(body, lr, lambda: None, CPU)
    first = [(torch.ones(2, 3), torch.zeros(2, 4)), (torch.ones(2, 3), torch.ones(2, 4))]
    assert step(iter(first), 0.5)[0].item() == 6 + 8 and lr.item() == 0.5
    buffers = [t.data_ptr() for pair in step.static for t in pair]
    out = step(iter([(2 * torch.ones(2, 3), torch.zeros(2, 4)), (torch.ones(2, 3), torch.ones(2, 4))]), 0.25)
    assert out[0].item() == 12 + 8 and seen == [6.0, 12.0]
    assert [t.data_ptr() for pair in step.static for t in pair] == buffers  # the same static tensors, refilled
    with pytest.raises(ValueError, match=r"fixed shapes: expected \(2, 3\) torch.float32, got \(1, 3\)"):
        step(iter([(torch.ones(1, 3), torch.zeros(2, 4))]), 0.1)
    with pytest.raises(ValueError, match="takes 2 batches, got 1"):
        step(iter(first[:1]), 0.1)


def _graphed_on_cpu(monkeypatch: pytest.MonkeyPatch, param_dtype: str = "fp32") -> None:
    """Make the trainer take the CUDA-graph path on the CPU: capturable fused AdamW with a tensor learning rate,
    the step's body on static buffers, the skip decided inside the body."""
    path = FastPath(compile=False, cuda_graph=True, param_dtype=param_dtype, fp8_recipe=None, reasons=("test",))
    monkeypatch.setattr(pretrain_module, "choose_fast_path", lambda *args: path)


class _NanAtStep(TrainHooks):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        return loss * float("nan") if step == self.step else loss


@pytest.mark.slow
def test_graph_body_trains_as_the_eager_step(tmp_path: Path, demo_root: Path,  # noqa: F811
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph path's step (fused capturable AdamW, device learning rate, on-device skip, static buffers, two
    accumulation passes) against the eager step (foreach AdamW): the same losses up to the two AdamWs' fp32
    rounding (measured on 2 CPU cores: equal logged losses, weights within 1.3e-7), a NaN step skipped by both,
    checkpoints with a float lr that resume into either path."""
    monkeypatch.setattr(pretrain_module, "_save_figure", lambda *args: None)  # figures: seconds, not tested here
    monkeypatch.setattr(pretrain_module, "save_loss_plot", lambda *args, **kwargs: None)
    settings = {"accum": 2, "batch_size": 4, "save_every": 3, "steps": 5}
    eager_out, graph_out = tmp_path / "eager", tmp_path / "graph"
    eager = pretrain(config(demo_root, eager_out, **settings), progress=False, hooks=_NanAtStep(2))
    with monkeypatch.context() as patch:
        _graphed_on_cpu(patch)
        graphed = pretrain(config(demo_root, graph_out, **settings), progress=False, hooks=_NanAtStep(2))
    assert eager.skipped_steps == graphed.skipped_steps == 1
    want, got = step_losses(eager_out), step_losses(graph_out)
    assert want.keys() == got.keys() and want[2] is None and got[2] is None
    for step in want:
        if want[step] is not None:
            assert got[step] == pytest.approx(want[step], rel=1e-5), step
    eager_weights = final_weights(eager_out, 5)
    for name, value in final_weights(graph_out, 5).items():
        torch.testing.assert_close(value, eager_weights[name], rtol=1e-4, atol=1e-6, msg=name)
    saved = torch.load(checkpoint_path(graph_out / "checkpoints", 3), weights_only=True)["optimizer"]
    assert all(type(group["lr"]) is float for group in saved["param_groups"])
    assert all(group["capturable"] for group in saved["param_groups"])
    assert json.loads((graph_out / "config.json").read_text())["cuda_graph"] is True

    # the eager run's checkpoint resumes on the graph path (and its lr is the device tensor again), and back
    with monkeypatch.context() as patch:
        _graphed_on_cpu(patch)
        resumed = pretrain(config(demo_root, eager_out, **{**settings, "steps": 6}), progress=False)
    assert resumed.steps == 6
    back = pretrain(config(demo_root, graph_out, **{**settings, "steps": 6}), progress=False)
    assert back.steps == 6
    assert step_losses(graph_out)[6] == pytest.approx(step_losses(eager_out)[6], rel=1e-5)
    eager_weights = final_weights(eager_out, 6)  # step 6's update at step 6's learning rate on both paths
    for name, value in final_weights(graph_out, 6).items():
        torch.testing.assert_close(value, eager_weights[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
def test_bf16_parameters_train_on_the_graph_path(tmp_path: Path, demo_root: Path,  # noqa: F811
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    """--param-dtype bf16 through the trainer (on the graph path's body): fp32 checkpoints, the figure drawn."""
    _graphed_on_cpu(monkeypatch, "bf16")
    out = tmp_path / "run"
    summary = pretrain(config(demo_root, out, steps=2, precision="bf16", deterministic=False), progress=False)
    assert summary.status == "complete" and summary.final_loss == summary.final_loss
    weights = final_weights(out, 2)
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert (out / "reconstruction.png").is_file()
    assert "step: eager + CUDA graph + bf16 parameters with fp32 masters (test)" in capsys.readouterr().out


# --- on a GPU ------------------------------------------------------------------------------------------------------

def _gpu_losses(out: Path, data: Path, steps: int, **settings: object) -> list[float]:
    """The losses of a ``steps``-step bf16 run of the tiny preset at 64 px on the GPU (``settings`` override)."""
    cfg = config(data, out, **{"steps": steps, "device": "cuda", "deterministic": False, "precision": "bf16",
                               "log_every": 1, "save_every": steps, "img_size": 64, "batch_size": 16, **settings})
    pretrain(cfg, progress=False)
    return [step_losses(out)[s] for s in range(1, steps + 1)]


@pytest.mark.gpu
def test_graphed_trainer_matches_eager_for_twenty_steps(tmp_path: Path, demo_root: Path) -> None:  # noqa: F811
    """Tolerance: bf16 noise, measured in the same test as the largest relative gap of the eager bf16 run to an
    eager fp32 run (at least 1e-3): the graph replays the eager step's kernels, with a capturable fused AdamW."""
    fp32 = _gpu_losses(tmp_path / "fp32", demo_root, 20, compile=False, cuda_graph=False, precision="fp32")
    eager = _gpu_losses(tmp_path / "eager", demo_root, 20, compile=False, cuda_graph=False)
    graphed = _gpu_losses(tmp_path / "graphed", demo_root, 20, compile=False, cuda_graph=True)
    compiled = _gpu_losses(tmp_path / "compiled", demo_root, 20)  # the default on CUDA: compiled + CUDA graph
    noise = max(1e-3, max(abs(e - f) / abs(f) for e, f in zip(eager, fp32)))
    for step, (e, g, c) in enumerate(zip(eager, graphed, compiled), start=1):
        assert abs(g - e) / abs(e) <= 2 * noise, f"step {step}: graphed {g} vs eager {e} (noise {noise:.1e})"
        assert abs(c - e) / abs(e) <= 2 * noise, f"step {step}: compiled+graphed {c} vs eager {e}"
    saved = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert saved["compile"] is True and saved["cuda_graph"] is True


@pytest.mark.gpu
def test_graphed_trainer_with_accumulation_and_bf16_parameters_matches_eager(tmp_path: Path,
                                                                             demo_root: Path) -> None:  # noqa: F811
    """Two accumulation passes, bf16 parameters with fp32 masters, clipping: graphed vs eager (1e-2 relative: the
    same kernels, optimisers that differ in rounding, bf16 steps)."""
    settings = {"compile": False, "accum": 2, "param_dtype": "bf16", "clip_grad": 1.0, "blr": 1.5e-3}
    eager = _gpu_losses(tmp_path / "eager", demo_root, 6, cuda_graph=False, **settings)
    graphed = _gpu_losses(tmp_path / "graphed", demo_root, 6, cuda_graph=True, **settings)
    for step, (e, g) in enumerate(zip(eager, graphed), start=1):
        assert abs(g - e) / abs(e) <= 1e-2, f"step {step}: graphed {g} vs eager {e}"
