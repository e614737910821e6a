"""The drop-in promise: official names, defaults, state-dict keys, parameter counts, initialisation."""

import math
from functools import partial

import pytest
import torch
import torch.nn as nn

import fastmae
from fastmae.pos_embed import interpolate_pos_embed
from mae_spec import spec_sincos_pos_embed

BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
              "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]


def official_shapes(d: int, depth: int, dd: int, ddepth: int, p: int, num_patches: int, c: int = 3) -> dict:
    """Key -> shape of the official MaskedAutoencoderViT state dict."""
    def block(prefix: str, w: int) -> dict:
        shapes = [(w,), (w,), (3 * w, w), (3 * w,), (w, w), (w,), (w,), (w,), (4 * w, w), (4 * w,), (w, 4 * w), (w,)]
        return {f"{prefix}.{k}": s for k, s in zip(BLOCK_KEYS, shapes)}

    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, num_patches + 1, d), "patch_embed.proj.weight": (d, c, p, p),
              "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,), "mask_token": (1, 1, dd),
              "decoder_pos_embed": (1, num_patches + 1, dd), "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,),
              "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,), "decoder_pred.weight": (p * p * c, dd),
              "decoder_pred.bias": (p * p * c,)}
    for i in range(depth):
        shapes.update(block(f"blocks.{i}", d))
    for i in range(ddepth):
        shapes.update(block(f"decoder_blocks.{i}", dd))
    return shapes


