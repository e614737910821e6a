"""random_masking: per-sample shuffle of the patches, keeping the ``len_keep`` with the smallest noise."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from fastmae.ops._cases import rand
from fastmae.ops._checks import check_tensor
from fastmae.ops._kernels import CUDA_DEVICES, FLOAT_DTYPES, cuda_available, kernel, triton_available, triton_devices
from fastmae.ops.dispatch import Backend, Case, Op

MAX_CUDA_PATCHES = 1024  # the CUDA kernels sort a sample's row in one thread block
_U32 = 0xFFFFFFFF


def random_masking_reference(
    noise: torch.Tensor, len_keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The spec. ``noise (N, L)`` -> ``ids_keep (N, K)``, ``ids_restore (N, L)`` int64, ``mask (N, L)`` float32.

    ``ids_keep`` lists the kept patches by ascending noise (as the official code gathers them);
    ``mask`` is 0 for kept and 1 for removed, in patch order; ``ids_restore`` is the inverse of the
    shuffle, so that ``cat([kept, removed])[ids_restore]`` is back in patch order.
    """
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # (N, L): ascending noise, kept first
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)  # (N, L): inverse permutation
    ids_keep = ids_shuffle[:, :len_keep]  # (N, K)
    mask = (ids_restore >= len_keep).to(torch.float32)  # (N, L): 1 = removed
    return ids_keep, ids_restore, mask


# ---- the kernels' ops: one schema and fake each for every kernel backend (no gradient: indices and a 0/1 mask) ----

def _empty_masks(n: int, num_patches: int, len_keep: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty((n, len_keep), dtype=torch.int64, device=device),
            torch.empty((n, num_patches), dtype=torch.int64, device=device),
            torch.empty((n, num_patches), dtype=torch.float32, device=device))


