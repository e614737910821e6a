"""One implementation's complete pretraining step (``TrainStep``) and fastmae's step builders.

Every implementation in the benchmark is wrapped in a ``TrainStep``: a model and a ``run(imgs)``
that does one full optimiser step. The baselines in ``fastmae.benchmark.baselines`` build the same
object (``modern-cudagraph`` with ``capture_cuda_graph`` below), so the harness times every row the
same way.

fastmae's variants (``FASTMAE_IMPLS``): the default backends (dispatch chooses) eagerly, under
``torch.compile``, with the whole step captured in a CUDA graph (MAE's fixed mask count makes
every shape static; the masking noise is drawn inside the graph), both, and the readable
``reference`` backends. On CUDA the step runs under bf16 autocast with fused AdamW; on CPU in fp32.
The ``-fp8`` variants run the blocks' Linears with float8 matmuls (``fastmae.train.fp8``, torchao; CUDA GPUs of
compute capability >= 8.9), everything else under bf16 autocast: their ``dtype`` is the autocast dtype, bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastmae import ops
from fastmae.model import PRESETS
from fastmae.train.distributed import add_activation_checkpointing
from fastmae.train import cuda_graph
from fastmae.train.fp8 import convert_to_fp8, fp8_unavailable_reason
from fastmae.train.master_weights import MasterWeights
from fastmae.train.optim import build_optimizer, param_groups

MASK_RATIO = 0.75
BASE_LR = 1.5e-4  # lr = BASE_LR * batch / 256, as the paper
WEIGHT_DECAY = 0.05
BETAS = (0.9, 0.95)


class StepUnavailable(RuntimeError):
    """This implementation cannot run here (e.g. a CUDA graph on a CPU device); the row is skipped."""


@dataclass
class TrainStep:
    """One implementation's complete training step, ready to time: a pretraining step (below), or a fine-tuning
    step built by ``fastmae.benchmark.finetune_step`` (its ``run`` does that module's recipe)."""

    impl: str  # row label: "fastmae", "fastmae-reference", "official", "modern", "hf", "timm", ...
    model_name: str  # fastmae preset name, e.g. "mae_vit_large_patch16" (fine-tuning: "vit_large_patch16")
    batch_size: int
    dtype: str  # "bf16" | "fp16" | "fp32" (autocast dtype; fp32 = no autocast)
    compile: bool  # torch.compile used
    cuda_graph: bool  # whole step captured in a CUDA graph
    model: torch.nn.Module
    # run(imgs): imgs (N, 3, H, W) on the model's device -> the loss tensor. One complete step:
    # forward (mask_ratio 0.75, norm_pix_loss on), backward, AdamW step (lr = 1.5e-4 * N / 256,
    # betas (0.9, 0.95), weight decay 0.05), grads zeroed (set_to_none). No host sync unless the
    # implementation's own recipe syncs.
    run: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FastmaeVariant:
    compile: bool = False
    cuda_graph: bool = False
    backend: str | None = None  # a blanket fastmae.ops.use_backend name; None: dispatch chooses
    bf16_params: bool = False  # Linear/Conv weights kept in bf16, fp32 masters in the optimiser (CUDA, bf16)
    activation_checkpointing: bool = False  # recompute each block in the backward (--activation-checkpointing)
    fp8: bool = False  # float8 matmuls in the blocks' Linears (fastmae.train.fp8, torchao tensorwise), bf16 autocast


FASTMAE_IMPLS: dict[str, FastmaeVariant] = {
    "fastmae": FastmaeVariant(),
    "fastmae-compile": FastmaeVariant(compile=True),
    "fastmae-cudagraph": FastmaeVariant(cuda_graph=True),
    "fastmae-compile-cudagraph": FastmaeVariant(compile=True, cuda_graph=True),
    "fastmae-reference": FastmaeVariant(backend="reference"),
    "fastmae-bf16params": FastmaeVariant(bf16_params=True),
    "fastmae-cudagraph-bf16params": FastmaeVariant(cuda_graph=True, bf16_params=True),
    "fastmae-actckpt": FastmaeVariant(activation_checkpointing=True),  # the memory it saves, the time it costs
    "fastmae-fp8": FastmaeVariant(compile=True, fp8=True),  # what --precision fp8 runs (compiled: fused casts)
    "fastmae-compile-cudagraph-fp8": FastmaeVariant(compile=True, cuda_graph=True, fp8=True),
}


def check_model_name(model_name: str) -> None:
    """Raise ``ValueError`` naming the presets when ``model_name`` is not one of them."""
    if model_name not in PRESETS:
        raise ValueError(f"unknown model {model_name!r}; expected one of {sorted(PRESETS)}")


def fastmae_unavailable_reason(impl: str, device: torch.device) -> str | None:
    """Why fastmae's ``impl`` variant cannot run on ``device`` (CUDA graphs need CUDA), or ``None``."""
    if impl not in FASTMAE_IMPLS:
        raise ValueError(f"unknown fastmae impl {impl!r}; expected one of {sorted(FASTMAE_IMPLS)}")
    if FASTMAE_IMPLS[impl].cuda_graph and torch.device(device).type != "cuda":
        return f"{impl}: CUDA graphs need a CUDA device, got {device}"
    if FASTMAE_IMPLS[impl].bf16_params and torch.device(device).type != "cuda":
        return f"{impl}: bf16 parameters train under bf16 autocast, which the benchmark uses on CUDA only, got {device}"
    if FASTMAE_IMPLS[impl].fp8:
        why = fp8_unavailable_reason(device)
        if why is not None:
            return f"{impl}: {why}"
    return None


def build_fastmae_step(impl: str, model_name: str, batch_size: int, img_size: int,
                       device: torch.device) -> TrainStep:
    """The ``impl`` variant of fastmae's step (a key of ``FASTMAE_IMPLS``) for ``model_name``.

    Raises ``StepUnavailable`` when the variant cannot run on ``device`` (CUDA graphs need CUDA).
    """
    reason = fastmae_unavailable_reason(impl, device)
    check_model_name(model_name)
    if reason is not None:
        raise StepUnavailable(reason)
    variant = FASTMAE_IMPLS[impl]
    dtype = "bf16" if device.type == "cuda" else "fp32"
    with torch.device(device):  # initialise on the device: fast for ViT-H
        model = PRESETS[model_name](img_size=img_size, norm_pix_loss=True)
    model.train()
    if variant.activation_checkpointing:
        add_activation_checkpointing(model)
    if variant.fp8:
        convert_to_fp8(model)
    lr = BASE_LR * batch_size / 256
    masters = MasterWeights(model) if variant.bf16_params else None
    groups = masters.param_groups(WEIGHT_DECAY) if masters else param_groups(model, WEIGHT_DECAY)
    if variant.cuda_graph:  # the optimiser's state and step counters must live on the device
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=BETAS, fused=True, capturable=True)
    else:
        optimizer = build_optimizer(model, lr=lr, weight_decay=WEIGHT_DECAY, betas=BETAS, groups=groups)
    if masters:
        optimizer = masters.bind(optimizer)
    forward = torch.compile(model) if variant.compile else model

    run = step_runner(forward, optimizer, batch_size, img_size, device, bf16=dtype == "bf16",
                      cuda_graph=variant.cuda_graph)
    if variant.backend is not None:
        run = _with_backend(run, variant.backend)
    return TrainStep(impl=impl, model_name=model_name, batch_size=batch_size, dtype=dtype,
                     compile=variant.compile, cuda_graph=variant.cuda_graph, model=model, run=run)


