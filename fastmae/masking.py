"""Masking strategies of the MAE paper's ablation (He et al. 2021, section 4.1 and Figure 6): random, block, grid.

Design: every strategy is a generator of ``noise (N, L)`` for ``MAE.forward(imgs, mask_ratio, noise=noise)``
whose ``len_keep`` smallest entries are exactly the strategy's kept patches. The noise is a permutation rank
(distinct integers ``0 .. L-1`` as float32, exact below ``2**24``): the kept patches take ``0 .. K-1``, the removed
ones ``K .. L-1``. So the model's own ``ops.random_masking`` (every backend, bit-exact with each other) keeps and
orders exactly those patches, and the encoder embeds only them (``ops.patch_embed_visible``), whatever the
strategy.

- ``random``: the Philox masking of ``fastmae.ops.random_masking_philox`` keyed by ``(seed, counter)``, the
  trainer's masking since the start (each patch's rank in its sample's noise order).
- ``grid``: the paper's regular grid: the top-left patch of every 2x2 cell of the patch grid is kept, the other
  three removed. It needs an even patch grid and ``len_keep == L / 4`` (mask ratio 0.75). Deterministic: kept
  patches in raster order, then the removed ones in raster order.
- ``block``: BEiT's blockwise masking (Bao et al. 2021, its ``MaskingGenerator``): rectangles are added until
  ``L - len_keep`` patches are masked. An attempt draws a target area uniform in ``[min_patches, remaining]``
  (Python's ``random.uniform``: the bounds may come in either order), a log-uniform aspect ratio ``r`` in
  ``[0.3, 1/0.3]``, ``h = round(sqrt(area * r))``, ``w = round(sqrt(area / r))`` (half to even); a block that
  fits strictly inside the grid (``h < gh``, ``w < gw``) gets a uniform position, and is added when it masks
  ``0 < new <= remaining`` patches not masked yet; the masking gives up after 10 failed attempts in a row.
  ``min_patches`` is BEiT's 16, lowered to ``(gh - 1) * (gw - 1)`` (the largest block that fits) on grids too
  small for a 16-patch block (a 4x4 grid: 9; a 2x2 grid: 1). When it gives up short of ``L - len_keep``, the
  shortfall is masked uniformly at random among the still-visible patches, so that every sample has exactly
  ``len_keep`` kept patches (the model needs one ``K`` for the batch). The kept patches are ordered at random.

Block randomness (``BlockDraws``): one ``torch.Generator`` on the target device, seeded from ``(seed, counter)``,
draws for the global batch of ``world_size * batch_size`` samples first a key per patch (``(W*B, L)`` float64:
the shortfall fill and the kept order), then the attempts' uniforms in chunks of ``ATTEMPT_CHUNK`` attempts
(``(W*B, C, 4)`` float64: area, aspect, top, left; four per attempt, whether the block fits or not). Rank ``r``
keeps the rows ``r, r + W, ...``, as ``fastmae.train.masks`` does for the random masking, so ``W`` ranks mask as
one process of the global batch does, and the same ``(seed, counter)`` on the same device type gives the same
masks (a CPU and a CUDA generator give different streams). Chunks are drawn when first needed, in order, so
chunk ``k`` holds the same numbers however many chunks a caller needs. The aspect ratios' ``exp`` is applied
once to each chunk, so the two implementations below read the same float64 values and compute the rest with
correctly rounded float64 arithmetic (``*``, ``/``, ``sqrt``, ``round``, ``floor``).

Two implementations consume the same draws and give bit-identical masks: ``block_mask_reference`` (the spec, a
readable loop per sample) and ``block_mask_vectorised`` (the fast path: one attempt for the whole batch at a
time, torch ops on the device; one host sync per chunk, to stop when every sample is done).
"""

from __future__ import annotations

import hashlib
import math

import torch

from fastmae.ops import random_masking_philox
from fastmae.train.config import MASK_STRATEGIES

MIN_BLOCK_PATCHES = 16  # BEiT's min_num_patches (its pretraining's default)
BLOCK_ASPECT = (0.3, 1 / 0.3)  # BEiT's min_aspect, max_aspect
MAX_FAILED_ATTEMPTS = 10  # BEiT: _mask tries 10 times; one _mask without a block ends the masking
ATTEMPT_CHUNK = 16  # attempts drawn at a time (measured: 512 samples of 14x14 at 75% all done within 4 chunks)


