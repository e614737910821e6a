"""Implementation names -> step builders: fastmae's own variants and the baselines, for each task.

Task ``pretrain``: fastmae's variants (``FASTMAE_IMPLS``) are built by ``fastmae.benchmark.train_step``; the
baselines (``official``, ``modern``, ``modern-cudagraph``, ``hf``, ``hf-compile``) by
``fastmae.benchmark.baselines.steps``. Task ``finetune``: ``fastmae-finetune``, ``fastmae-finetune-compile`` and
the baselines ``timm``, ``timm-compile``, all built by ``fastmae.benchmark.finetune_step``. Names are unique
across tasks. Every builder is ``(model_name, batch_size, img_size, device) -> TrainStep``.
``unavailable_reason`` says, before anything is built, why an implementation cannot run on a device (a CUDA
graph on a CPU, transformers not installed); ``fastmae bench`` skips such a row with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from fastmae.benchmark.baselines import steps as baselines
from fastmae.benchmark.finetune_step import (FINETUNE_BASELINES, FINETUNE_IMPLS, build_finetune_step,
                                            finetune_unavailable_reason)
from fastmae.benchmark.train_step import FASTMAE_IMPLS, TrainStep, build_fastmae_step, fastmae_unavailable_reason

Builder = Callable[[str, int, int, torch.device], TrainStep]

TASKS = ("pretrain", "finetune")
TASK_IMPLS = {"pretrain": (*FASTMAE_IMPLS, *baselines.BUILDERS), "finetune": tuple(FINETUNE_IMPLS)}
BASELINE_IMPLS = (*baselines.BUILDERS, *FINETUNE_BASELINES)
ALL_IMPLS = (*TASK_IMPLS["pretrain"], *TASK_IMPLS["finetune"])
# On CUDA: fastmae's variants and every baseline, the strongest (compiled, CUDA-graphed) included.
GPU_DEFAULT_IMPLS = ("fastmae", "fastmae-compile", "fastmae-cudagraph", "fastmae-reference", "official", "modern",
                     "modern-cudagraph", "hf", "hf-compile")
# On a CPU: the eager rows (fastmae.benchmark.run.bench_defaults drops hf where transformers is missing).
# The compiled rows would spend minutes in the CPU Inductor compiler, timing a backend they are not for.
CPU_DEFAULT_IMPLS = ("fastmae", "fastmae-reference", "official", "modern", "hf")
# Fine-tuning: every implementation on CUDA; the eager two on a CPU.
GPU_DEFAULT_FINETUNE_IMPLS = tuple(FINETUNE_IMPLS)
CPU_DEFAULT_FINETUNE_IMPLS = ("fastmae-finetune", "timm")


def check_impl_names(impls: tuple[str, ...], task: str | None = None) -> None:
    """Raise ``ValueError`` naming the unknown ones when ``impls`` holds a name not in ``ALL_IMPLS`` or, with
    ``task``, not among that task's implementations."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    known = ALL_IMPLS if task is None else TASK_IMPLS[task]
    unknown = [i for i in impls if i not in known]
    if unknown:
        where = "" if task is None else f" for task {task}"
        raise ValueError(f"unknown impl(s) {unknown}{where}; expected names from {list(known)}")


def impl_of_step(compile: bool, cuda_graph: bool, bf16_params: bool = False, fp8: bool = False) -> str:
    """The fastmae variant (a key of ``FASTMAE_IMPLS``, default backends, no activation checkpointing) whose step is
    built this way. With the fields of the trainer's ``FastPath`` (``fastmae.train.cuda_graph.choose_fast_path``)
    it names the benchmark row of the step ``fastmae pretrain`` runs; ``ValueError`` when no variant matches."""
    wanted = (compile, cuda_graph, bf16_params, fp8)
    for name, v in FASTMAE_IMPLS.items():
        if (v.compile, v.cuda_graph, v.bf16_params, v.fp8) == wanted and v.backend is None \
                and not v.activation_checkpointing:
            return name
    raise ValueError(f"no fastmae variant has compile={compile}, cuda_graph={cuda_graph}, bf16_params={bf16_params}, "
                     f"fp8={fp8}; the variants are {sorted(FASTMAE_IMPLS)}")


def unavailable_reason(impl: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot run on ``device``, found without building it; ``None`` when it can."""
    check_impl_names((impl,))
    if impl in FASTMAE_IMPLS:
        return fastmae_unavailable_reason(impl, device)
    if impl in FINETUNE_IMPLS:
        return finetune_unavailable_reason(impl, device)
    return baselines.unavailable_reason(impl, device)


@dataclass
class Builders:
    """What can be built: a builder per available implementation, a reason per unavailable one."""

    builders: dict[str, Builder] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def load_builders(impls: tuple[str, ...], device: torch.device) -> Builders:
    """A builder for each of ``impls`` that can run on ``device``, the reason for each that cannot."""
    check_impl_names(impls)
    out = Builders()
    for impl in impls:
        reason = unavailable_reason(impl, device)
        if reason is not None:
            out.unavailable[impl] = reason
        elif impl in FASTMAE_IMPLS:
            out.builders[impl] = partial(build_fastmae_step, impl)
        elif impl in FINETUNE_IMPLS:
            out.builders[impl] = partial(build_finetune_step, impl)
        else:
            out.builders[impl] = baselines.BUILDERS[impl]
    return out
