"""unshuffle: the decoder input -- visible tokens back in patch order, mask tokens elsewhere, pos added."""

from __future__ import annotations

import torch

from fastmae.extension import extension_backend_available
from fastmae.kernels._common import kernel_module_available, triton_why_not
from fastmae.ops._checks import check_same_device, check_tensor
from fastmae.ops.dispatch import Backend, Op


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


def _triton_supports(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> str | None:
    reason = triton_why_not(x, ids_restore, mask_token, pos_embed)
    if reason is not None:
        return reason
    if pos_embed.requires_grad:
        return "pos_embed requires grad, but the Triton kernel treats it as a fixed table (no gradient)"
    if x.shape[0] > 65535:  # CUDA's limit on grid dimension z
        return f"batch {x.shape[0]} > 65535 (the kernels' grid carries the batch in dimension z)"
    return None


def _triton(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    from fastmae.kernels.unshuffle import unshuffle_triton

    return unshuffle_triton(x, ids_restore, mask_token, pos_embed)


CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _out_dtype(x: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor) -> torch.dtype:
    """The reference's output dtype: ``cat`` promotes x with the mask token, ``+`` with pos."""
    return torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)


def _unshuffle_fake(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """``fastmae::unshuffle`` on fake/meta tensors: ``(N, L+1, Dd)`` in the promoted dtype."""
    torch._check(
        len({x.device, ids_restore.device, mask_token.device, pos_embed.device}) == 1,
        lambda: f"unshuffle: all tensors must be on one device, got x on {x.device}, ids_restore on "
        f"{ids_restore.device}, mask_token on {mask_token.device}, pos_embed on {pos_embed.device}",
    )
    n, _, dd = x.shape
    return x.new_empty((n, ids_restore.shape[1] + 1, dd), dtype=_out_dtype(x, mask_token, pos_embed))


def _unshuffle_backward_fake(
    grad_out: torch.Tensor, ids_restore: torch.Tensor, len_keep: int, x_dtype: torch.dtype,
    mask_token_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastmae::unshuffle_backward`` on fake/meta tensors: ``grad_x (N, 1+K, Dd)`` in ``x_dtype``,
    ``grad_mask_token (1, 1, Dd)`` in ``mask_token_dtype``."""
    n, _, dd = grad_out.shape
    return (grad_out.new_empty((n, len_keep + 1, dd), dtype=x_dtype),
            grad_out.new_empty((1, 1, dd), dtype=mask_token_dtype))


def _cuda_setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, ids_restore, mask_token, _ = inputs
    ctx.save_for_backward(ids_restore)
    ctx.len_keep = x.shape[1] - 1
    ctx.x_dtype = x.dtype
    ctx.mask_token_dtype = mask_token.dtype


def _cuda_backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    (ids_restore,) = ctx.saved_tensors
    # the C++ op takes any strides (e.g. the expanded ones of ``out.sum()``'s gradient) and copies once
    grad_x, grad_tok = torch.ops.fastmae.unshuffle_backward(grad, ids_restore, ctx.len_keep, ctx.x_dtype,
                                                            ctx.mask_token_dtype)
    return grad_x, None, grad_tok, None  # pos_embed is a fixed table: _cuda_supports refuses it requiring grad


def _register_cuda() -> None:
    """Fake implementations of both schemas and the autograd of fastmae::unshuffle."""
    torch.library.register_fake("fastmae::unshuffle")(_unshuffle_fake)
    torch.library.register_fake("fastmae::unshuffle_backward")(_unshuffle_backward_fake)
    torch.library.register_autograd("fastmae::unshuffle", _cuda_backward, setup_context=_cuda_setup_context)


def _cuda_supports(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> str | None:
    """cpu (the C++ implementation), cuda or meta tensors on one device; fp32/bf16/fp16; pos_embed without grad."""
    tensors = {"x": x, "ids_restore": ids_restore, "mask_token": mask_token, "pos_embed": pos_embed}
    for name, t in tensors.items():
        if t.device.type not in ("cpu", "cuda", "meta"):
            return f"fastmae._C takes cpu, cuda or meta tensors, got {name} on {t.device}"
        if t.is_floating_point() and t.dtype not in CUDA_DTYPES:
            return f"fastmae._C takes fp32/bf16/fp16, got {name} {t.dtype}"
    if len({t.device for t in tensors.values()}) > 1:
        return "tensors on several devices: " + ", ".join(f"{k} on {t.device}" for k, t in tensors.items())
    if pos_embed.requires_grad:
        return "pos_embed requires grad, but the cuda backend treats it as a fixed table (no gradient)"
    return None


def _cuda(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """``fastmae::unshuffle`` (CUDA kernels on cuda tensors, the C++ implementation on cpu ones);
    ``ids_restore`` must be a permutation of ``0..L-1`` (each kept token's gradient row is written once)."""
    return torch.ops.fastmae.unshuffle(x, ids_restore, mask_token, pos_embed)


UNSHUFFLE = Op(
    "unshuffle",
    [  # priority: the cuda kernel measured faster than the triton one on an H200 (bench/results/)
        Backend("cuda", _cuda, available=extension_backend_available(_register_cuda), supports=_cuda_supports,
                auto_devices=("cuda",)),
        Backend("triton", _triton, available=kernel_module_available("unshuffle"), supports=_triton_supports,
                auto_devices=("cuda",)),
        Backend("reference", unshuffle_reference),
    ],
)


def unshuffle(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``x (N, 1+K, Dd)`` -> decoder input ``(N, L+1, Dd)``; see the reference."""
    check_tensor("x", x, ndim=3, floating=True)
    n, s, dd = x.shape
    check_tensor("ids_restore", ids_restore, ndim=2, integer=True, shape=(n, None))
    num_patches = ids_restore.shape[1]
    if not 1 < s <= num_patches + 1:
        raise ValueError(f"x must hold cls plus 1..L={num_patches} kept tokens, got {s} tokens")
    check_tensor("mask_token", mask_token, shape=(1, 1, dd))
    check_tensor("pos_embed", pos_embed, ndim=3, shape=(1, num_patches + 1, dd))
    check_same_device(x=x, ids_restore=ids_restore, mask_token=mask_token, pos_embed=pos_embed)
    return UNSHUFFLE(x, ids_restore, mask_token, pos_embed, backend=backend)
