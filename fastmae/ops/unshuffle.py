"""unshuffle: the decoder input -- visible tokens back in patch order, mask tokens elsewhere, pos added.

The op's one definition: the reference (the spec), the custom ops ``fastmae::unshuffle`` and
``fastmae::unshuffle_backward`` (one schema, fake and autograd for the triton and cuda kernels), the
backends' support rules, and the public function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from fastmae.ops._cases import masking, randn
from fastmae.ops._checks import check_same_device, check_tensor
from fastmae.ops._kernels import CUDA_DEVICES, FLOAT_DTYPES, cuda_available, kernel, triton_available, triton_devices
from fastmae.ops.dispatch import Backend, Case, Op

MAX_TRITON_BATCH = 65535  # the triton kernels' grid carries the batch in dimension z


def unshuffle_reference(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """The spec. ``x (N, 1+K, Dd)`` (cls first, kept tokens in ``ids_keep`` order),
    ``ids_restore (N, L)``, ``mask_token (1, 1, Dd)``, ``pos_embed (1, L+1, Dd)`` -> ``(N, L+1, Dd)``.

    As the official code: append ``L-K`` copies of the mask token, gather by ``ids_restore``,
    put cls back in front, add the decoder's pos table to every token (cls, visible and mask).
    """
    n, s, dd = x.shape
    num_patches = ids_restore.shape[1]
    mask_tokens = mask_token.expand(n, num_patches + 1 - s, dd)  # (N, L-K, Dd)
    shuffled = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (N, L, Dd): kept, then removed
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # (N, L, Dd)
    tokens = torch.cat([x[:, :1], restored], dim=1)  # (N, L+1, Dd)
    return tokens + pos_embed


# ---- the kernels' op: one schema, fake and autograd for every kernel backend ----

@torch.library.custom_op("fastmae::unshuffle", mutates_args=())
def unshuffle_op(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor,
                 backend: str) -> torch.Tensor:
    """``x (N, 1+K, Dd)``, ``ids_restore (N, L)`` (a permutation of ``0..L-1`` per row), ``mask_token (1, 1, Dd)``,
    ``pos_embed (1, L+1, Dd)`` -> ``(N, L+1, Dd)`` in the promotion of the three float dtypes."""
    return kernel(backend, "unshuffle", "unshuffle")(x, ids_restore, mask_token, pos_embed)


@unshuffle_op.register_fake
def _(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor,
      backend: str) -> torch.Tensor:
    n, _, dd = x.shape
    dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)
    return x.new_empty((n, ids_restore.shape[1] + 1, dd), dtype=dtype)


@torch.library.custom_op("fastmae::unshuffle_backward", mutates_args=())
def unshuffle_backward_op(grad: torch.Tensor, ids_restore: torch.Tensor, len_keep: int, x_dtype: torch.dtype,
                          mask_token_dtype: torch.dtype, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad (N, L+1, Dd)`` (any strides) -> ``grad_x (N, 1+K, Dd)`` in ``x_dtype``, ``grad_mask_token (1, 1, Dd)``
    in ``mask_token_dtype`` (the sum over the removed positions)."""
    return kernel(backend, "unshuffle", "unshuffle_backward")(grad, ids_restore, len_keep, x_dtype, mask_token_dtype)