PAPER = {  # preset: (D, depth, heads, p, published total params in millions, without the sin-cos tables)
    "mae_vit_base_patch16": (768, 12, 12, 16, 111.7),
    "mae_vit_large_patch16": (1024, 24, 16, 16, 329.2),
    "mae_vit_huge_patch14": (1280, 32, 16, 14, 656.6),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_presets_keys_shapes_and_parameter_counts(name: str) -> None:
    d, depth, heads, p, total_m = PAPER[name]
    with torch.device("meta"):  # no real weights allocated
        model = getattr(fastmae, name)()
        long_name = getattr(fastmae, name.replace("patch16", "patch16_dec512d8b").replace("patch14", "patch14_dec512d8b"))()
    num_patches = (224 // p) ** 2
    want = official_shapes(d, depth, 512, 8, p, num_patches)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert {k: tuple(v.shape) for k, v in long_name.state_dict().items()} == want
    assert model.blocks[0].attn.num_heads == heads and model.decoder_blocks[0].attn.num_heads == 16
    # closed-form counts: block 12 w^2 + 13 w; patch embed p*p*3*D + D; cls D; norms 2w; decoder embed, mask, pred
    pdim = p * p * 3
    encoder = pdim * d + d + d + depth * (12 * d * d + 13 * d) + 2 * d
    decoder = d * 512 + 512 + 512 + 8 * (12 * 512 * 512 + 13 * 512) + 2 * 512 + 512 * pdim + pdim
    params = dict(model.named_parameters())
    enc_params = sum(v.numel() for k, v in params.items() if not k.startswith("decoder") and k != "mask_token")
    assert enc_params == encoder
    assert sum(v.numel() for v in params.values()) == encoder + decoder
    assert round((encoder + decoder) / 1e6, 1) == total_m
    assert "pos_embed" not in params and "decoder_pos_embed" not in params  # fixed tables are buffers


def test_norm_layer_defaults_quirk() -> None:
    plain = fastmae.MAE(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                        decoder_depth=1, decoder_num_heads=2)
    assert plain.blocks[0].norm1.eps == 1e-5 and plain.decoder_norm.eps == 1e-5  # official constructor default
    preset = fastmae.mae_vit_tiny_patch16(img_size=32)
    assert preset.blocks[0].norm1.eps == 1e-6 and preset.norm.eps == 1e-6
    assert fastmae.MaskedAutoencoderViT is fastmae.MAE
    assert fastmae.mae_vit_base_patch16 is fastmae.mae_vit_base_patch16_dec512d8b


def _small(**kw) -> fastmae.MAE:  # noqa: ANN003
    args = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                decoder_depth=2, decoder_num_heads=4, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    args.update(kw)
    return fastmae.MAE(**args)


def test_initialisation_is_the_official_one() -> None:
    torch.manual_seed(0)
    model = _small(img_size=(64, 96), embed_dim=128, decoder_embed_dim=64)
    assert torch.equal(model.pos_embed[0], spec_sincos_pos_embed(128, 4, 6))
    assert torch.equal(model.decoder_pos_embed[0], spec_sincos_pos_embed(64, 4, 6))
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            bound = math.sqrt(6.0 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound, name
            assert torch.all(m.bias == 0), name
        elif isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    w = model.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (w[0].numel() + w.shape[0]))  # xavier on the (D, C*p*p) view
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    bias = model.patch_embed.proj.bias  # the official code leaves Conv2d's default uniform(+-1/sqrt(fan_in))
    assert bias.abs().max() <= 1 / math.sqrt(w[0].numel()) and bias.abs().max() > 0
    for token in (model.cls_token, model.mask_token):
        assert 0.01 < token.std().item() < 0.03 and token.abs().max() > 0
    torch.manual_seed(0)
    again = _small(img_size=(64, 96), embed_dim=128, decoder_embed_dim=64)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_checkpoint_roundtrip_strict_and_pos_interpolation() -> None:
    source = _small(img_size=64)  # 4x4 grid
    target = _small(img_size=(48, 80))  # 3x5 grid
    result = target.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(target.pos_embed, interpolate_pos_embed(source.pos_embed, (3, 5)))
    assert torch.equal(target.decoder_pos_embed, interpolate_pos_embed(source.decoder_pos_embed, (3, 5)))
    assert torch.equal(target.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    # resizing a table to its own grid is the identity, and the cls row is kept
    assert interpolate_pos_embed(source.pos_embed, (4, 4)) is source.pos_embed
    assert torch.equal(target.pos_embed[:, 0], source.pos_embed[:, 0])
    # a non-square checkpoint (4x6 grid) into a model of the same aspect ratio (2x3 grid)
    wide, small = _small(img_size=(64, 96)), _small(img_size=(32, 48))
    small.load_state_dict(wide.state_dict())
    assert torch.equal(small.pos_embed, interpolate_pos_embed(wide.pos_embed, (2, 3), old_grid=(4, 6)))
    with pytest.raises(ValueError, match="neither a square nor the aspect ratio"):
        interpolate_pos_embed(torch.zeros(1, 1 + 15, 8), (4, 4))


def test_autocast_dtypes_follow_the_official_model() -> None:
    """Under bf16 autocast: pred in bf16 (a Linear's output), loss and mask in fp32, as the official code gives."""
    model, imgs = _small(), torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = model(imgs)
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32 and mask.dtype == torch.float32
    assert model(imgs.to(torch.float64).float())[0].dtype == torch.float32
    assert model.patch_embed.patch_size == (16, 16)  # timm's pair, as official code indexes it


def test_official_methods_and_shapes() -> None:
    model = _small(img_size=(64, 96))
    imgs = torch.randn(3, 3, 64, 96)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)
    patches = model.patchify(imgs)
    assert patches.shape == (3, 24, 768)
    assert torch.equal(patches[1, 7].reshape(16, 16, 3), imgs[1, :, 16:32, 16:32].permute(1, 2, 0))  # nhwpqc
    x_masked, mask, ids_restore = model.random_masking(torch.randn(3, 24, 64), 0.75)
    assert x_masked.shape == (3, 6, 64) and mask.shape == (3, 24) and ids_restore.shape == (3, 24)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.5)
    assert latent.shape == (3, 13, 64)
    pred = model.forward_decoder(latent, ids_restore)
    assert pred.shape == (3, 24, 768)
    loss = model.forward_loss(imgs, pred, mask)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # mask_ratio 0 keeps every patch: no removed patch, the official loss is 0/0 = NaN
    assert torch.isnan(model(imgs, mask_ratio=0.0)[0])


@pytest.mark.parametrize("bad,exc,match", [
    (lambda m: m(torch.randn(3, 64, 64)), ValueError, r"imgs must be \(N, C=3, H=64, W=64\)"),
    (lambda m: m(torch.randn(2, 1, 64, 64)), ValueError, "C=3 channels"),
    (lambda m: m(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)), TypeError, "floating-point"),
    (lambda m: m(torch.randn(2, 3, 65, 64)), ValueError, "divisible by the patch size 16"),
    (lambda m: m(torch.randn(2, 3, 96, 64)), ValueError, r"built for img_size \(H, W\) = \(64, 64\)"),
    (lambda m: m(torch.randn(2, 3, 64, 64), mask_ratio=1.5), ValueError, r"mask_ratio must be a number in \[0, 1\]"),
    (lambda m: m(torch.randn(2, 3, 64, 64), mask_ratio=-0.1), ValueError, "mask_ratio"),
    (lambda m: m(torch.randn(2, 3, 64, 64), noise=torch.rand(2, 15)), ValueError, r"noise must have shape \(N, L\) = \(2, 16\)"),
    (lambda m: m(torch.randn(2, 3, 64, 64), noise=torch.zeros(2, 16, dtype=torch.long)), TypeError, "noise must be a floating"),
    (lambda m: m(torch.randn(2, 3, 64, 64, device="meta")), ValueError, "imgs are on meta but the model is on cpu"),
    (lambda m: m([[1.0]]), TypeError, "imgs must be a torch.Tensor"),
    (lambda m: m(torch.randn(2, 3, 64, 64, dtype=torch.float64)), TypeError, "imgs are torch.float64 but the model"),
    (lambda m: m(torch.randn(0, 3, 64, 64)), ValueError, "empty batch"),
    (lambda m: m(torch.randn(2, 3, 64, 64), noise=torch.rand(2, 16, device="meta")), ValueError, "noise is on meta"),
    (lambda m: m.random_masking(torch.randn(2, 16, 8), 0.75, noise=torch.rand(2, 15)), ValueError, "noise must have shape"),
    (lambda m: m.random_masking(torch.randn(2, 16, 8), 1.5), ValueError, "mask_ratio must be a number"),
])
def test_bad_input_is_named(bad, exc, match) -> None:  # noqa: ANN001
    with pytest.raises(exc, match=match):
        bad(_small())


