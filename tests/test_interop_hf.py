"""``fastmae export --to hf`` / ``--from hf``: the Hugging Face ``ViTMAEForPreTraining`` folder has the same
dimensions and settings, the same loss, prediction and mask for the same ``noise``; ``ViTMAEModel`` loads its
encoder; the way back gives the same tensors bit for bit, loadable by ``MAE.load_state_dict(strict=True)``."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

import fastmae
import fastmae.vit
from fastmae.cli import main
from fastmae.interop.checkpoints import MaeArch, read_checkpoint
from fastmae.interop.hf import arch_from_hf_config, hf_config, to_hf_state_dict
from fastmae.model import MaskedAutoencoderViT

# small enough for a fast test, with every dimension distinct: image 32, patch 8 (16 patches), width 64,
# 2 encoder blocks of 4 heads, a 32-wide decoder of 2 blocks and 2 heads, MLP ratio 3, LayerNorm eps 1e-5
TINY = MaeArch(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=2,
               decoder_num_heads=2, mlp_ratio=3.0, norm_eps=1e-5)


def _source(tmp_path: Path, kind: str) -> tuple[Path, MaskedAutoencoderViT, bool, float]:
    """A checkpoint file, its model (eval mode), its norm_pix_loss and mask_ratio. ``custom``: the dimensions
    above, recorded in the file (as ``--from hf`` writes them); ``official``: the tiny preset at 32 px in an
    official training checkpoint whose ``args`` hold the settings."""
    torch.manual_seed(0)
    if kind == "custom":
        model = TINY.build(norm_pix_loss=True)
        record = {**TINY.to_dict(), "norm_pix_loss": True, "mask_ratio": 0.5}
        torch.save({"model": model.state_dict(), "mae": record}, tmp_path / "custom.pth")
        return tmp_path / "custom.pth", model.eval(), True, 0.5
    model = fastmae.mae_vit_tiny_patch16(img_size=32)
    args = argparse.Namespace(model="mae_vit_tiny_patch16", norm_pix_loss=False, mask_ratio=0.75)
    torch.save({"model": model.state_dict(), "args": args, "epoch": 0}, tmp_path / "official.pth")
    return tmp_path / "official.pth", model.eval(), False, 0.75


@pytest.mark.parametrize("kind", ["custom", "official"])
def test_the_hf_model_gives_the_same_loss_pred_and_mask(tmp_path: Path, kind: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    source, model, norm_pix, mask_ratio = _source(tmp_path, kind)
    out = tmp_path / "hf"
    assert main(["export", str(source), "--to", "hf", "--output", str(out)]) == 0
    assert f"ViTMAEForPreTraining.from_pretrained('{out}')" in capsys.readouterr().out
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}

    config = json.loads((out / "config.json").read_text())
    p, d, dd = model.patch_embed.patch_size[0], model.cls_token.shape[-1], model.mask_token.shape[-1]
    assert {k: config[k] for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers",
                                   "num_attention_heads", "intermediate_size", "decoder_hidden_size",
                                   "decoder_num_hidden_layers", "decoder_num_attention_heads",
                                   "decoder_intermediate_size", "layer_norm_eps", "norm_pix_loss", "mask_ratio",
                                   "hidden_act", "qkv_bias")} == {
        "image_size": 32, "patch_size": p, "hidden_size": d, "num_hidden_layers": len(model.blocks),
        "num_attention_heads": model.blocks[0].attn.num_heads, "intermediate_size": model.blocks[0].mlp.fc1.out_features,
        "decoder_hidden_size": dd, "decoder_num_hidden_layers": len(model.decoder_blocks),
        "decoder_num_attention_heads": model.decoder_blocks[0].attn.num_heads,
        "decoder_intermediate_size": model.decoder_blocks[0].mlp.fc1.out_features, "layer_norm_eps": model.norm.eps,
        "norm_pix_loss": norm_pix, "mask_ratio": mask_ratio, "hidden_act": "gelu", "qkv_bias": True}

    hf, info = ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())  # nothing missing, unexpected or mismatched
    torch.manual_seed(1)
    imgs = torch.randn(3, 3, 32, 32) * 2 + 0.5  # pixel scales where norm_pix matters
    noise = torch.rand(3, model.patch_embed.num_patches)
    with torch.no_grad():
        theirs = hf.eval()(pixel_values=imgs, noise=noise)
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    # the same masking semantic: argsort of the noise, the int(L * (1 - mask_ratio)) smallest kept
    assert torch.equal(theirs.mask, mask)
    assert int((mask == 0).sum(1)[0]) == int(model.patch_embed.num_patches * (1 - mask_ratio))
    assert (theirs.logits - pred).abs().max() <= 1e-5
    assert abs(float(theirs.loss) - float(loss)) <= 1e-5

    encoder, info = ViTMAEModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        latent, _, _ = model.forward_encoder(imgs, mask_ratio, noise=noise)  # (3, 1+K, D)
        hidden = encoder.eval()(pixel_values=imgs, noise=noise).last_hidden_state
    assert hidden.shape == latent.shape and (hidden - latent).abs().max() <= 1e-5


@pytest.mark.parametrize("weights_file", [False, True])
def test_fastmae_to_hf_and_back_is_bit_identical(tmp_path: Path, weights_file: bool,
                                                 capsys: pytest.CaptureFixture) -> None:
    source, model, _, _ = _source(tmp_path, "custom")
    assert main(["export", str(source), "--to", "hf", "--output", str(tmp_path / "hf")]) == 0
    hf_source = tmp_path / "hf" / "model.safetensors" if weights_file else tmp_path / "hf"
    back = tmp_path / "back.pth"
    assert main(["export", str(hf_source), "--from", "hf", "--output", str(back)]) == 0
    assert "load_mae(" in capsys.readouterr().out

    saved = torch.load(back, weights_only=True)
    assert saved["mae"] == {**TINY.to_dict(), "norm_pix_loss": True, "mask_ratio": 0.5}
    rebuilt = MaeArch.from_dict({k: v for k, v in saved["mae"].items() if k not in ("norm_pix_loss", "mask_ratio")})
    fresh = rebuilt.build(norm_pix_loss=True)
    fresh.load_state_dict(saved["model"], strict=True)
    original = model.state_dict()
    assert saved["model"].keys() == original.keys()
    for key, value in original.items():
        assert saved["model"][key].dtype == value.dtype and torch.equal(saved["model"][key], value), key
    again = read_checkpoint(back)
    assert (again.arch, again.norm_pix_loss, again.mask_ratio) == (TINY, True, 0.5)


def test_a_preset_comes_back_as_the_preset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source, model, _, _ = _source(tmp_path, "official")
    assert main(["export", str(source), "--to", "hf", "--output", str(tmp_path / "hf")]) == 0
    assert main(["export", str(tmp_path / "hf"), "--from", "hf", "--output", str(tmp_path / "back.pth")]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("or: import torch, fastmae.model; model = fastmae.model.mae_vit_tiny_patch16(img_size=32, "
                            f"norm_pix_loss=False); model.load_state_dict(torch.load('{tmp_path / 'back.pth'}')"
                            "['model'])\n")
    preset = fastmae.mae_vit_tiny_patch16(img_size=32)
    preset.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True)["model"], strict=True)
    assert all(torch.equal(preset.state_dict()[k], v) for k, v in model.state_dict().items())
    (tmp_path / "file").write_text("")
    assert main(["export", str(source), "--to", "hf", "--output", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == (f"fastmae export: --output must be a folder for a Hugging Face model, got the "
                                       f"file '{tmp_path / 'file'}'\n")
    loaded = read_checkpoint(tmp_path / "hf")
    assert loaded.arch.preset == "mae_vit_tiny_patch16" and loaded.source.startswith("Hugging Face ViTMAE")
    with pytest.raises(ValueError, match=r"^--model mae_vit_small_patch16 is mae_vit_small_patch16 \(patch 16, width "
                                         r"384 x 12 blocks, .*, but Hugging Face ViTMAE .* is mae_vit_tiny_patch16 "):
        read_checkpoint(tmp_path / "hf", model="mae_vit_small_patch16")
    vit = fastmae.vit.vit_tiny_patch16(img_size=32, num_classes=0, global_pool=False)
    result = fastmae.vit.load_pretrained(vit, tmp_path / "back.pth")
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert sorted(result.dropped_keys) == sorted(k for k in model.state_dict() if k == "mask_token" or k.startswith("decoder_"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in vit.state_dict().items())


def _hub_4x_name(key: str) -> str:
    """A transformers 5 ViTMAE key as transformers 4.x (and the Hub's facebook/vit-mae-* folders) name it."""
    key = re.sub(r"^vit\.layers\.", "vit.encoder.layer.", key)
    for new, old in (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                     ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
                     ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
        key = key.replace(new, old)
    return key


def test_a_folder_in_the_hubs_4x_layout_reads_the_same(tmp_path: Path) -> None:
    source, model, _, _ = _source(tmp_path, "custom")
    folder = tmp_path / "hub"
    folder.mkdir()
    hf_state = to_hf_state_dict(model.state_dict())
    save_file({_hub_4x_name(k): v.contiguous() for k, v in hf_state.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    hf_config(TINY, norm_pix_loss=True, mask_ratio=0.5).save_pretrained(folder)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in load_file(folder / "model.safetensors")
    loaded = read_checkpoint(folder)
    assert loaded.state_dict.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in model.state_dict().items())


def test_a_vitmae_model_folder_reads_as_an_encoder_only_checkpoint(tmp_path: Path) -> None:
    source, model, _, _ = _source(tmp_path, "official")
    assert main(["export", str(source), "--to", "hf", "--output", str(tmp_path / "hf")]) == 0
    ViTMAEModel.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "encoder")
    loaded = read_checkpoint(tmp_path / "encoder")
    assert not loaded.arch.has_decoder and loaded.arch.preset == "mae_vit_tiny_patch16"
    encoder = {k: v for k, v in model.state_dict().items() if k != "mask_token" and not k.startswith("decoder_")}
    assert loaded.state_dict.keys() == encoder.keys()
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in encoder.items())


def test_what_fastmae_cannot_express_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = ViTMAEConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=256,
                          image_size=32, patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=4, decoder_intermediate_size=64, hidden_act="gelu_new")
    with pytest.raises(ValueError, match=r"^this Hugging Face ViTMAE config has no fastmae MAE: hidden_act must be "
                                         r"gelu \(the exact GELU\), got 'gelu_new'; decoder_intermediate_size / "
                                         r"decoder_hidden_size must equal intermediate_size / hidden_size"):
        arch_from_hf_config(config)
    ViTMAEForPreTraining(config).save_pretrained(tmp_path / "odd")
    capsys.readouterr()  # transformers' progress bar
    assert main(["export", str(tmp_path / "odd"), "--from", "hf", "--output", str(tmp_path / "x.pth")]) == 2
    assert capsys.readouterr().err.startswith("fastmae export: this Hugging Face ViTMAE config has no fastmae MAE")

    source, _, _, _ = _source(tmp_path, "custom")
    assert main(["export", str(source), "--from", "hf", "--output", str(tmp_path / "x.pth")]) == 2
    assert capsys.readouterr().err == (f"fastmae export: --from hf reads a Hugging Face ViTMAE folder (config.json "
                                       f"with model_type vit_mae) or a weights file in one, got '{source}'\n")
    assert main(["export", str(tmp_path / "nothing"), "--from", "hf", "--output", str(tmp_path / "x.pth")]) == 2
    assert capsys.readouterr().err.startswith("fastmae export: no such Hugging Face folder or file")
    assert not (tmp_path / "x.pth").exists()
