"""fastmae: a fast, faithful MAE (masked-autoencoder ViT pretraining) for PyTorch.

``fastmae.MAE`` is a drop-in ``MaskedAutoencoderViT``: the official constructor, factory names,
methods and ``state_dict`` keys, with the MAE-specific work done by the ops in :mod:`fastmae.ops`.
"""

import importlib

__version__ = "0.1.0"

_MODEL_NAMES = (
    "MAE",
    "PRESETS",
    "MaskedAutoencoderViT",
    "mae_vit_base_patch16",
    "mae_vit_base_patch16_dec512d8b",
    "mae_vit_huge_patch14",
    "mae_vit_huge_patch14_dec512d8b",
    "mae_vit_large_patch16",
    "mae_vit_large_patch16_dec512d8b",
    "mae_vit_small_patch16",
    "mae_vit_small_patch16_dec256d4b",
    "mae_vit_tiny_patch16",
    "mae_vit_tiny_patch16_dec128d2b",
)
_VIT_NAMES = ("VisionTransformer",)
__all__ = [*_MODEL_NAMES, *_VIT_NAMES, "ops", "use_backend"]


def __getattr__(name: str) -> object:
    """The public names, imported on first use: ``import fastmae`` (and ``fastmae --help``) loads no torch."""
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module("fastmae.model"), name)
    if name in _VIT_NAMES:
        return getattr(importlib.import_module("fastmae.vit"), name)
    if name == "ops":
        return importlib.import_module("fastmae.ops")
    if name == "use_backend":
        return importlib.import_module("fastmae.ops").use_backend
    raise AttributeError(f"module 'fastmae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
