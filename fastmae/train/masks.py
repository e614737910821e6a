"""The masks of a training step, reproducible after a resume and independent of the number of ranks.

The noise of micro-batch ``m`` of optimiser step ``s`` is the Philox stream of ``(seed, s * accum + m)``
(``fastmae.ops.random_masking_philox``) over the global batch; rank ``r`` of ``W`` takes the rows
``r, r + W, ...``, which are its samples' rows in the global batch under the interleaved shards of
``DistributedSampler``. So a resumed run redraws the same masks, and ``W`` ranks of ``B`` images mask exactly
as one process of ``W * B`` images does.
"""

from __future__ import annotations

import torch

from fastmae.ops import random_masking_philox


def mask_noise(seed: int, counter: int, batch_size: int, num_patches: int, len_keep: int, rank: int,
               world_size: int, device: torch.device) -> torch.Tensor:
    """``(batch_size, num_patches)`` float32 noise for ``MAE.forward(noise=...)`` that gives this rank's Philox masks.

    The noise is each patch's position in its sample's ascending-noise order (``ids_restore``), so the model's
    own masking of it keeps and orders exactly the patches that the Philox masking keeps.
    """
    _, ids_restore, _ = random_masking_philox(batch_size * world_size, num_patches, len_keep, seed, counter,
                                              device)  # (W*B, L)
    return ids_restore[rank::world_size].to(torch.float32)  # (B, L); exact: L < 2**24
