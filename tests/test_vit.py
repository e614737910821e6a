"""fastmae.vit: the MAE encoder as a classifier (official ``models_vit`` semantics) and the loading of pretrained
weights into it.

- forward and every parameter gradient against an independent implementation (tests/vit_spec.py), with
  global pooling and without, on the default dispatch and on each backend of the ViT's ops;
- timm's VisionTransformer: same keys (its state dict loads with nothing missing or left over), same logits,
  and with drop path in training the same per-sample masks from the same seed;
- loading an MAE (state dict, official ``{"model": ...}`` checkpoint, a fastmae pretraining checkpoint file):
  encoder weights equal, ``pos_embed`` resized by the official formula, the official missing-key sets;
- drop path, the presets, the init, and the errors for bad inputs and checkpoints of other architectures.
All fp32 on the CPU, small dims (32 px images, 8 px patches, width 64, 2 blocks).
"""

from __future__ import annotations

import argparse
import datetime
from functools import partial

import pytest
import torch
import torch.nn as nn

import fastmae
from fastmae import vit as fv
from fastmae.model import Block, drop_path
from fastmae.ops import OPS
from fastmae.train.checkpoint import save_checkpoint
from numerics import rel_err
from pretrain_runs import Reference, demo_root, reference  # noqa: F401  (fixtures)
from vit_spec import official_interpolate_pos_embed, spec_vit_forward, spec_vit_tokens

TOL = 1e-5  # relative, fp32 on CPU
DIMS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}
MAE_DIMS = {**DIMS, "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2,
            "norm_layer": partial(nn.LayerNorm, eps=1e-6)}
VIT_OPS = ("attention", "layer_norm", "linear_gelu")  # the ops a ViT forward calls
# every backend one of the ViT's ops has (a blanket use_backend(name) leaves the ops without it on their default)
BACKENDS = sorted({b.name for op in VIT_OPS for b in OPS[op].backends})