def test_bad_construction_is_named() -> None:
    with pytest.raises(ValueError, match=r"img_size \(60, 60\) must be divisible by patch_size 16"):
        _small(img_size=60)
    with pytest.raises(TypeError, match="img_size must be an int or a pair"):
        _small(img_size="224")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        _small(num_heads=5)


def _backend_sets() -> list:
    """``fastmae.use_backend`` contexts: the reference everywhere, the default choice, and fastmae._C's ops
    (their CPU implementations here) when it is built."""
    from fastmae.extension import extension_status

    loaded, detail = extension_status()
    cuda = pytest.mark.skipif(not loaded, reason=f"fastmae._C is not built here: {detail}")
    return [pytest.param("reference", id="reference"), pytest.param(None, id="default"),
            pytest.param("cuda", id="cuda", marks=cuda)]


@pytest.mark.parametrize("backend", _backend_sets())
def test_mask_ratio_one_keeps_no_patch_as_the_official_code(backend: str | None) -> None:
    """mask_ratio=1.0: the official code keeps int(L * 0) = 0 patches, runs the encoder on the cls token alone and
    its loss (over every patch) is finite. So does fastmae.MAE, on each backend set, with the spec's numbers."""
    import contextlib

    from mae_spec import spec_mae_forward

    torch.manual_seed(0)
    model = fastmae.mae_vit_tiny_patch16()
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 3, 224, 224, generator=g)
    noise = torch.rand(2, 196, generator=g)
    with fastmae.use_backend(backend) if backend else contextlib.nullcontext():
        latent, mask, _ = model.forward_encoder(imgs, 1.0, noise)
        loss, pred, mask = model(imgs, mask_ratio=1.0, noise=noise)
    assert latent.shape == (2, 1, 192)  # the cls token alone
    assert torch.isfinite(loss) and loss.shape == ()
    assert pred.shape == (2, 196, 16 * 16 * 3) and torch.equal(mask, torch.ones(2, 196))
    params = {k: v.detach() for k, v in model.state_dict().items()}
    attn = model.blocks[0].attn.num_heads, model.decoder_blocks[0].attn.num_heads
    want_loss, want_pred, _ = spec_mae_forward(params, imgs, noise, patch_size=16, num_heads=attn[0],
                                               decoder_num_heads=attn[1], mask_ratio=1.0,
                                               norm_pix_loss=model.norm_pix_loss, ln_eps=1e-6)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(pred, want_pred, rtol=1e-4, atol=1e-5)