def _with_backend(run: Callable[[torch.Tensor], torch.Tensor], backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def run_with_backend(imgs: torch.Tensor) -> torch.Tensor:
        with ops.use_backend(backend):
            return run(imgs)

    return run_with_backend


def step_runner(forward: Callable[..., tuple], optimizer: torch.optim.Optimizer, batch_size: int, img_size: int,
                device: torch.device, bf16: bool, cuda_graph: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run(imgs) -> loss``: one training step of an MAE ``forward`` (official signature), bf16 autocast when
    asked, backward, ``optimizer.step()``; eager (grads zeroed after each step) or captured in one CUDA graph."""

    def step(imgs: torch.Tensor) -> torch.Tensor:
        # autocast's weight-cast cache must be off while capturing a CUDA graph
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not cuda_graph):
            loss, _, _ = forward(imgs, mask_ratio=MASK_RATIO)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def eager_step(imgs: torch.Tensor) -> torch.Tensor:
        loss = step(imgs)
        optimizer.zero_grad(set_to_none=True)
        return loss

    return capture_cuda_graph(step, optimizer, batch_size, img_size, device) if cuda_graph else eager_step


def capture_cuda_graph(step: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                       batch_size: int, img_size: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Capture ``step`` (forward, backward, optimiser step) once; return a ``run`` that replays it.

    The capture is ``fastmae.train.cuda_graph.capture_cuda_graph``, the trainer's own: a few eager steps on a side
    stream first, grads set to None so the captured backward allocates them from the graph's pool; each replay
    overwrites them (the same as zeroing before the step). ``run(imgs)`` copies ``imgs (N, 3, H, W)`` into the
    static input and returns the static loss, which the next replay overwrites.
    """
    static_imgs = torch.randn(batch_size, 3, img_size, img_size, device=device)  # (N, 3, H, W)
    graph, static_loss = cuda_graph.capture_cuda_graph(lambda: step(static_imgs),
                                                       lambda: optimizer.zero_grad(set_to_none=True), device)

    def replay(imgs: torch.Tensor) -> torch.Tensor:
        if imgs.data_ptr() != static_imgs.data_ptr():
            static_imgs.copy_(imgs)
        graph.replay()
        return static_loss

    return replay  # its closure keeps the graph, its memory pool and the static tensors alive
