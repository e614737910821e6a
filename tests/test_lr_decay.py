"""Layer-wise lr decay groups against a re-implementation of the official ``util/lr_decay.param_groups_lrd`` on
ViT-B/L/H (built on the meta device: no memory, no init), the per-size decay of the recipe, and the lr each
group gets."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fastmae.finetune.classifier import freeze
from fastmae.finetune.config import FinetuneConfig
from fastmae.finetune.lr_decay import apply_lr, layer_id, param_groups_lrd
from fastmae.vit import VIT_PRESETS


def official_param_groups_lrd(model: nn.Module, weight_decay: float, no_weight_decay_list: set[str],
                              layer_decay: float) -> dict[str, dict]:
    """The official grouping, restated: group name -> lr_scale, weight_decay and parameter names in order."""
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or n in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.0
        else:
            g_decay, this_decay = "decay", weight_decay
        if n in ("cls_token", "pos_embed") or n.startswith("patch_embed"):
            lid = 0
        elif n.startswith("blocks"):
            lid = int(n.split(".")[1]) + 1
        else:
            lid = num_layers
        name = f"layer_{lid}_{g_decay}"
        if name not in groups:
            groups[name] = {"lr_scale": layer_scales[lid], "weight_decay": this_decay, "params": []}
        groups[name]["params"].append(n)
    return groups


def ours(model: nn.Module, weight_decay: float, layer_decay: float) -> dict[str, dict]:
    groups = param_groups_lrd(model, weight_decay, model.no_weight_decay(), layer_decay)
    named = {id(p): n for n, p in model.named_parameters()}
    for group in groups:  # the names recorded are those of the parameters held
        assert group["param_names"] == [named[id(p)] for p in group["params"]]
    return {g["name"]: {"lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"], "params": g["param_names"]}
            for g in groups}


def meta_vit(name: str, **kwargs: object) -> nn.Module:
    with torch.device("meta"):
        return VIT_PRESETS[name](**kwargs)


@pytest.mark.parametrize("name, depth, layer_decay", [("vit_base_patch16", 12, 0.65), ("vit_large_patch16", 24, 0.75),
                                                      ("vit_huge_patch14", 32, 0.75)])
@pytest.mark.parametrize("global_pool", [True, False])
def test_groups_equal_the_official_ones(name: str, depth: int, layer_decay: float, global_pool: bool) -> None:
    model = meta_vit(name, global_pool=global_pool)
    expected = official_param_groups_lrd(model, 0.05, model.no_weight_decay(), layer_decay)
    got = ours(model, 0.05, layer_decay)
    assert list(got) == list(expected) and got == expected  # same groups, same order, same members
    assert len(got) == 2 * (depth + 2)  # each layer: decayed matrices and undecayed vectors/tokens
    head = got[f"layer_{depth + 1}_decay"]
    assert head["params"] == ["head.weight"] and head["lr_scale"] == 1
    assert got["layer_0_no_decay"]["params"][:2] == ["cls_token", "pos_embed"]
    assert got["layer_0_decay"]["lr_scale"] == layer_decay ** (depth + 1)
    assert got[f"layer_{depth}_decay"]["lr_scale"] == layer_decay  # the last block


@pytest.mark.parametrize("trainable_blocks", [0, 3])
def test_frozen_parameters_get_no_group(trainable_blocks: int) -> None:
    model = meta_vit("vit_base_patch16")
    freeze(model, linprobe=False, trainable_blocks=trainable_blocks)
    expected = official_param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.65)
    got = ours(model, 0.05, 0.65)
    assert got == expected
    names = [n for g in got.values() for n in g["params"]]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert {layer_id(n, 12) for n in names} == {*range(13 - trainable_blocks, 13), 13}


def test_recipe_layer_decay_per_size() -> None:
    # FINETUNE.md: --layer_decay 0.65 for ViT-B, 0.75 for ViT-L and ViT-H (issue 17 had them swapped)
    assert {m: FinetuneConfig(data=".", model=m).layer_decay
            for m in ("vit_base_patch16", "vit_large_patch16", "vit_huge_patch14")} == {
        "vit_base_patch16": 0.65, "vit_large_patch16": 0.75, "vit_huge_patch14": 0.75}


def test_each_group_gets_the_lr_times_its_scale() -> None:
    model = VIT_PRESETS["vit_demo_patch8"](img_size=32, num_classes=3)
    optimizer = torch.optim.AdamW(param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.5), lr=1.0)
    apply_lr(optimizer, 0.1)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1 * g["lr_scale"] for g in optimizer.param_groups]
    assert sorted({g["lr_scale"] for g in optimizer.param_groups}) == [0.5 ** k for k in range(5, -1, -1)]
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\], got 1.5"):
        param_groups_lrd(model, 0.05, set(), 1.5)
