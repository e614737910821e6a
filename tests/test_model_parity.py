"""fastmae.MAE against an independent implementation of the spec (tests/mae_spec.py, which imports
nothing from fastmae): same weights and noise -> same loss, pred, mask and every parameter gradient."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn

import fastmae
from mae_spec import spec_mae_forward
from numerics import rel_err

TOL = 1e-5  # relative, fp32 on CPU


def _model(img_size, patch_size: int, norm_pix_loss: bool, ln_eps: float | None, dims=(64, 2, 4, 32, 2, 2)):  # noqa: ANN001, ANN202
    d, depth, heads, dd, ddepth, dheads = dims
    kwargs = {} if ln_eps is None else {"norm_layer": partial(nn.LayerNorm, eps=ln_eps)}
    model = fastmae.MAE(img_size=img_size, patch_size=patch_size, embed_dim=d, depth=depth, num_heads=heads,
                        decoder_embed_dim=dd, decoder_depth=ddepth, decoder_num_heads=dheads,
                        norm_pix_loss=norm_pix_loss, **kwargs)
    with torch.no_grad():  # non-trivial LN affines and pos tables (incl. cls rows), so every term is exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        model.pos_embed.add_(0.1 * torch.randn_like(model.pos_embed))
        model.decoder_pos_embed.add_(0.1 * torch.randn_like(model.decoder_pos_embed))
    return model


def _check(model: fastmae.MAE, n: int, mask_ratio: float, ln_eps: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    hh, ww = model.patch_embed.img_size
    imgs = torch.randn(n, 3, hh, ww, generator=g)
    noise = torch.rand(n, model.patch_embed.num_patches, generator=g)

    model.zero_grad()
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    loss.backward()

    trained = dict(model.named_parameters())
    params = {k: v.detach().clone().requires_grad_(k in trained) for k, v in model.state_dict().items()}
    attn = model.blocks[0].attn.num_heads, model.decoder_blocks[0].attn.num_heads
    s_loss, s_pred, s_mask = spec_mae_forward(params, imgs, noise, patch_size=model.patch_embed.patch_size[0],
                                              num_heads=attn[0], decoder_num_heads=attn[1], mask_ratio=mask_ratio,
                                              norm_pix_loss=model.norm_pix_loss, ln_eps=ln_eps)
    s_loss.backward()

    assert torch.equal(mask, s_mask)
    assert rel_err(loss, s_loss) <= TOL, f"loss {loss.item()} vs {s_loss.item()}"
    assert rel_err(pred, s_pred) <= TOL, f"pred rel err {rel_err(pred, s_pred):.2e}"
    errors = {k: rel_err(p.grad, params[k].grad) for k, p in trained.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"grad of {worst}: rel err {errors[worst]:.2e}"


@pytest.mark.parametrize("img_size,patch_size", [(64, 16), ((64, 96), 16), (56, 14), ((84, 56), 14)])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("n", [1, 3])
def test_parity_small(img_size, patch_size: int, norm_pix_loss: bool, mask_ratio: float, n: int) -> None:  # noqa: ANN001
    torch.manual_seed(n)
    _check(_model(img_size, patch_size, norm_pix_loss, 1e-6), n, mask_ratio, 1e-6, seed=7 * n + patch_size)


@pytest.mark.parametrize("img_size,patch_size,n", [(224, 16, 3), (224, 14, 1), ((224, 160), 16, 5)])
def test_parity_real_token_counts(img_size, patch_size: int, n: int) -> None:  # noqa: ANN001
    """196 / 256 / 140 patches: encoder 50 / 65 / 36 tokens, decoder 197 / 257 / 141."""
    torch.manual_seed(0)
    model = _model(img_size, patch_size, True, 1e-6, dims=(128, 2, 2, 64, 1, 2))
    _check(model, n, 0.75, 1e-6, seed=n)


def test_parity_constructor_default_eps_and_reference_backends() -> None:
    """The constructor's default norm_layer (eps 1e-5), and the whole model on the reference backends."""
    torch.manual_seed(1)
    model = _model((48, 80), 16, True, None)
    assert model.norm.eps == 1e-5
    _check(model, 3, 0.75, 1e-5, seed=3)
    with fastmae.use_backend("reference"):
        _check(model, 3, 0.75, 1e-5, seed=4)


@pytest.mark.parametrize("img_size,patch_size,n,norm_pix", [(224, 16, 3, True), ((64, 96), 16, 1, False),
                                                            ((56, 84), 14, 3, True)])
def test_triton_backends_match_reference_whole_model(img_size, patch_size: int, n: int, norm_pix: bool) -> None:  # noqa: ANN001
    """use_backend("triton") (the interpreter, here) against use_backend("reference"): loss and all gradients."""
    torch.manual_seed(0)
    model = _model(img_size, patch_size, norm_pix, 1e-6, dims=(64, 2, 2, 32, 1, 2))
    hh, ww = model.patch_embed.img_size
    imgs = torch.randn(n, 3, hh, ww)
    noise = torch.rand(n, model.patch_embed.num_patches)
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        with fastmae.use_backend(backend):
            loss, pred, mask = model(imgs, 0.75, noise)
        loss.backward()
        results[backend] = loss, pred, mask, {k: p.grad.clone() for k, p in model.named_parameters()}
    (r_loss, r_pred, r_mask, r_grads), (t_loss, t_pred, t_mask, t_grads) = results["reference"], results["triton"]
    assert torch.equal(t_mask, r_mask)
    assert rel_err(t_loss, r_loss) <= TOL and rel_err(t_pred, r_pred) <= TOL
    errors = {k: rel_err(t_grads[k], r_grads[k]) for k in r_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"grad of {worst}: rel err {errors[worst]:.2e}"
