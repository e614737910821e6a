"""bf16 matmul weights with fp32 masters (fastmae.train.master_weights) against the plain autocast step."""

from __future__ import annotations

import pytest
import torch

import fastmae
from fastmae.train.master_weights import MasterWeights
from fastmae.train.optim import param_groups

STEPS = 20


def _train(mode: str) -> tuple[list[float], torch.nn.Module]:
    """20 AdamW steps of the tiny preset at 32 px, the same data and masks each time: ``fp32`` (no autocast),
    ``autocast`` (bf16 autocast, fp32 parameters) or ``master`` (bf16 autocast, MasterWeights)."""
    torch.manual_seed(0)
    model = fastmae.mae_vit_tiny_patch16(img_size=32, norm_pix_loss=True)
    masters = MasterWeights(model) if mode == "master" else None
    groups = masters.param_groups(0.05) if masters else param_groups(model, 0.05)
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        imgs, noise = torch.randn(8, 3, 32, 32, generator=data), torch.rand(8, 4, generator=data)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            loss, _, _ = model(imgs, 0.75, noise)
        loss.backward()
        if masters:
            masters.step(optimizer)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


def test_twenty_steps_match_the_autocast_step_within_bf16_noise() -> None:
    """Tolerance: bf16 noise, measured in the same test as the largest relative gap between the autocast and the
    fp32 runs' losses (8e-5 to 1e-4 here); with the masters the weights the matmuls see are the autocast step's
    own bf16 roundings, and on this CPU the two runs are bit-identical."""
    fp32, _ = _train("fp32")
    autocast, autocast_model = _train("autocast")
    master, master_model = _train("master")
    noise = max(abs(a - f) / abs(f) for a, f in zip(autocast, fp32))
    assert noise > 0  # the bf16 runs do differ from fp32: the tolerance is not zero
    for step, (m, a) in enumerate(zip(master, autocast), start=1):
        assert abs(m - a) / abs(a) <= noise, f"step {step}: {m} vs autocast {a} (bf16 noise {noise:.1e})"
    want = autocast_model.state_dict()
    for name, value in master_model.state_dict().items():
        assert value.dtype == want[name].dtype, name  # fp32 export, as the autocast model's
        torch.testing.assert_close(value, want[name], rtol=1e-3, atol=1e-5, msg=name)


def test_matmul_weights_are_bf16_norms_and_tokens_stay_fp32() -> None:
    model = fastmae.mae_vit_tiny_patch16(img_size=32)
    fp32_init = {k: v.clone() for k, v in model.state_dict().items()}
    masters = MasterWeights(model)
    assert model.blocks[0].attn.qkv.weight.dtype == model.patch_embed.proj.bias.dtype == torch.bfloat16
    assert model.blocks[0].norm1.weight.dtype == torch.float32 and model.cls_token.dtype == torch.float32
    exported = model.state_dict()
    assert all(exported[k].dtype == torch.float32 and torch.equal(exported[k], fp32_init[k]) for k in fp32_init)
    n_masters = sum(len(g["params"]) for g in masters.param_groups(0.05))
    assert n_masters == len(list(model.parameters()))  # every trainable parameter is optimised once


def test_load_state_dict_fills_the_masters_exactly() -> None:
    source = fastmae.mae_vit_tiny_patch16(img_size=32)
    state = {k: v + 1e-4 * torch.randn_like(v) for k, v in source.state_dict().items()}  # not bf16-representable
    model = fastmae.mae_vit_tiny_patch16(img_size=32)
    MasterWeights(model)
    model.load_state_dict(state, strict=True)
    exported = model.state_dict()
    assert all(torch.equal(exported[k], state[k]) for k in state)
    assert torch.equal(model.decoder_pred.weight, state["decoder_pred.weight"].bfloat16())


def test_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="bf16 or fp16"):
        MasterWeights(fastmae.mae_vit_tiny_patch16(img_size=32), dtype=torch.float64)
    with pytest.raises(ValueError, match="trainable fp32 Linear or Conv parameters, got none"):
        MasterWeights(torch.nn.LayerNorm(4))


def test_bound_optimizer_runs_the_benchmark_step_as_the_autocast_one() -> None:
    """``MasterWeights.bind`` in the benchmark's step runner (bf16 autocast on CPU here; the benchmark's
    fastmae-bf16params variants run it on CUDA): the same losses as the plain autocast step."""
    from fastmae.benchmark.train_step import fastmae_unavailable_reason, step_runner

    losses = {}
    for bf16_params in (False, True):
        torch.manual_seed(0)
        model = fastmae.mae_vit_tiny_patch16(img_size=32, norm_pix_loss=True)
        masters = MasterWeights(model) if bf16_params else None
        optimizer = torch.optim.AdamW(masters.param_groups(0.05) if masters else param_groups(model, 0.05), lr=1e-3)
        run = step_runner(model, masters.bind(optimizer) if masters else optimizer, 8, 32, torch.device("cpu"),
                          bf16=True, cuda_graph=False)
        torch.manual_seed(1)  # the same masks: the step draws its noise from the global generator
        losses[bf16_params] = [float(run(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(s))))
                               for s in range(3)]
        assert all(p.grad is None for p in model.parameters())  # the step clears every gradient
    assert losses[True] == losses[False]
    assert "CUDA only" in fastmae_unavailable_reason("fastmae-bf16params", torch.device("cpu"))