@unshuffle_backward_op.register_fake
def _(grad: torch.Tensor, ids_restore: torch.Tensor, len_keep: int, x_dtype: torch.dtype,
      mask_token_dtype: torch.dtype, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, dd = grad.shape
    return grad.new_empty((n, len_keep + 1, dd), dtype=x_dtype), grad.new_empty((1, 1, dd), dtype=mask_token_dtype)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, ids_restore, mask_token, _, backend = inputs
    ctx.save_for_backward(ids_restore)
    ctx.args = (x.shape[1] - 1, x.dtype, mask_token.dtype, backend)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    """Gradients for x and mask_token; pos_embed is a fixed table (``no_grad``)."""
    (ids_restore,) = ctx.saved_tensors
    grad_x, grad_tok = unshuffle_backward_op(grad, ids_restore, *ctx.args)
    return grad_x, None, grad_tok, None, None


unshuffle_op.register_autograd(_backward, setup_context=_setup_context)


def _triton_limits(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   pos_embed: torch.Tensor) -> str | None:
    if x.shape[0] > MAX_TRITON_BATCH:
        return f"batch {x.shape[0]} > {MAX_TRITON_BATCH} (the triton kernels' grid carries the batch in dimension z)"
    return None


def _backend(name: str, **rules: object) -> Backend:
    return Backend(name, functools.partial(unshuffle_op, backend=name), dtypes=FLOAT_DTYPES, no_grad=("pos_embed",),
                   auto_devices=("cuda",), **rules)


def _case(num_patches: int, len_keep: int, width: int) -> Callable[..., tuple]:
    """``(x (N, 1+K, Dd), ids_restore (N, L), mask_token (1, 1, Dd), pos_embed (1, L+1, Dd))``; the mask token and
    the pos table fp32, as the model's parameter and buffer."""

    def make(device: torch.device, dtype: torch.dtype, batch: int) -> tuple:
        x = randn(batch, 1 + len_keep, width, seed=1, device=device, dtype=dtype)
        _, ids_restore, _ = masking(batch, num_patches, len_keep, seed=2, device=device)
        return (x, ids_restore, randn(1, 1, width, seed=3, device=device),
                randn(1, num_patches + 1, width, seed=4, device=device))

    return make


def _min_bytes(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor) -> int:
    """x, ids_restore and the pos table in, the decoder input out."""
    out_size = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype).itemsize
    n, rows = ids_restore.shape[0], ids_restore.shape[1] + 1
    return (x.numel() * x.element_size() + ids_restore.numel() * 8 + pos_embed.numel() * pos_embed.element_size()
            + n * rows * x.shape[-1] * out_size)


UNSHUFFLE_CASES = (Case("L196-K49", _case(196, 49, 32), batch=3, grad=("x", "mask_token")),
                  Case("L256-K64", _case(256, 64, 24), batch=2, grad=("x", "mask_token")),
                  Case("L16-K0", _case(16, 0, 16), batch=2, grad=("x", "mask_token")))

UNSHUFFLE = Op(
    "unshuffle",
    [  # priority: the cuda kernel measured faster than the triton one on an H200 (bench/results/)
        _backend("cuda", available=cuda_available, devices=CUDA_DEVICES),
        _backend("triton", available=triton_available("unshuffle"), devices=triton_devices(),
                 supports=_triton_limits),
        Backend("reference", unshuffle_reference),
    ],
    cases=UNSHUFFLE_CASES, benchmark=Case("vit-b-decoder", _case(196, 49, 512)), min_bytes=_min_bytes,
    kernel_op=unshuffle_op,
)


def unshuffle(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``x (N, 1+K, Dd)`` (cls first), ``ids_restore (N, L)``, ``mask_token (1, 1, Dd)``, ``pos_embed (1, L+1, Dd)``
    -> the decoder input ``(N, L+1, Dd)``; see the reference."""
    check_tensor("x", x, ndim=3, floating=True)
    n, s, dd = x.shape
    check_tensor("ids_restore", ids_restore, ndim=2, integer=True, shape=(n, None))
    num_patches = ids_restore.shape[1]
    if not 1 <= s <= num_patches + 1:
        raise ValueError(f"x must hold cls plus 0..L={num_patches} kept tokens, got {s} tokens")
    check_tensor("mask_token", mask_token, shape=(1, 1, dd))
    check_tensor("pos_embed", pos_embed, ndim=3, shape=(1, num_patches + 1, dd))
    check_same_device(x=x, ids_restore=ids_restore, mask_token=mask_token, pos_embed=pos_embed)
    return UNSHUFFLE(x, ids_restore, mask_token, pos_embed, backend=backend)