@torch.library.custom_op("fastmae::random_masking", mutates_args=())
def random_masking_op(noise: torch.Tensor, len_keep: int,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``noise (N, L)`` -> ``ids_keep (N, K)``, ``ids_restore (N, L)`` int64, ``mask (N, L)`` fp32."""
    return kernel(backend, "random_masking", "random_masking")(noise, len_keep)


@random_masking_op.register_fake
def _(noise: torch.Tensor, len_keep: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _empty_masks(noise.shape[0], noise.shape[1], len_keep, noise.device)


@torch.library.custom_op("fastmae::random_masking_philox", mutates_args=())
def random_masking_philox_op(seed_step: torch.Tensor, num_samples: int, num_patches: int, len_keep: int,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``seed_step (2,)`` int64 ``[seed, step]``, read on the device (a captured CUDA graph advances the step in
    place) -> the masks of the Philox noise of ``(seed, step)``, as :func:`random_masking_op`'s."""
    return kernel(backend, "random_masking", "random_masking_philox")(seed_step, num_samples, num_patches, len_keep)


@random_masking_philox_op.register_fake
def _(seed_step: torch.Tensor, num_samples: int, num_patches: int, len_keep: int,
      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _empty_masks(num_samples, num_patches, len_keep, seed_step.device)


def _random_masking_kernels(noise: torch.Tensor, len_keep: int,
                            *, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As the reference on ``backend``'s kernels; ``noise`` gets no gradient, as in the reference (the outputs
    are indices and a constant mask)."""
    return random_masking_op(noise.detach(), len_keep, backend)


def _patches_limit(limit: Callable[[], int], why: str) -> Callable[..., str | None]:
    def limits(*args: object) -> str | None:
        num_patches = args[0].shape[1] if isinstance(args[0], torch.Tensor) else args[1]  # noise, or philox's L
        return f"L={num_patches} patches > {limit()} ({why})" if num_patches > limit() else None

    return limits


def _triton_max_patches() -> int:
    from fastmae.kernels.random_masking import MAX_PATCHES

    return MAX_PATCHES


_TRITON_LIMITS = _patches_limit(_triton_max_patches, "the triton kernel ranks a whole row in registers")
_CUDA_LIMITS = _patches_limit(lambda: MAX_CUDA_PATCHES, "the CUDA kernel sorts a sample in one thread block")


def _backend(name: str, fn: Callable, **rules: object) -> Backend:
    return Backend(name, functools.partial(fn, backend=name), dtypes=FLOAT_DTYPES, auto_devices=("cuda",), **rules)


def _case(num_patches: int, len_keep: int, ties: bool = False) -> Callable[..., tuple]:
    """``(noise (N, L), len_keep)``; with ``ties`` the noise takes 8 values only (ties broken by index)."""

    def make(device: torch.device, dtype: torch.dtype, batch: int) -> tuple:
        noise = rand(batch, num_patches, seed=1, device=device)
        if ties:
            noise = (noise * 8).floor() / 8
        return noise.to(dtype), len_keep

    return make


def _strategy_case(strategy: str, grid_size: tuple[int, int], len_keep: int) -> Callable[..., tuple]:
    """``(noise (N, L), len_keep)`` of a masking strategy of ``fastmae.masking`` (ranks, kept first), drawn on the
    CPU (seed 1, counter 0) so that every device gets the same noise."""

    def make(device: torch.device, dtype: torch.dtype, batch: int) -> tuple:
        from fastmae.masking import mask_noise_for  # it imports fastmae.ops

        noise = mask_noise_for(strategy, batch, grid_size, len_keep, seed=1, counter=0, device="cpu")  # (N, L)
        return noise.to(device=device, dtype=dtype), len_keep

    return make


def _min_bytes(noise: torch.Tensor, len_keep: int) -> int:
    """noise in; ids_keep, ids_restore and the mask out."""
    n, num_patches = noise.shape
    return noise.numel() * noise.element_size() + n * len_keep * 8 + n * num_patches * (8 + 4)


RANDOM_MASKING_CASES = (Case("L196-K49", _case(196, 49), batch=3),
                        Case("L256-K64-ties", _case(256, 64, ties=True), batch=2),
                        Case("L1024-K256", _case(1024, 256), batch=1), Case("L16-K0", _case(16, 0), batch=2),
                        Case("L196-K49-block", _strategy_case("block", (14, 14), 49), batch=3),
                        Case("L256-K64-grid", _strategy_case("grid", (16, 16), 64), batch=2))

RANDOM_MASKING = Op(
    "random_masking",
    [  # priority: the cuda kernel measured faster than the triton one on an H200 (bench/results/)
        _backend("cuda", _random_masking_kernels, available=cuda_available, devices=CUDA_DEVICES,
                 supports=_CUDA_LIMITS),
        _backend("triton", _random_masking_kernels, available=triton_available("random_masking"),
                 devices=triton_devices(), supports=_TRITON_LIMITS),
        Backend("reference", random_masking_reference),
    ],
    cases=RANDOM_MASKING_CASES, benchmark=Case("vit-b", _case(196, 49)), min_bytes=_min_bytes,
    kernel_op=random_masking_op,
)


def random_masking(
    noise: torch.Tensor, len_keep: int, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``noise (N, L)`` -> ``(ids_keep (N, K), ids_restore (N, L), mask (N, L))``; see the reference."""
    check_tensor("noise", noise, ndim=2, floating=True)
    if not isinstance(len_keep, int) or not 0 <= len_keep <= noise.shape[1]:
        raise ValueError(f"len_keep must be an int in [0, L={noise.shape[1]}], got {len_keep!r}")
    return RANDOM_MASKING(noise, len_keep, backend=backend)


# --- second mode: the noise is a Philox stream keyed by (seed, step, sample), never materialised ---


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` 32-bit words of the 64-bit product of uint32 values ``a`` (int64 tensor) and ``b``.

    ``b`` is split in 16-bit halves so that no intermediate leaves int64's range.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2**48; a*b = p_hi * 2**16 + p_lo
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _U32
    return hi, lo


def philox4x32_10(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], key: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with 10 rounds (Salmon et al. 2011), as ``triton.language.random.philox_impl``:
    four uint32 counter words (int64 tensors) and two key words -> four uint32 words (int64 tensors)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, 0xD2511F53)
        hi2, lo2 = _mulhilo32(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _U32, (k1 + 0xBB67AE85) & _U32  # Weyl sequence on the key
    return c0, c1, c2, c3


def philox_noise_reference(num_samples: int, num_patches: int, seed: int, step: int,
                           device: torch.device | str) -> torch.Tensor:
    """The masking noise of training ``step``: ``(N, L)`` float32 in ``[0, 1)``, exactly what Triton's
    ``tl.rand(seed, offset)`` gives for ``offset = step * 2**32 + n * L + l``.

    That is Philox4x32-10 with key ``(seed mod 2**32, seed >> 32)`` and counter
    ``(n*L + l, step, 0, 0)``; its first word ``x``, read as int32, is folded to ``[0, 2**31)``
    (``~x`` for negative ``x``) and scaled by the float32 nearest to ``4.6566127342e-10``
    (just under ``2**-31``, so the result stays below 1) in float32 arithmetic.
    """
    c0 = torch.arange(num_samples * num_patches, dtype=torch.int64, device=device)  # (N*L,) = n*L + l
    c1 = torch.full_like(c0, step)
    zero = torch.zeros_like(c0)
    x, _, _, _ = philox4x32_10((c0, c1, zero, zero), (seed & _U32, seed >> 32))  # (N*L,) uint32 values
    folded = torch.where(x >= 2**31, _U32 - x, x)  # int32(x) < 0 -> ~int32(x) = 2**32 - 1 - x
    scale = torch.tensor(4.6566127342e-10, dtype=torch.float32, device=device)
    noise = folded.to(torch.int32).to(torch.float32) * scale  # (N*L,) float32 product of float32 values
    return noise.view(num_samples, num_patches)  # (N, L)


def random_masking_philox_reference(
    num_samples: int, num_patches: int, len_keep: int, seed: int, step: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The spec of the Philox mode: :func:`random_masking_reference` of :func:`philox_noise_reference`."""
    return random_masking_reference(philox_noise_reference(num_samples, num_patches, seed, step, device), len_keep)


def _random_masking_philox_kernels(num_samples: int, num_patches: int, len_keep: int, seed: int, step: int,
                                   device: torch.device,
                                   *, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seed_step = torch.tensor([seed, step], dtype=torch.int64, device=device)  # (2,)
    return random_masking_philox_op(seed_step, num_samples, num_patches, len_keep, backend)


def _philox_case(num_patches: int, len_keep: int, seed: int, step: int) -> Callable[..., tuple]:
    """``(num_samples, num_patches, len_keep, seed, step, device)``; ``dtype`` has no role."""

    def make(device: torch.device, dtype: torch.dtype, batch: int) -> tuple:
        return batch, num_patches, len_keep, seed, step, device

    return make


def _philox_min_bytes(num_samples: int, num_patches: int, len_keep: int, *_: object) -> int:
    """The outputs only: no noise tensor."""
    return num_samples * len_keep * 8 + num_samples * num_patches * (8 + 4)


RANDOM_MASKING_PHILOX_CASES = (Case("L196-K49", _philox_case(196, 49, 1234, 7), batch=3),
                              Case("L256-K64-seed2^40", _philox_case(256, 64, 2**40 + 3, 2**31 - 1), batch=2))

RANDOM_MASKING_PHILOX = Op(
    "random_masking_philox",
    [  # priority: as random_masking's
        _backend("cuda", _random_masking_philox_kernels, available=cuda_available, devices=CUDA_DEVICES,
                 supports=_CUDA_LIMITS),
        _backend("triton", _random_masking_philox_kernels, available=triton_available("random_masking"),
                 devices=triton_devices(), supports=_TRITON_LIMITS),
        Backend("reference", random_masking_philox_reference),
    ],
    cases=RANDOM_MASKING_PHILOX_CASES, benchmark=Case("vit-b", _philox_case(196, 49, 1234, 7)),
    min_bytes=_philox_min_bytes,
)


def random_masking_philox(
    num_samples: int,
    num_patches: int,
    len_keep: int,
    seed: int,
    step: int,
    device: torch.device | str,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks of training ``step`` from a Philox stream keyed by ``(seed, step, sample)``: no noise
    tensor, and the same ``(seed, step)`` gives the same masks after a resume.

    -> ``(ids_keep (N, K), ids_restore (N, L), mask (N, L))`` as :func:`random_masking` of
    :func:`philox_noise_reference`. ``0 <= seed < 2**63``, ``0 <= step < 2**31``, ``N*L <= 2**32``
    (the Philox counter). Sample ``n`` is the index in this batch: with data parallelism, fold the
    rank into ``seed`` so that ranks draw different masks.
    """
    for name, value in (("num_samples", num_samples), ("num_patches", num_patches)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(len_keep, int) or not 0 <= len_keep <= num_patches:
        raise ValueError(f"len_keep must be an int in [0, L={num_patches}], got {len_keep!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not isinstance(step, int) or not 0 <= step < 2**31:
        raise ValueError(f"step must be an int in [0, 2**31), got {step!r}")
    if num_samples * num_patches > 2**32:
        raise ValueError(f"num_samples * num_patches must be <= 2**32 (Philox counter), "
                         f"got {num_samples * num_patches}")
    return RANDOM_MASKING_PHILOX(num_samples, num_patches, len_keep, seed, step, torch.device(device), backend=backend)
