"""The masks of a training step, reproducible after a resume and independent of the number of ranks.

The masks of micro-batch ``m`` of optimiser step ``s`` are those of ``cfg.mask_strategy``
(``fastmae.masking``) for ``(seed, s * accum + m)`` over the global batch: for ``random`` the Philox stream of
that pair (``fastmae.ops.random_masking_philox``), for ``block`` a generator seeded by it, ``grid`` the same
every step. Rank ``r`` of ``W`` takes the rows ``r, r + W, ...``, which are its samples' rows in the global batch
under the interleaved shards of ``DistributedSampler``. So a resumed run redraws the same masks, and ``W`` ranks
of ``B`` images mask exactly as one process of ``W * B`` images does.
"""

from __future__ import annotations

import torch

from fastmae.masking import mask_noise_for


def mask_noise(seed: int, counter: int, batch_size: int, grid_size: tuple[int, int], len_keep: int, rank: int,
               world_size: int, device: torch.device, strategy: str = "random") -> torch.Tensor:
    """``(batch_size, L)`` float32 noise for ``MAE.forward(noise=...)`` that gives this rank's masks of ``strategy``.

    The noise is each patch's rank with the kept patches first, so the model's own masking of it keeps exactly
    the strategy's ``len_keep`` patches (for ``random``: the patches, and their order, that the Philox masking
    keeps). ``grid_size``: the model's ``(gh, gw)`` patch grid, ``L = gh * gw``.
    """
    return mask_noise_for(strategy, batch_size, grid_size, len_keep, seed, counter, device, rank, world_size)
