"""random_masking: per-sample shuffle of the patches, keeping the ``len_keep`` with the smallest noise."""

from __future__ import annotations


import torch

from fastmae.extension import extension_backend_available
from fastmae.kernels._common import device_why_not, kernel_module_available, triton_why_not
from fastmae.ops._checks import check_tensor
from fastmae.ops.dispatch import Backend, Op

MAX_TRITON_PATCHES = 1024  # the Triton kernels hold a sample's whole row of noise in registers
MAX_CUDA_PATCHES = 1024  # the CUDA kernels sort a sample's row in one thread block
_CUDA_DEVICES = ("cpu", "cuda", "meta")  # fastmae._C's CPU and CUDA implementations; meta: its fake ones
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
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


def _triton_patches_why_not(num_patches: int) -> str | None:
    if num_patches > MAX_TRITON_PATCHES:
        return f"L={num_patches} patches > {MAX_TRITON_PATCHES} (the kernel ranks a whole row in registers)"
    return None


def _triton_supports(noise: torch.Tensor, len_keep: int) -> str | None:
    return triton_why_not(noise) or _triton_patches_why_not(noise.shape[1])


def _triton(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastmae.kernels.random_masking import random_masking_triton

    return random_masking_triton(noise, len_keep)


# --- cuda backend: fastmae._C (csrc/random_masking.cu; csrc/random_masking_cpu.cpp on CPU tensors) ---


def _fake_masks(n: int, num_patches: int, len_keep: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty((n, len_keep), dtype=torch.int64, device=device),
            torch.empty((n, num_patches), dtype=torch.int64, device=device),
            torch.empty((n, num_patches), dtype=torch.float32, device=device))


def _gather_setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    _, _, x, pos_embed = inputs
    if pos_embed.requires_grad:
        raise RuntimeError("fastmae::random_masking_gather gives no gradient to pos_embed; detach it, or gather "
                           "first and add the pos rows in torch")
    ids_keep, _, mask, _ = output
    ctx.mark_non_differentiable(mask)
    ctx.save_for_backward(ids_keep)
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype


def _gather_backward(ctx: torch.autograd.function.FunctionCtx, grad_ids_keep: None, grad_ids_restore: None,
                     grad_mask: None, grad_x_masked: torch.Tensor) -> tuple[None, None, torch.Tensor, None]:
    """``grad_x (N, L, D)``: ``grad_x_masked (N, K, D)`` scattered to the kept rows, zero elsewhere."""
    (ids_keep,) = ctx.saved_tensors
    grad_x = grad_x_masked.new_zeros(ctx.x_shape, dtype=ctx.x_dtype)
    index = ids_keep.unsqueeze(-1).expand(-1, -1, ctx.x_shape[2])  # (N, K, D)
    return None, None, grad_x.scatter(1, index, grad_x_masked.to(ctx.x_dtype)), None


def _register_cuda_python_side() -> None:
    """Fake (meta) implementations of the three schemas and the autograd of random_masking_gather; once."""

    @torch.library.register_fake("fastmae::random_masking")
    def _(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _fake_masks(noise.shape[0], noise.shape[1], len_keep, noise.device)

    @torch.library.register_fake("fastmae::random_masking_philox")
    def _(seed_step: torch.Tensor, num_samples: int, num_patches: int,
          len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _fake_masks(num_samples, num_patches, len_keep, seed_step.device)

    @torch.library.register_fake("fastmae::random_masking_gather")
    def _(noise: torch.Tensor, len_keep: int, x: torch.Tensor,
          pos_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if not noise.device == x.device == pos_embed.device:
            raise RuntimeError(f"random_masking_gather: noise, x and pos_embed must be on one device, got "
                               f"{noise.device}, {x.device}, {pos_embed.device}")
        n, num_patches, d = x.shape
        x_masked = x.new_empty((n, len_keep, d), dtype=torch.promote_types(x.dtype, pos_embed.dtype))
        return *_fake_masks(n, num_patches, len_keep, noise.device), x_masked

    torch.library.register_autograd("fastmae::random_masking_gather", _gather_backward,
                                    setup_context=_gather_setup_context)


_cuda_available = extension_backend_available(_register_cuda_python_side)


def _cuda_patches_why_not(num_patches: int) -> str | None:
    if num_patches > MAX_CUDA_PATCHES:
        return f"L={num_patches} patches > {MAX_CUDA_PATCHES} (the CUDA kernel sorts a sample in one thread block)"
    return None


def _cuda_supports(noise: torch.Tensor, len_keep: int) -> str | None:
    """Noise on cpu/cuda/meta in fp32/bf16/fp16; ``L <= 1024``, the CUDA kernel's limit, on every device (the CPU
    implementation itself has none). ``noise.requires_grad`` is fine: as in the reference, the outputs carry no
    gradient (the op falls through the Autograd key)."""
    if noise.device.type not in _CUDA_DEVICES:
        return f"fastmae._C takes cpu/cuda tensors, got {noise.device.type}"
    if noise.dtype not in _CUDA_DTYPES:
        return f"fastmae._C takes fp32/bf16/fp16 noise, got {noise.dtype}"
    return _cuda_patches_why_not(noise.shape[1])


def _cuda(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.fastmae.random_masking(noise, len_keep)


RANDOM_MASKING = Op(
    "random_masking",
    [  # priority: the cuda kernel measured faster than the triton one on an H200 (bench/results/)
        Backend("cuda", _cuda, available=_cuda_available, supports=_cuda_supports, auto_devices=("cuda",)),
        Backend("triton", _triton, available=kernel_module_available("random_masking"), supports=_triton_supports,
                auto_devices=("cuda",)),
        Backend("reference", random_masking_reference),
    ],
)


def random_masking(
    noise: torch.Tensor, len_keep: int, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``noise (N, L)`` -> ``(ids_keep (N, K), ids_restore (N, L), mask (N, L))``; see the reference."""
    check_tensor("noise", noise, ndim=2, floating=True)
    if not isinstance(len_keep, int) or not 0 < len_keep <= noise.shape[1]:
        raise ValueError(f"len_keep must be an int in [1, L={noise.shape[1]}], got {len_keep!r}")
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


def _triton_philox_supports(num_samples: int, num_patches: int, len_keep: int, seed: int, step: int,
                            device: torch.device) -> str | None:
    return device_why_not(device) or _triton_patches_why_not(num_patches)


def _triton_philox(num_samples: int, num_patches: int, len_keep: int, seed: int, step: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastmae.kernels.random_masking import random_masking_philox_triton

    return random_masking_philox_triton(num_samples, num_patches, len_keep, seed, step, device)


def _cuda_philox_supports(num_samples: int, num_patches: int, len_keep: int, seed: int, step: int,
                          device: torch.device) -> str | None:
    if device.type not in _CUDA_DEVICES:
        return f"fastmae._C takes cpu/cuda tensors, got {device.type}"
    return _cuda_patches_why_not(num_patches)


def _cuda_philox(num_samples: int, num_patches: int, len_keep: int, seed: int, step: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op reads ``seed_step = [seed, step]`` (int64, on ``device``) in the kernel: a captured CUDA graph
    that calls ``torch.ops.fastmae.random_masking_philox`` directly advances the step in place."""
    seed_step = torch.tensor([seed, step], dtype=torch.int64, device=device)
    return torch.ops.fastmae.random_masking_philox(seed_step, num_samples, num_patches, len_keep)


RANDOM_MASKING_PHILOX = Op(
    "random_masking_philox",
    [  # priority: as random_masking's
        Backend("cuda", _cuda_philox, available=_cuda_available, supports=_cuda_philox_supports,
                auto_devices=("cuda",)),
        Backend("triton", _triton_philox, available=kernel_module_available("random_masking"),
                supports=_triton_philox_supports, auto_devices=("cuda",)),
        Backend("reference", random_masking_philox_reference),
    ],
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
    if not isinstance(len_keep, int) or not 0 < len_keep <= num_patches:
        raise ValueError(f"len_keep must be an int in [1, L={num_patches}], got {len_keep!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not isinstance(step, int) or not 0 <= step < 2**31:
        raise ValueError(f"step must be an int in [0, 2**31), got {step!r}")
    if num_samples * num_patches > 2**32:
        raise ValueError(f"num_samples * num_patches must be <= 2**32 (Philox counter), got {num_samples * num_patches}")
    return RANDOM_MASKING_PHILOX(num_samples, num_patches, len_keep, seed, step, torch.device(device), backend=backend)
