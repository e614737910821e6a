"""The fast step of ``fastmae pretrain`` and ``fastmae bench``: one CUDA graph for a whole optimiser step, and the
choice of the trainer's step path (compiled or not, captured or not, bf16 parameters or not) with its reason.

Design:

- Capture (:func:`capture_cuda_graph`, shared with the benchmark's ``step_runner``): a few eager steps on a side
  stream first (lazy optimiser state, autotuning, ``torch.compile``'s compilation), the gradients set to None so
  that the captured backward allocates them from the graph's pool and each replay writes them afresh, the cached
  blocks of the warm-up released (else they would sit beside the graph's private pool: twice the activation
  memory reserved), then one capture.
- Why a whole MAE step is static: the kept-token count ``int(L * (1 - mask_ratio))`` is fixed, so every shape is;
  the loader always yields full batches (``drop_last``). The trainer's step (:class:`GraphedStep`) copies each
  batch and its masking noise (drawn eagerly from ``(seed, step)``, ``fastmae.train.masks``) into static buffers.
- What the trainer's graph holds: every forward/backward pass of the step (accumulation and ``--micro-batch``
  passes included), the gradient norm, clipping, the non-finite test (:func:`nonfinite_flag`), torch's fused
  AdamW with ``capturable=True`` skipping the update on the device when the test fails, and zeroing the gradients.
  The learning rate is a device tensor the optimiser reads (:func:`capturable_adamw`), set before each replay;
  checkpoints still hold it as a float. The non-finite guard's counters are kept eagerly after each replay from
  the same loss and norm (``NonFiniteGuard.check``: the same test, so the same decision).
- The warm-up steps run the whole step with the update forced off (``found_inf``: fused AdamW leaves parameters,
  moments and step counts as they were), so the first replay is step 1 of the same run an eager step makes.
- What cannot be captured falls back to eager steps when the path is chosen automatically, and is refused when
  ``cuda_graph`` is asked for (:func:`choose_fast_path`): a device other than CUDA; several ranks (DDP's and
  FSDP's gradient collectives run from their own hooks and streams, not captured here); fp16 (``GradScaler``
  decides its skips on the host); hooks that change the loss in Python at chosen steps (``FASTMAE_FAULT``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch

from fastmae.train.config import PretrainConfig, SettingError
from fastmae.train.master_weights import MasterWeights
from fastmae.train.nonfinite import optimizer_step
from fastmae.train.optim import OptimizerChoice

GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before capture (lazy state, autotuning, compilation)
PAPER_BETAS = (0.9, 0.95)  # AdamW's betas in the paper's recipe, as fastmae.train.optim.build_optimizer's default
CAPTURABLE_ADAMW = OptimizerChoice("torch.optim.AdamW(fused=True, capturable=True)",
                                   "the step is captured in a CUDA graph")
T = TypeVar("T")


def capture_cuda_graph(step: Callable[[], T], zero_grad: Callable[[], None], device: torch.device,
                       warmup_steps: int = GRAPH_WARMUP_STEPS) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run ``step`` ``warmup_steps`` times on a side stream, then capture it once; returns the graph and the
    captured outputs (static tensors that each ``graph.replay()`` overwrites). ``zero_grad()`` sets the gradients
    to None before each warm-up step and before the capture."""
    if device.type != "cuda":
        raise ValueError(f"capture_cuda_graph needs a CUDA device, got {device}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            zero_grad()
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    zero_grad()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # the warm-up's cached blocks: else they stay reserved beside the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = step()
    return graph, outputs


def nonfinite_flag(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """Whether a step must be skipped: its loss or gradient norm is not finite (a bool device scalar), the test
    ``NonFiniteGuard.check`` makes for one process."""
    return ~(torch.isfinite(loss) & torch.isfinite(grad_norm))


class _SkippingOptimizer:
    """An optimiser that ``MasterWeights.step`` steps: the update goes through ``optimizer_step`` (skipped on the
    device for torch's fused AdamW, else after reading ``skip`` on the host)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skip: torch.Tensor) -> None:
        self.optimizer, self.scaler, self.skip = optimizer, scaler, skip

    def step(self) -> None:
        optimizer_step(self.optimizer, self.scaler, self.skip)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skip: torch.Tensor,
           masters: MasterWeights | None) -> None:
    """The optimiser update of a step, skipped when ``skip``: ``optimizer_step``, through the fp32 masters when the
    parameters are bf16 (``optimizer`` is then the one built on ``masters.param_groups``)."""
    if masters is None:
        optimizer_step(optimizer, scaler, skip)
    else:
        masters.step(_SkippingOptimizer(optimizer, scaler, skip))


def capturable_adamw(groups: list[dict], lr: float, betas: tuple[float, float],
                     device: torch.device) -> tuple[torch.optim.AdamW, torch.Tensor]:
    """torch's fused AdamW with ``capturable=True`` over ``groups`` and its learning rate: a float32 device scalar
    every group reads (set it with ``fill_`` before each step or replay). Its ``state_dict()`` holds the learning
    rate as a float, as any other run's checkpoint does; ``load_state_dict`` puts the tensor back."""
    lr_tensor = torch.tensor(lr, dtype=torch.float32, device=device)
    optimizer = torch.optim.AdamW(groups, lr=lr_tensor, betas=betas, fused=True, capturable=True)

    def share_lr(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group["lr"] = lr_tensor

    def lr_as_float(opt: torch.optim.Optimizer, state: dict) -> dict:
        for group in state["param_groups"]:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = float(group["lr"])
        return state

    share_lr(optimizer)
    optimizer.register_load_state_dict_post_hook(share_lr)
    optimizer.register_state_dict_post_hook(lr_as_float)
    return optimizer, lr_tensor


Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, 3, S, S) and their masking noise (B, L)


class GraphedStep:
    """The trainer's whole optimiser step, replayed from one CUDA graph captured at the first call.

    ``body(batches, no_update) -> outputs``: the step on the static ``batches`` (one ``(imgs, noise)`` per
    accumulation pass), its update skipped where ``no_update`` (a bool device scalar) is set, returning device
    tensors. Each call copies the step's batches into the static buffers, sets the learning rate tensor ``lr``,
    replays, and returns copies of the outputs. On a device other than CUDA (the CPU tests of this path) the same
    body runs eagerly on the same static buffers."""

    def __init__(self, body: Callable[[list[Batch], torch.Tensor], tuple[torch.Tensor, ...]], lr: torch.Tensor,
                 zero_grad: Callable[[], None], device: torch.device) -> None:
        self.body, self.lr, self.zero_grad, self.device = body, lr, zero_grad, device
        self.static: list[Batch] = []
        self.no_update = torch.zeros((), dtype=torch.bool, device=device)
        self._replay: Callable[[], tuple[torch.Tensor, ...]] | None = None

    def __call__(self, batches: Iterable[Batch], lr: float) -> tuple[torch.Tensor, ...]:
        """One step on ``batches`` at learning rate ``lr``: the outputs of ``body`` (copies, the caller's to keep)."""
        count = 0
        for i, (imgs, noise) in enumerate(batches):  # copied as they come: a loader may reuse its buffers
            if self._replay is None:
                self.static.append((imgs.clone(), noise.clone()))
            else:
                if i >= len(self.static):
                    raise ValueError(f"a captured step takes {len(self.static)} batches, got more")
                for static, given in zip(self.static[i], (imgs, noise)):
                    if given.shape != static.shape or given.dtype != static.dtype:
                        raise ValueError(f"a captured step takes fixed shapes: expected {tuple(static.shape)} "
                                         f"{static.dtype}, got {tuple(given.shape)} {given.dtype}")
                    static.copy_(given)
            count += 1
        if count != len(self.static):
            raise ValueError(f"a captured step takes {len(self.static)} batches, got {count}")
        self.lr.fill_(lr)
        if self._replay is None:
            self._replay = self._capture()
        return tuple(t.clone() for t in self._replay())

    def _capture(self) -> Callable[[], tuple[torch.Tensor, ...]]:
        def step() -> tuple[torch.Tensor, ...]:
            return self.body(self.static, self.no_update)

        if self.device.type != "cuda":
            return step
        self.no_update.fill_(True)  # warm-up steps leave parameters, moments and step counts as they are
        graph, outputs = capture_cuda_graph(step, self.zero_grad, self.device)
        self.no_update.fill_(False)

        def replay() -> tuple[torch.Tensor, ...]:
            graph.replay()
            return outputs

        return replay  # its closure keeps the graph, its memory pool and the static outputs alive


@dataclass(frozen=True)
class FastPath:
    """How the trainer's step runs, and why: ``describe()`` is the line the run prints."""

    compile: bool
    cuda_graph: bool
    param_dtype: str  # "fp32", or "bf16" (fp32 masters)
    fp8_recipe: str | None  # torchao recipe when the Linears run in float8
    reasons: tuple[str, ...]

    def describe(self) -> str:
        what = ["compiled" if self.compile else "eager"]
        if self.cuda_graph:
            what.append("CUDA graph")
        if self.param_dtype == "bf16":
            what.append("bf16 parameters with fp32 masters")
        if self.fp8_recipe is not None:
            what.append(f"float8 matmuls ({self.fp8_recipe} scaling)")
        return f"step: {' + '.join(what)} ({'; '.join(self.reasons)})"


def choose_fast_path(cfg: PretrainConfig, device: torch.device, world_size: int, precision: str,
                     hooks_change_loss: bool) -> FastPath:
    """The step path of a run of ``cfg`` on ``device`` with ``world_size`` ranks at the resolved ``precision``.

    Unset (``None``) settings are chosen here, as the fastest measured path: no compile (a compiled step is not yet
    measured faster on a GPU), except for float8 on CUDA; a CUDA graph on CUDA for one process when nothing below
    rules it out; fp32 parameters (bf16 parameters with fp32 masters are not yet measured faster on a GPU).
    A setting asked for that cannot work here raises ``SettingError`` naming why."""
    on_cuda = device.type == "cuda"
    reasons = []
    if cfg.compile is None:  # the fastest measured step (bench/results, tied by tests/test_device_scripts.py)
        compiled = on_cuda and precision == "fp8"
        reasons.append("compile: auto for float8 on CUDA (its scaling casts fuse only when compiled)" if compiled
                       else "not compiled: auto (a compiled step is not yet measured faster than the eager one on a "
                            "GPU; --compile compiles)")
    else:
        compiled = cfg.compile
        reasons.append("compile: --compile" if compiled else "not compiled: --no-compile")

    blockers = []
    if not on_cuda:
        blockers.append(f"CUDA graphs need a CUDA device, the device is {device.type}")
    if world_size > 1:
        blockers.append(f"{world_size} ranks: the DDP/FSDP gradient collectives are not captured")
    if precision == "fp16":
        blockers.append("fp16's GradScaler decides its skipped steps on the host")
    if hooks_change_loss:
        blockers.append("a hook (FASTMAE_FAULT) changes the loss in Python at chosen steps")
    if cfg.cuda_graph is None:
        graphed = not blockers
        reasons.append("CUDA graph: auto on CUDA, one process" if graphed
                       else "no CUDA graph: " + "; ".join(blockers))
    elif cfg.cuda_graph:
        if blockers:
            raise SettingError(f"cuda_graph cannot be used here: {'; '.join(blockers)} (leave cuda_graph unset to "
                               "choose automatically)", ("cuda_graph",))
        graphed = True
        reasons.append("CUDA graph: --cuda-graph")
    else:
        graphed = False
        reasons.append("no CUDA graph: --no-cuda-graph")

    param_dtype = cfg.param_dtype or "fp32"
    if param_dtype == "bf16":
        if precision != "bf16":
            raise SettingError(f"param_dtype bf16 trains under bf16 autocast: it needs precision bf16, got "
                               f"{precision}", ("param_dtype", "precision"))
        if world_size > 1:
            raise SettingError(f"param_dtype bf16 is for one process: under DDP the bf16 gradients would be "
                               f"all-reduced in bf16, and FSDP keeps bf16 parameters itself; got {world_size} ranks",
                               ("param_dtype",))
        reasons.append("bf16 parameters: --param-dtype bf16")
    elif cfg.param_dtype is None:
        reasons.append("fp32 parameters: auto (bf16 parameters, --param-dtype bf16, are not yet measured faster "
                       "on a GPU)")
    else:
        reasons.append("fp32 parameters: --param-dtype fp32")
    fp8_recipe = cfg.fp8_recipe if precision == "fp8" else None
    if fp8_recipe is not None and not compiled:
        reasons.append("float8 without torch.compile: its casts run unfused, slower than bf16")
    return FastPath(compiled, graphed, param_dtype, fp8_recipe, tuple(reasons))
