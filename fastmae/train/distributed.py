"""Process setup and model wrapping for one process or ``torchrun``: DDP or FSDP2, activation
checkpointing, ``torch.compile``.

Under ``torchrun`` (``WORLD_SIZE`` > 1 or ``--parallel fsdp``) each process trains on ``cuda:LOCAL_RANK`` with
NCCL, or on the CPU with gloo. DDP runs without ``find_unused_parameters`` (MAE uses every parameter in every
step). FSDP2 shards every block (an MAE's encoder and decoder blocks, a ViT classifier's blocks, frozen ones
included) and then the rest of the model (``fully_shard``), parameters
in the autocast dtype and gradients reduced in fp32 (``MixedPrecisionPolicy``); the root keeps its inputs'
dtypes so the masking noise stays fp32.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from fastmae.model import MaskedAutoencoderViT


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: ``rank`` of ``world_size`` (0 of 1 without torchrun) and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: dist.ProcessGroup | None  # a gloo group for host-side agreement (preemption); None alone

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()


def init_ranks(device: str | None) -> Ranks:
    """Join the ``torchrun`` job when there is one (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` set), else run alone."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return Ranks(0, 1, 0, chosen, None)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if on_cuda:
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device(device or "cpu")
    dist.init_process_group("nccl" if on_cuda else "gloo")
    control = dist.new_group(backend="gloo") if on_cuda else dist.group.WORLD
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, chosen, control)


def close_ranks(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier(group=ranks.control)


def all_ranks_agree(ok: bool, ranks: Ranks) -> bool:
    """Whether ``ok`` holds on every rank (collective when distributed: a host all-reduce on the gloo group)."""
    if not ranks.distributed:
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=ranks.control)
    return bool(flag.item())


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: an MAE's encoder and decoder blocks, or a ViT classifier's ``blocks``."""
    return [*model.blocks, *getattr(model, "decoder_blocks", ())]


def add_activation_checkpointing(model: MaskedAutoencoderViT) -> None:
    """Recompute each block's activations in the backward pass instead of storing them (state_dict keys unchanged)."""
    for block in _blocks(model):
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def wrap_model(model: nn.Module, ranks: Ranks, parallel: str, param_dtype: torch.dtype,
               compile_model: bool) -> nn.Module:
    """The module to train. ``model`` itself stays usable for state dicts (FSDP shards it in place)."""
    if parallel == "fsdp" and ranks.distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(ranks.device.type, (ranks.world_size,))
        block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in _blocks(model):
            if compile_model:
                block.compile()
            fully_shard(block, mesh=mesh, mp_policy=block_policy)
        root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                           cast_forward_inputs=False)
        return fully_shard(model, mesh=mesh, mp_policy=root_policy)
    wrapped: nn.Module = model
    if ranks.distributed:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False,
                                          gradient_as_bucket_view=True)
    if compile_model:
        wrapped.compile()
    return wrapped


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this backward pass only when ``enabled`` (the last micro-batch)."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(enabled)
        yield
    elif hasattr(module, "no_sync") and not enabled:  # DDP
        with module.no_sync():
            yield
    else:
        yield