def _check_grid(grid_size: object) -> tuple[int, int]:
    if (not isinstance(grid_size, tuple | list) or len(grid_size) != 2
            or not all(isinstance(s, int) and s >= 1 for s in grid_size)):
        raise ValueError(f"grid_size must be a pair (gh, gw) of positive ints, got {grid_size!r}")
    return int(grid_size[0]), int(grid_size[1])


def _check_counts(batch_size: int, num_patches: int, len_keep: int, rank: int, world_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(len_keep, int) or not 0 <= len_keep <= num_patches:
        raise ValueError(f"len_keep must be an int in [0, L={num_patches}], got {len_keep!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


def grid_strategy_problem(grid_size: tuple[int, int], len_keep: int) -> str | None:
    """Why the grid strategy cannot mask a ``grid_size`` patch grid keeping ``len_keep`` patches, or None."""
    gh, gw = grid_size
    if gh % 2 or gw % 2:
        return f"it needs an even patch grid, got {gh}x{gw} patches"
    if 4 * len_keep != gh * gw:
        return f"it keeps one patch in four, {gh * gw // 4} of {gh * gw}, got {len_keep} kept"
    return None


def noise_of_mask(removed: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``removed (N, L)`` bool and ``key (N, L)`` float -> ``noise (N, L)`` float32: each patch's rank when the kept
    patches come first, each group in ascending ``key`` (ties by index: the ranks are distinct)."""
    order = torch.argsort(torch.where(removed, key + 2, key), dim=1, stable=True)  # (N, L); key in [0, 1)
    ranks = torch.arange(removed.shape[1], device=removed.device).expand_as(order)  # (N, L)
    return torch.empty_like(order).scatter_(1, order, ranks).to(torch.float32)  # (N, L); exact: L < 2**24


def grid_mask(batch_size: int, grid_size: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(N, L)`` bool, True = removed: the top-left patch of every 2x2 cell kept, the rest removed (the paper's
    Figure 6 regular grid); ``grid_size`` must be even."""
    gh, gw = _check_grid(grid_size)
    problem = grid_strategy_problem((gh, gw), gh * gw // 4)
    if problem is not None:
        raise ValueError(f"the grid strategy keeps the top-left patch of every 2x2 cell: {problem}")
    rows = torch.arange(gh, device=device).view(gh, 1)
    cols = torch.arange(gw, device=device).view(1, gw)
    removed = (rows % 2 == 1) | (cols % 2 == 1)  # (gh, gw)
    return removed.reshape(1, gh * gw).expand(batch_size, -1).clone()  # (N, L)


def min_block_patches(grid_size: tuple[int, int]) -> int:
    """BEiT's smallest target area, 16, or ``(gh - 1) * (gw - 1)`` on grids where no 16-patch block fits."""
    gh, gw = grid_size
    return min(MIN_BLOCK_PATCHES, (gh - 1) * (gw - 1))


def generator_seed(seed: int, counter: int) -> int:
    """The 64-bit seed of the block masks' generator for ``(seed, counter)`` (a hash: distinct pairs, distinct
    streams)."""
    digest = hashlib.blake2b(f"fastmae-block-mask:{seed}:{counter}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class BlockDraws:
    """The random numbers of one batch's block masks (module docstring): this rank's ``batch_size`` rows of the
    draws for the global batch of ``world_size * batch_size`` samples.

    ``keys``: ``(N, L)`` float64 in [0, 1). ``chunk(k)``: ``(N, ATTEMPT_CHUNK, 4)`` float64, attempts
    ``k*C .. k*C + C - 1``: ``[..., 0]`` the area's uniform, ``[..., 1]`` the aspect ratio itself (log-uniform in
    ``BLOCK_ASPECT``), ``[..., 2]`` and ``[..., 3]`` the top and left uniforms.
    """

    def __init__(self, batch_size: int, num_patches: int, seed: int, counter: int,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1) -> None:
        if not isinstance(seed, int) or not isinstance(counter, int) or seed < 0 or counter < 0:
            raise ValueError(f"seed and counter must be ints >= 0, got {seed!r} and {counter!r}")
        _check_counts(batch_size, num_patches, 0, rank, world_size)
        self.device = torch.device(device)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.generator = torch.Generator(device=self.device).manual_seed(generator_seed(seed, counter))
        self.keys = self._draw(num_patches)  # (N, L)
        self._chunks: list[torch.Tensor] = []

    def _draw(self, *shape: int) -> torch.Tensor:
        """This rank's rows of ``(world_size * batch_size, *shape)`` uniforms: ``(N, *shape)`` float64."""
        draws = torch.rand(self.world_size * self.batch_size, *shape, generator=self.generator, dtype=torch.float64,
                           device=self.device)  # (W*N, *shape)
        return draws[self.rank::self.world_size]  # (N, *shape)

    def chunk(self, k: int) -> torch.Tensor:
        """Attempts ``k*C .. k*C + C - 1`` of every sample: ``(N, C, 4)`` float64; drawn (with those before) on
        first use."""
        lo, hi = (math.log(a) for a in BLOCK_ASPECT)
        while len(self._chunks) <= k:
            draws = self._draw(ATTEMPT_CHUNK, 4)  # (N, C, 4)
            draws[..., 1] = torch.exp(lo + (hi - lo) * draws[..., 1])  # the aspect ratio, log-uniform
            self._chunks.append(draws)
        return self._chunks[k]

    def attempt(self, n: int, a: int) -> tuple[float, float, float, float]:
        """Sample ``n``'s attempt ``a``: ``(area uniform, aspect ratio, top uniform, left uniform)``."""
        area_u, aspect, top_u, left_u = self.chunk(a // ATTEMPT_CHUNK)[n, a % ATTEMPT_CHUNK].tolist()
        return area_u, aspect, top_u, left_u


def block_mask_reference(draws: BlockDraws, grid_size: tuple[int, int], len_keep: int) -> torch.Tensor:
    """The spec of the block masking, one sample at a time: ``(N, L)`` bool, True = removed (module docstring)."""
    gh, gw = _check_grid(grid_size)
    num_patches = gh * gw
    _check_counts(draws.batch_size, num_patches, len_keep, 0, 1)
    target = num_patches - len_keep
    lo = min_block_patches((gh, gw))
    out = torch.zeros(draws.batch_size, num_patches, dtype=torch.bool)
    for n in range(draws.batch_size):
        removed = [[False] * gw for _ in range(gh)]
        count, failed, attempt = 0, 0, 0
        while count < target and failed < MAX_FAILED_ATTEMPTS:
            area_u, aspect, top_u, left_u = draws.attempt(n, attempt)
            attempt += 1
            remaining = target - count
            area = lo + (remaining - lo) * area_u  # Python's random.uniform(lo, remaining)
            h = round(math.sqrt(area * aspect))  # half to even, as Python's round
            w = round(math.sqrt(area / aspect))
            added = False
            if h < gh and w < gw:
                top = math.floor(top_u * (gh - h + 1))  # random.randint(0, gh - h)
                left = math.floor(left_u * (gw - w + 1))  # random.randint(0, gw - w)
                cells = [(i, j) for i in range(top, top + h) for j in range(left, left + w)]
                new = sum(not removed[i][j] for i, j in cells)
                if 0 < new <= remaining:
                    for i, j in cells:
                        removed[i][j] = True
                    count += new
                    added = True
            failed = 0 if added else failed + 1
        keys = draws.keys[n].tolist()  # gave up short: mask the visible patches of smallest key
        visible = sorted((k for k in range(num_patches) if not removed[k // gw][k % gw]), key=lambda k: keys[k])
        for k in visible[:target - count]:
            removed[k // gw][k % gw] = True
        out[n] = torch.tensor(removed).view(num_patches)
    return out.to(draws.device)


def block_mask_vectorised(draws: BlockDraws, grid_size: tuple[int, int], len_keep: int) -> torch.Tensor:
    """As :func:`block_mask_reference`, one attempt of every sample at a time on ``draws.device``: ``(N, L)``
    bool, True = removed; bit-identical to it."""
    gh, gw = _check_grid(grid_size)
    num_patches, n, device = gh * gw, draws.batch_size, draws.device
    _check_counts(n, num_patches, len_keep, 0, 1)
    target = num_patches - len_keep
    lo = min_block_patches((gh, gw))
    rows = torch.arange(gh, device=device).view(1, gh, 1)
    cols = torch.arange(gw, device=device).view(1, 1, gw)
    removed = torch.zeros(n, gh, gw, dtype=torch.bool, device=device)  # (N, gh, gw)
    count = torch.zeros(n, dtype=torch.int64, device=device)  # (N,) patches masked so far
    failed = torch.zeros(n, dtype=torch.int64, device=device)  # (N,) failed attempts in a row
    done = count >= target  # (N,)
    k = 0
    while not bool(done.all()):  # one host sync per chunk of attempts
        chunk = draws.chunk(k)  # (N, C, 4)
        k += 1
        for c in range(ATTEMPT_CHUNK):
            area_u, aspect, top_u, left_u = chunk[:, c].unbind(-1)  # each (N,) float64
            remaining = target - count  # (N,) int64
            area = lo + (remaining - lo) * area_u  # (N,) float64, as the reference's float arithmetic
            h = torch.round(torch.sqrt(area * aspect)).long()  # (N,) half to even
            w = torch.round(torch.sqrt(area / aspect)).long()
            top = torch.floor(top_u * (gh - h + 1)).long().view(n, 1, 1)
            left = torch.floor(left_u * (gw - w + 1)).long().view(n, 1, 1)
            rect = ((rows >= top) & (rows < top + h.view(n, 1, 1))
                    & (cols >= left) & (cols < left + w.view(n, 1, 1)))  # (N, gh, gw)
            new = (rect & ~removed).sum(dim=(1, 2))  # (N,)
            added = ~done & (h < gh) & (w < gw) & (new > 0) & (new <= remaining)  # (N,)
            removed |= rect & added.view(n, 1, 1)
            count += torch.where(added, new, 0)
            failed = torch.where(added, 0, failed + 1)
            done |= (count >= target) | (failed >= MAX_FAILED_ATTEMPTS)
    flat = removed.view(n, num_patches)  # (N, L)
    order = torch.argsort(torch.where(flat, math.inf, draws.keys), dim=1, stable=True)  # (N, L): visible first
    position = torch.empty_like(order).scatter_(1, order, torch.arange(num_patches, device=device).expand_as(order))
    return flat | (position < (target - count).view(n, 1))  # the shortfall: visible patches of smallest key


def block_mask(batch_size: int, grid_size: tuple[int, int], len_keep: int, seed: int, counter: int,
               device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """BEiT's block masking of this rank's ``batch_size`` samples of ``(seed, counter)``: ``(N, L)`` bool, True =
    removed, exactly ``L - len_keep`` per sample (module docstring)."""
    gh, gw = _check_grid(grid_size)
    draws = BlockDraws(batch_size, gh * gw, seed, counter, device, rank, world_size)
    return block_mask_vectorised(draws, (gh, gw), len_keep)


def mask_noise_for(strategy: str, batch_size: int, grid_size: tuple[int, int], len_keep: int, seed: int = 0,
                   counter: int = 0, device: torch.device | str = "cpu", rank: int = 0,
                   world_size: int = 1) -> torch.Tensor:
    """``noise (N, L)`` float32 for ``model(imgs, mask_ratio, noise=noise)`` that makes the model keep exactly the
    ``len_keep`` patches ``strategy`` keeps (``len_keep`` must be the model's ``int(L * (1 - mask_ratio))``).

    ``strategy``: ``random`` (Philox, ``fastmae.ops.random_masking_philox``), ``block`` or ``grid`` (module
    docstring). ``grid_size``: the model's ``patch_embed.grid_size``. ``random`` and ``block`` are functions of
    ``(seed, counter)`` drawn for the global batch of ``world_size * batch_size`` samples, of which rank ``rank``
    gets the rows ``rank, rank + world_size, ...``; ``grid`` is the same for every sample, seed and counter.
    """
    if strategy not in MASK_STRATEGIES:
        raise ValueError(f"strategy must be one of {list(MASK_STRATEGIES)}, got {strategy!r}")
    gh, gw = _check_grid(grid_size)
    num_patches = gh * gw
    _check_counts(batch_size, num_patches, len_keep, rank, world_size)
    device = torch.device(device)
    if strategy == "random":
        _, ids_restore, _ = random_masking_philox(batch_size * world_size, num_patches, len_keep, seed, counter,
                                                  device)  # (W*N, L)
        return ids_restore[rank::world_size].to(torch.float32)  # (N, L); exact: L < 2**24
    if strategy == "grid":
        problem = grid_strategy_problem((gh, gw), len_keep)
        if problem is not None:
            raise ValueError(f"the grid strategy keeps the top-left patch of every 2x2 cell: {problem}")
        raster = torch.arange(num_patches, device=device, dtype=torch.float64) / num_patches  # (L,) in [0, 1)
        return noise_of_mask(grid_mask(batch_size, (gh, gw), device), raster.expand(batch_size, -1))
    draws = BlockDraws(batch_size, num_patches, seed, counter, device, rank, world_size)
    return noise_of_mask(block_mask_vectorised(draws, (gh, gw), len_keep), draws.keys)
