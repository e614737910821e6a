"""fastmae/flops.py against the closed form and against torch's own FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastmae
from fastmae.flops import mae_flops


def closed_form(d: int, depth: int, p: int, dd: int = 512, ddepth: int = 8, img: int = 224, ratio: float = 0.75) -> int:
    num_patches = (img // p) ** 2
    s, t, pdim = int(num_patches * (1 - ratio)) + 1, num_patches + 1, p * p * 3
    block = lambda w, n: 24 * n * w * w + 4 * n * n * w  # noqa: E731  qkv 6, proj 2, mlp 16; QK^T and AV 4
    return (2 * num_patches * pdim * d + depth * block(d, s) + 2 * s * d * dd + ddepth * block(dd, t)
            + 2 * t * dd * pdim)


@pytest.mark.parametrize("name,d,depth,p,gflops", [
    ("mae_vit_base_patch16", 768, 12, 16, 19.56),
    ("mae_vit_large_patch16", 1024, 24, 16, 41.51),  # the 41.5 GFLOP forward
    ("mae_vit_huge_patch14", 1280, 32, 14, 97.12),
])
def test_presets_against_closed_form(name: str, d: int, depth: int, p: int, gflops: float) -> None:
    with torch.device("meta"):
        model = getattr(fastmae, name)()
    flops = mae_flops(model, 0.75)
    assert flops.forward == closed_form(d, depth, p)
    assert round(flops.forward / 1e9, 2) == gflops
    assert flops.train_step == 3 * flops.forward


def test_matches_torch_flop_counter() -> None:
    """What the model executes (embedding only kept patches) = the count, less the skipped embeddings."""
    model = fastmae.MAE(img_size=(64, 96), patch_size=16, embed_dim=64, depth=2, num_heads=4,
                        decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)
    imgs = torch.randn(2, 3, 64, 96)
    with fastmae.use_backend("reference"), FlopCounterMode(display=False) as counter:  # attention as plain bmm
        model(imgs, mask_ratio=0.75)
    flops = mae_flops(model, 0.75)
    assert counter.get_total_flops() == 2 * (flops.forward - flops.patch_embed + flops.patch_embed_visible)


@pytest.mark.parametrize("name,gmacs", [
    ("vit_base_patch16", 17.56),  # the usual "17.6 GFLOPs" of ViT-B/16 at 224 px counts multiply-adds
    ("vit_large_patch16", 61.6),
    ("vit_huge_patch14", 167.3),
])
def test_classifier_presets(name: str, gmacs: float) -> None:
    from fastmae.flops import classifier_flops
    from fastmae.vit import VIT_PRESETS

    with torch.device("meta"):
        model = VIT_PRESETS[name](num_classes=1000)
    flops = classifier_flops(model)
    assert round(flops.forward / 2e9, 2 if gmacs < 20 else 1) == gmacs
    assert flops.train_step == 3 * flops.forward and flops.head == 2 * model.embed_dim * 1000


def test_classifier_matches_torch_flop_counter() -> None:
    """The classifier executes exactly the counted matmuls (every patch, the cls token, the head)."""
    from fastmae.flops import classifier_flops
    from fastmae.vit import VisionTransformer

    model = VisionTransformer(img_size=(64, 96), patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    with fastmae.use_backend("reference"), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 64, 96))
    assert counter.get_total_flops() == 2 * classifier_flops(model).forward
