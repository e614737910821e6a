"""fastmae's ops: one file per op, each with its readable torch reference (the spec) and its backends.

Every public op takes ``backend=None``; see :mod:`fastmae.ops.dispatch` for how a backend is chosen.
"""

from fastmae.ops.attention import attention
from fastmae.ops.dispatch import OPS, BackendUnavailableError, backend_table, use_backend
from fastmae.ops.layer_norm import layer_norm
from fastmae.ops.linear_gelu import linear_gelu
from fastmae.ops.masked_mse import masked_mse
from fastmae.ops.patch_embed_visible import patch_embed_visible
from fastmae.ops.random_masking import random_masking, random_masking_philox
from fastmae.ops.unshuffle import unshuffle

__all__ = [
    "OPS",
    "BackendUnavailableError",
    "attention",
    "backend_table",
    "layer_norm",
    "linear_gelu",
    "masked_mse",
    "patch_embed_visible",
    "random_masking",
    "random_masking_philox",
    "unshuffle",
    "use_backend",
]