def _vit(global_pool: bool = True, num_classes: int = 10, **kwargs) -> fv.VisionTransformer:  # noqa: ANN003
    model = fv.VisionTransformer(**{**DIMS, **kwargs}, num_classes=num_classes, global_pool=global_pool)
    with torch.no_grad():  # non-trivial norms, biases and tokens, so every term is exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or name in ("cls_token", "pos_embed"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _mae(seed: int = 0) -> fastmae.MAE:
    torch.manual_seed(seed)
    model = fastmae.MAE(**MAE_DIMS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _imgs(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_matches_spec(model: fv.VisionTransformer, imgs: torch.Tensor) -> None:
    model.zero_grad()
    logits = model(imgs)
    cotangent = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * cotangent).sum().backward()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items()}
    want = spec_vit_forward(params, imgs, DIMS["patch_size"], DIMS["num_heads"], model.global_pool)
    (want * cotangent).sum().backward()
    assert rel_err(logits, want) <= TOL, f"logits rel err {rel_err(logits, want):.2e}"
    errors = {k: rel_err(p.grad, params[k].grad) for k, p in model.named_parameters()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"grad of {worst}: rel err {errors[worst]:.2e}"


# ----------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("global_pool", [True, False])
def test_forward_and_gradients_match_spec(global_pool: bool) -> None:
    torch.manual_seed(0)
    model = _vit(global_pool)
    _assert_matches_spec(model, _imgs())
    tokens = model.forward_tokens(_imgs())
    params = {k: v.detach() for k, v in model.state_dict().items()}
    want = spec_vit_tokens(params, _imgs(), DIMS["patch_size"], DIMS["num_heads"])
    if not global_pool:
        want = nn.functional.layer_norm(want, (64,), params["norm.weight"], params["norm.bias"], 1e-6)
    assert tokens.shape == (3, 17, 64) and rel_err(tokens, want) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("global_pool", [True, False])
def test_every_backend_matches_spec(backend: str, global_pool: bool) -> None:
    """use_backend(name) for each backend of attention / layer_norm / linear_gelu (triton: the interpreter on
    CPU); a backend that cannot run on this machine is skipped with its reason."""
    reasons = [OPS[op].backend(backend).available() for op in VIT_OPS if OPS[op].backend(backend) is not None]
    if all(r is not None for r in reasons):
        pytest.skip(f"backend {backend} cannot run here: {reasons}")
    torch.manual_seed(1)
    with fastmae.use_backend(backend):
        _assert_matches_spec(_vit(global_pool), _imgs(2))


# ---------------------------------------------------------------------------------------------------- timm
def _timm_vit(global_pool: bool, drop_path_rate: float = 0.0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                             global_pool="avg" if global_pool else "token", class_token=True, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=drop_path_rate)


@pytest.mark.parametrize("global_pool", [True, False])
def test_timm_state_dict_loads_and_gives_same_logits(global_pool: bool) -> None:
    torch.manual_seed(2)
    reference = _timm_vit(global_pool).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = fv.VisionTransformer(**DIMS, num_classes=10, global_pool=global_pool).eval()
    assert list(model.state_dict()) == list(reference.state_dict())  # same keys, same order
    result = fv.load_pretrained(model, reference.state_dict())
    assert result == fv.LoadResult([], [], False, [])
    imgs = _imgs()
    with torch.no_grad():
        assert rel_err(model(imgs), reference(imgs)) <= TOL
        # timm's forward_features: every token, after norm (an Identity under avg pooling): our forward_tokens
        assert rel_err(model.forward_tokens(imgs), reference.forward_features(imgs)) <= TOL
        assert rel_err(model.forward_features(imgs), reference.forward_head(reference.forward_features(imgs),
                                                                              pre_logits=True)) <= TOL


def test_drop_path_in_training_equals_timm_from_the_same_seed() -> None:
    """Same rates (linspace over the blocks), same per-sample masks drawn in the same order, same scaling."""
    reference = _timm_vit(True, drop_path_rate=0.5).train()
    model = fv.VisionTransformer(**DIMS, num_classes=10, drop_path_rate=0.5).train()
    fv.load_pretrained(model, reference.state_dict())
    assert [b.drop_path for b in model.blocks] == [0.0, 0.5]
    imgs = _imgs(8)
    outs = []
    for net in (model, reference, model):
        torch.manual_seed(3)
        outs.append(net(imgs))
    assert rel_err(outs[0], outs[1]) <= TOL
    torch.manual_seed(4)
    assert rel_err(model(imgs), outs[0]) > 1e-3  # another seed, other masks


# ---------------------------------------------------------------------------------------------------- loading
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.")


def _assert_encoder_equal(model: fv.VisionTransformer, mae: fastmae.MAE) -> None:
    mae_state = mae.state_dict()
    encoder = [k for k in model.state_dict() if k.startswith(ENCODER_PREFIXES)]
    assert len(encoder) == 2 + 2 + 12 * DIMS["depth"]
    for k in encoder:
        assert torch.equal(model.state_dict()[k], mae_state[k]), k


@pytest.mark.parametrize("global_pool", [True, False])
def test_load_mae_state_dict_official_missing_keys(global_pool: bool) -> None:
    mae = _mae()
    model = fv.VisionTransformer(**DIMS, num_classes=10, global_pool=global_pool)
    head_before = model.head.weight.detach().clone()
    state = mae.state_dict()
    keys_before = list(state)
    result = fv.load_pretrained(model, state)
    assert list(state) == keys_before  # the caller's dict is left as it was
    _assert_encoder_equal(model, mae)
    assert torch.equal(model.head.weight, head_before)
    if global_pool:  # the official main_finetune's assertions, and the encoder's norm left unused
        assert set(result.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
        assert result.unexpected_keys == ["norm.bias", "norm.weight"]
    else:
        assert set(result.missing_keys) == {"head.weight", "head.bias"}
        assert result.unexpected_keys == []
        assert torch.equal(model.norm.weight, mae.norm.weight) and torch.equal(model.norm.bias, mae.norm.bias)
    assert not result.interpolated
    assert set(result.dropped_keys) == {k for k in state if k.startswith("decoder_") or k == "mask_token"}
    assert model.pos_embed.requires_grad  # a learned parameter, filled from MAE's fixed sin-cos table


def test_load_fastmae_checkpoint_file_and_run_folder(tmp_path) -> None:  # noqa: ANN001
    """A checkpoint written as ``fastmae pretrain`` writes one (save_checkpoint of model, optimizer and state)."""
    mae = _mae(1)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    loss, _, _ = mae(_imgs(2), mask_ratio=0.75)
    loss.backward()
    optimizer.step()
    state = {"model": mae.state_dict(), "optimizer": optimizer.state_dict(), "step": 1, "skipped_steps": 0,
             "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict()}
    save_checkpoint(tmp_path / "checkpoints", 1, state)
    path = save_checkpoint(tmp_path / "checkpoints", 2, state)
    for source in (path, str(path), tmp_path / "checkpoints", tmp_path):  # the file, the folder, the run folder
        model = fv.VisionTransformer(**DIMS, num_classes=5)
        result = fv.load_pretrained(model, source)
        _assert_encoder_equal(model, mae)
        assert set(result.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


@pytest.mark.slow  # a 6-step fastmae pretrain run (shared with the resume tests)
def test_load_a_real_fastmae_pretrain_run(reference: Reference) -> None:
    """The run folder of ``fastmae pretrain`` (tiny preset, 32 px): its newest checkpoint into the preset's ViT,
    at the run's resolution and at 48 px (2x2 -> 3x3 grid)."""
    import json

    mae_name = json.loads((reference.out / "config.json").read_text())["model"]
    for img_size in (32, 48):
        model = fv.VIT_PRESETS[fv.vit_preset_for(mae_name)](img_size=img_size, num_classes=3)
        result = fv.load_pretrained(model, reference.out)
        assert result.interpolated == (img_size == 48)
        assert set(result.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
        for k, v in model.state_dict().items():
            if k.startswith(ENCODER_PREFIXES) and k != "pos_embed":
                assert torch.equal(v, reference.weights[k]), k
        want = official_interpolate_pos_embed(reference.weights["pos_embed"], model.patch_embed.num_patches)
        assert torch.equal(model.pos_embed.detach(), want)


def test_load_safetensors_file(tmp_path) -> None:  # noqa: ANN001
    from safetensors.torch import save_file

    trained = _vit(num_classes=10)
    save_file(trained.state_dict(), tmp_path / "model.safetensors")
    model = fv.VisionTransformer(**DIMS, num_classes=10)
    assert fv.load_pretrained(model, tmp_path / "model.safetensors") == fv.LoadResult([], [], False, [])
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())


def test_load_official_checkpoint_dict_file_and_prefixed_keys(tmp_path) -> None:  # noqa: ANN001
    mae = _mae(2)
    path = tmp_path / "checkpoint-799.pth"  # as the official main_pretrain saves it, its argparse args included
    torch.save({"model": mae.state_dict(), "epoch": 799, "args": argparse.Namespace(model="mae_vit_base_patch16")},
               path)
    for source in ({"model": mae.state_dict()}, path,
                   {"model": {f"module.{k}": v for k, v in mae.state_dict().items()}}):
        model = fv.VisionTransformer(**DIMS, num_classes=5, global_pool=False)
        assert set(fv.load_pretrained(model, source).missing_keys) == {"head.weight", "head.bias"}
        _assert_encoder_equal(model, mae)


def test_pos_embed_interpolated_as_the_official_formula() -> None:
    """MAE at 32 px (4x4 patches) into a ViT at 48 px (6x6): equal to the official interpolate_pos_embed."""
    mae = _mae(3)
    model = fv.VisionTransformer(**{**DIMS, "img_size": 48}, num_classes=5)
    result = fv.load_pretrained(model, mae.state_dict())
    assert result.interpolated
    want = official_interpolate_pos_embed(mae.pos_embed, num_patches=36)
    assert model.pos_embed.shape == (1, 37, 64)
    assert torch.equal(model.pos_embed.detach(), want)
    assert torch.equal(model.pos_embed[:, 0], mae.pos_embed[:, 0])
    # and back down: 6x6 -> 4x4 from the ViT's own state dict
    small = fv.VisionTransformer(**DIMS, num_classes=5)
    assert fv.load_pretrained(small, model.state_dict()).interpolated
    assert torch.equal(small.pos_embed.detach(), official_interpolate_pos_embed(model.pos_embed.detach(), 16))
    # beyond the official (square grids only): a 4x4 table onto a 4x6 grid, the cls row kept
    wide = fv.VisionTransformer(**{**DIMS, "img_size": (32, 48)}, num_classes=5)
    assert fv.load_pretrained(wide, mae.state_dict()).interpolated
    grid = mae.pos_embed[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)  # (1, D, 4, 4)
    want = nn.functional.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.equal(wide.pos_embed[:, 1:].detach(), want) and torch.equal(wide.pos_embed[:, 0], mae.pos_embed[:, 0])
    assert wide(_imgs(2).repeat(1, 1, 1, 2)[..., :48]).shape == (2, 5)


def test_head_of_another_shape_is_dropped_same_shape_kept() -> None:
    trained = _vit(num_classes=10)
    model = fv.VisionTransformer(**DIMS, num_classes=7)
    result = fv.load_pretrained(model, trained.state_dict())
    assert result.dropped_keys == ["head.bias", "head.weight"] and result.missing_keys == ["head.bias", "head.weight"]
    same = fv.VisionTransformer(**DIMS, num_classes=10)
    assert fv.load_pretrained(same, trained.state_dict()) == fv.LoadResult([], [], False, [])
    assert torch.equal(same.head.weight, trained.head.weight)
    features = fv.VisionTransformer(**DIMS, num_classes=0)
    assert isinstance(features.head, nn.Identity)
    assert fv.load_pretrained(features, trained.state_dict()).dropped_keys == ["head.bias", "head.weight"]
    assert features(_imgs()).shape == (3, 64)


# ---------------------------------------------------------------------------------------------------- drop path
def test_drop_path_eval_is_deterministic_and_equals_no_drop_path() -> None:
    torch.manual_seed(5)
    model = _vit(drop_path_rate=0.3)
    plain = fv.VisionTransformer(**DIMS, num_classes=10)
    plain.load_state_dict(model.state_dict())
    model.eval()
    imgs = _imgs()
    with torch.no_grad():
        first = model(imgs)
        assert torch.equal(first, model(imgs)) and torch.equal(first, plain(imgs))
        model.train()
        torch.manual_seed(0)
        a = model(imgs)
        torch.manual_seed(1)
        b = model(imgs)
        plain.train()
        assert torch.equal(plain(imgs), first)  # rate 0: identity in training too
    assert rel_err(a, b) > 1e-3 and rel_err(a, first) > 1e-3


def test_drop_path_is_per_sample_and_scaled() -> None:
    x = torch.ones(4000, 3, 5)
    torch.manual_seed(6)
    out = drop_path(x, 0.25, training=True)
    per_sample = out.reshape(4000, -1)
    assert torch.equal(per_sample.min(dim=1).values, per_sample.max(dim=1).values)  # one value per sample
    assert per_sample[:, 0].unique().tolist() == [0.0, pytest.approx(1 / 0.75)]
    kept = (per_sample[:, 0] > 0).float().mean().item()
    assert abs(kept - 0.75) < 0.03 and abs(out.mean().item() - 1.0) < 0.04
    assert drop_path(x, 0.25, training=False) is x and drop_path(x, 0.0, training=True) is x


def test_block_drop_path_argument() -> None:
    block = Block(16, 2, drop_path=0.2)
    assert block.drop_path == 0.2 and "drop_path=0.2" in repr(block)
    for bad in (-0.1, 1.0, "0.1"):
        with pytest.raises(ValueError, match="drop_path must be a number in"):
            Block(16, 2, drop_path=bad)
    with pytest.raises(ValueError, match="drop_path_rate must be a number in"):
        fv.VisionTransformer(**DIMS, drop_path_rate=1.0)


# ---------------------------------------------------------------------------------------------------- API
def test_attributes_keys_and_no_weight_decay() -> None:
    model = fv.VisionTransformer(**DIMS, num_classes=10)
    assert fastmae.VisionTransformer is fv.VisionTransformer
    assert isinstance(model.blocks, nn.ModuleList) and model.depth == 2 and model.embed_dim == 64
    assert model.num_classes == 10 and model.global_pool is True
    assert isinstance(model.pos_embed, nn.Parameter) and model.pos_embed.shape == (1, 17, 64)
    assert model.cls_token.shape == (1, 1, 64)
    keys = set(model.state_dict())
    assert {"fc_norm.weight", "head.weight"} <= keys and not any(k.startswith("norm.") for k in keys)
    token = fv.VisionTransformer(**DIMS, num_classes=10, global_pool=False)
    assert "norm.weight" in token.state_dict() and not hasattr(token, "fc_norm")
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}


def test_init_matches_timm_default() -> None:
    torch.manual_seed(7)
    model = fv.VisionTransformer(img_size=64, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=100)
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert 0 < model.cls_token.abs().max().item() < 1e-5
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert abs(m.weight.std().item() - 0.02) < 0.002, name
            assert m.weight.abs().max().item() <= 2.0 and torch.count_nonzero(m.bias) == 0, name
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.count_nonzero(m.bias) == 0, name
    fv.init_head(model, fv.FINETUNE_HEAD_STD)
    assert abs(model.head.weight.std().item() - 2e-5) < 2e-6 and torch.count_nonzero(model.head.bias) == 0
    fv.init_head(model, fv.LINPROBE_HEAD_STD)
    assert abs(model.head.weight.std().item() - 0.01) < 1e-3
    model.head = nn.Sequential(nn.BatchNorm1d(192, affine=False, eps=1e-6), model.head)  # linear probing's head
    fv.init_head(model, 0.05)
    assert abs(model.head[1].weight.std().item() - 0.05) < 5e-3
    with pytest.raises(ValueError, match="exactly one nn.Linear"):
        fv.init_head(fv.VisionTransformer(**DIMS, num_classes=0), 0.01)
    with pytest.raises(ValueError, match="std must be a positive number"):
        fv.init_head(model, 0)


@pytest.mark.parametrize("mae_name", sorted(fastmae.PRESETS) + ["mae_vit_demo_patch8_dec128d2b"])
def test_presets_are_the_mae_encoders(mae_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each MAE preset's ViT preset has the encoder's keys and shapes (built on the meta device, where the
    MAE's sin-cos init cannot write: it is skipped, only shapes are compared)."""
    vit_name = fv.vit_preset_for(mae_name)
    monkeypatch.setattr(fastmae.model.MaskedAutoencoderViT, "initialize_weights", lambda self: None)
    with torch.device("meta"):
        mae = getattr(fastmae.model, mae_name)() if mae_name not in fastmae.PRESETS else fastmae.PRESETS[mae_name]()
        vit = fv.VIT_PRESETS[vit_name](global_pool=False)
    mae_shapes = {k: v.shape for k, v in mae.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    assert {k: v.shape for k, v in vit.state_dict().items() if not k.startswith("head.")} == mae_shapes
    assert vit.blocks[0].attn.num_heads == mae.blocks[0].attn.num_heads
    assert vit.norm.eps == 1e-6 and vit.blocks[0].norm1.eps == mae.blocks[0].norm1.eps


def test_vit_preset_for() -> None:
    assert fv.vit_preset_for("mae_vit_base_patch16_dec512d8b") == "vit_base_patch16"
    assert fv.vit_preset_for("mae_vit_huge_patch14") == "vit_huge_patch14"
    assert fv.vit_preset_for("mae_vit_demo_patch8_dec128d2b") == "vit_demo_patch8"
    assert fv.vit_preset_for("vit_large_patch16") == "vit_large_patch16"
    assert sorted(fv.VIT_PRESETS) == ["vit_base_patch16", "vit_demo_patch8", "vit_huge_patch14", "vit_large_patch16",
                                      "vit_small_patch16", "vit_tiny_patch16"]
    with pytest.raises(ValueError, match="no ViT preset for model 'resnet50'.*mae_vit_base_patch16"):
        fv.vit_preset_for("resnet50")


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_images() -> None:
    model = fv.VisionTransformer(**DIMS, num_classes=10)
    with pytest.raises(ValueError, match=r"built for img_size \(H, W\) = \(32, 32\), got \(48, 48\)"):
        model(_imgs(2, 48))
    with pytest.raises(TypeError, match="imgs must be a torch.Tensor"):
        model([[0.0]])
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="C=3 channels"):
        model(torch.zeros(2, 1, 32, 32))


def test_checkpoint_of_another_width_names_both_shapes() -> None:
    other = fastmae.MAE(**{**MAE_DIMS, "embed_dim": 128})
    model = fv.VisionTransformer(**DIMS, num_classes=10)
    with pytest.raises(ValueError, match=r"another architecture \(width 128.*\) than the model \(width 64") as info:
        fv.load_pretrained(model, other.state_dict())
    assert "cls_token: model (1, 1, 64), checkpoint (1, 1, 128)" in str(info.value)


def test_checkpoint_of_another_patch_size_or_depth() -> None:
    model = fv.VisionTransformer(**DIMS, num_classes=10)
    with pytest.raises(ValueError, match=r"proj.weight: model \(64, 3, 8, 8\), checkpoint \(64, 3, 16, 16\)"):
        fv.load_pretrained(model, fastmae.MAE(**{**MAE_DIMS, "patch_size": 16}).state_dict())
    with pytest.raises(ValueError, match=r"(?s)3 blocks\) than the model \(.*2 blocks\).*blocks 2..2 are not in the"):
        fv.load_pretrained(model, fastmae.MAE(**{**MAE_DIMS, "depth": 3}).state_dict())
    deeper = fv.VisionTransformer(**{**DIMS, "depth": 3}, num_classes=10)
    with pytest.raises(ValueError, match=r"lacks 12 of the model's keys.*blocks\.2\."):
        fv.load_pretrained(deeper, _mae().state_dict())


def test_missing_and_foreign_keys_are_named() -> None:
    state = _mae().state_dict()
    del state["blocks.1.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 of the model's keys.*\['blocks.1.attn.qkv.weight'\]"):
        fv.load_pretrained(fv.VisionTransformer(**DIMS), state)
    state = _mae().state_dict()
    state["dist_token"] = torch.zeros(1, 1, 64)
    with pytest.raises(ValueError, match=r"keys this ViT does not have.*dist_token"):
        fv.load_pretrained(fv.VisionTransformer(**DIMS), state)
    timm_avg = _timm_vit(True).state_dict()  # fc_norm, no norm: a global-pooling checkpoint into a cls-token model
    with pytest.raises(ValueError, match="build the model with global_pool=True"):
        fv.load_pretrained(fv.VisionTransformer(**DIMS, num_classes=10, global_pool=False), timm_avg)


def test_bad_sources(tmp_path) -> None:  # noqa: ANN001
    model = fv.VisionTransformer(**DIMS)
    with pytest.raises(TypeError, match="source must be a checkpoint path or a state dict, got int"):
        fv.load_pretrained(model, 3)
    with pytest.raises(ValueError, match="does not exist"):
        fv.load_pretrained(model, tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="a folder to read must be a fastmae run folder"):
        fv.load_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="not a state dict"):
        fv.load_pretrained(model, {"epoch": 3, "lr": 0.1})
    with pytest.raises(TypeError, match="model must be a fastmae.vit.VisionTransformer, got MaskedAutoencoderViT"):
        fv.load_pretrained(_mae(), {})
    path = tmp_path / "pickled.pth"
    torch.save({"model": _mae().state_dict(), "when": datetime.date(2024, 1, 1)}, path)
    with pytest.raises(ValueError, match="weights_only=True.*if you trust the file"):
        fv.load_pretrained(model, path)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*notes.txt' as a checkpoint"):
        fv.load_pretrained(model, tmp_path / "notes.txt")
