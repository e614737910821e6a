"""Float8 matmuls for pretraining (``--precision fp8``) through torchao's float8 training.

Design:

- Which Linears: every ``nn.Linear`` of the encoder and decoder blocks (qkv, proj, fc1, fc2) and ``decoder_embed``
  whose in and out features are both multiples of 16 (the layout rule of ``torch._scaled_mm``, which torchao's
  ``Float8Linear`` calls). ``decoder_pred`` stays bf16 whatever its size: its output is the loss's input (and with
  14 px patches its 588 outputs are no multiple of 16 anyway). The patch embedding is a Conv2d, run by
  ``fastmae.ops.patch_embed_visible``, and stays bf16; everything that is not one of these matmuls runs under bf16
  autocast, as ``--precision bf16`` runs it.
- The MLP's fc1 is run by ``ops.linear_gelu(x, fc1.weight, fc1.bias)``, which reads the weight itself and would
  bypass ``Float8Linear``; so a converted MLP's ``forward`` is replaced on the instance by fc1 -> exact GELU -> fc2
  (under ``torch.compile`` inductor fuses the GELU into the GEMM's epilogue).
- Scaling: dynamic, computed on the device (no host sync, so the step can be captured in a CUDA graph); recipe
  ``tensorwise`` (torchao's default, its fastest) or ``rowwise`` (a scale per row: more accurate, slower).
- Where it runs: ``torch._scaled_mm`` runs float8 GEMMs on CUDA GPUs of compute capability 8.9 (Ada) or >= 9.0
  (Hopper, Blackwell); its own error message says "compute capability >= 9.0 or 8.9, or ROCm MI300+".
  :func:`fp8_unavailable_reason` says why it cannot run elsewhere, and the config refuses. This torch also runs
  ``torch._scaled_mm`` on a CPU (slowly): the CPU tests convert and train through the same code path.
- Checkpoints: ``Float8Linear`` keeps the fp32 ``weight`` and ``bias`` parameters under the same names, so a
  checkpoint of an fp8 run loads into a bf16 or fp32 run and back.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmae.train.config import FP8_RECIPES  # torchao Float8LinearRecipeName values fastmae offers

MIN_CAPABILITY = (8, 9)  # torch._scaled_mm: CUDA compute capability 8.9 or >= 9.0
KEPT_HIGH_PRECISION = ("decoder_pred",)  # Linears left in bf16 whatever their shape


def torchao_available() -> bool:
    """Whether ``torchao.float8`` can be imported (without importing it)."""
    return importlib.util.find_spec("torchao") is not None


def fp8_unavailable_reason(device: str | torch.device | None) -> str | None:
    """Why float8 training cannot run on ``device`` (``None``: CUDA when available, as the trainer picks), or
    ``None`` when it can: torchao must be installed and the device a CUDA GPU of compute capability >= 8.9."""
    if not torchao_available():
        return "torchao is not installed (pip install torchao; fastmae's float8 training uses torchao.float8)"
    chosen = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if chosen.type != "cuda":
        return (f"float8 matmuls (torch._scaled_mm) need a CUDA GPU of compute capability >= "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, Hopper or newer); the device is {chosen.type}")
    if not torch.cuda.is_available():
        return "float8 matmuls need a CUDA GPU; torch sees none"
    index = chosen.index if chosen.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        return (f"float8 matmuls (torch._scaled_mm) need compute capability >= {MIN_CAPABILITY[0]}."
                f"{MIN_CAPABILITY[1]} (Ada, Hopper or newer); {torch.cuda.get_device_name(index)} is "
                f"sm_{capability[0]}{capability[1]}")
    return None


def fp8_filter(module: nn.Module, name: str) -> bool:
    """Whether the module ``name`` of an MAE becomes a ``Float8Linear``: an ``nn.Linear`` whose in and out features
    are multiples of 16, other than ``decoder_pred``."""
    if not isinstance(module, nn.Linear) or name in KEPT_HIGH_PRECISION:
        return False
    out_features, in_features = module.weight.shape
    return out_features % 16 == 0 and in_features % 16 == 0


def _mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A converted MLP: ``x (N, S, D)`` -> fc1 (float8) -> exact GELU ``(N, S, 4D)`` -> fc2 -> ``(N, S, D)``."""
    return mlp.fc2(F.gelu(mlp.fc1(x), approximate="none"))


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise") -> list[str]:
    """Swap ``model``'s Linears chosen by :func:`fp8_filter` for torchao ``Float8Linear``s (in place, before
    ``torch.compile`` and DDP) with the dynamic-scaling ``recipe``; returns the converted modules' names.

    MLPs whose fc1 was converted run fc1 through the module (see the module's note). ``ValueError`` for an unknown
    recipe or a model with no Linear to convert; ``ImportError`` without torchao."""
    if recipe not in FP8_RECIPES:
        raise ValueError(f"recipe must be one of {list(FP8_RECIPES)}, got {recipe!r}")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    chosen = [name for name, module in model.named_modules() if fp8_filter(module, name)]
    if not chosen:
        raise ValueError("convert_to_fp8 needs a model with Linears whose features are multiples of 16, got none")
    convert_to_float8_training(model, module_filter_fn=fp8_filter, config=Float8LinearConfig.from_recipe_name(recipe))
    for module in model.modules():
        fc1 = getattr(module, "fc1", None)
        if isinstance(fc1, Float8Linear) and isinstance(getattr(module, "fc2", None), nn.Module):
            module.forward = functools.partial(_mlp_forward, module)
    return chosen
