"""fastmae: a fast, faithful MAE (masked-autoencoder ViT pretraining) for PyTorch.

``fastmae.MAE`` is a drop-in ``MaskedAutoencoderViT``: the official constructor, factory names,
methods and ``state_dict`` keys, with the MAE-specific work done by the ops in :mod:`fastmae.ops`.
"""

from fastmae import ops
from fastmae.model import (
    MAE,
    PRESETS,
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_base_patch16_dec512d8b,
    mae_vit_huge_patch14,
    mae_vit_huge_patch14_dec512d8b,
    mae_vit_large_patch16,
    mae_vit_large_patch16_dec512d8b,
    mae_vit_small_patch16,
    mae_vit_small_patch16_dec256d4b,
    mae_vit_tiny_patch16,
    mae_vit_tiny_patch16_dec128d2b,
)
from fastmae.ops import use_backend

__version__ = "0.1.0"

__all__ = [
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
    "ops",
    "use_backend",
]
