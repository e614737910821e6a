"""Reading any MAE checkpoint (fastmae runs, FSDP folders, official files, plain state dicts) and ``fastmae export
--to timm``: the printed ``timm.create_model`` call loads the file strictly, and its ``forward_features`` equals
``MAE.forward_encoder`` with nothing masked, every token; bad inputs exit 2 with one line saying why."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

import fastmae
import fastmae.vit
from fastmae.cli import main
from fastmae.interop.checkpoints import MaeArch, preset_archs, read_checkpoint
from fastmae.interop.timm_export import timm_name, timm_names
from fastmae.model import MaskedAutoencoderViT


def _mae(factory_name: str, img_size: int, seed: int = 0) -> MaskedAutoencoderViT:
    torch.manual_seed(seed)
    return getattr(fastmae.model, factory_name)(img_size=img_size).eval()


def _run_folder(root: Path, model: MaskedAutoencoderViT, config: dict) -> Path:
    """The layout `fastmae pretrain` writes: config.json beside checkpoints/ckpt-<step>.pt."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    for step in (1, 2):  # the newest is read
        torch.save({"model": model.state_dict() if step == 2 else {}, "optimizer": {}, "step": step},
                   root / "checkpoints" / f"ckpt-{step:08d}.pt")
    return root


def _features_close(timm_model: torch.nn.Module, mae: MaskedAutoencoderViT, img_size: int) -> float:
    """Max |timm forward_features - MAE.forward_encoder(mask_ratio 0, noise arange)| over every token."""
    torch.manual_seed(1)
    imgs = torch.randn(2, 3, img_size, img_size)
    noise = torch.arange(mae.patch_embed.num_patches, dtype=torch.float32).expand(2, -1).contiguous()  # keeps all, in order
    with torch.no_grad():
        ours, mask, _ = mae.forward_encoder(imgs, 0.0, noise=noise)  # (2, 1+L, D)
        theirs = timm_model.eval().forward_features(imgs)  # (2, 1+L, D)
    assert mask.sum() == 0 and ours.shape == theirs.shape == (2, 1 + mae.patch_embed.num_patches, ours.shape[-1])
    return float((ours - theirs).abs().max())


def _printed_model(stdout: str) -> torch.nn.Module:
    """Build the model with the `timm.create_model(...)` call the command printed."""
    call = stdout.split("model = ", 1)[1].strip()
    assert call.startswith("timm.create_model(")
    return eval(call, {"timm": timm})  # noqa: S307 - the command's own output


def test_the_printed_timm_call_loads_strictly_and_gives_the_encoders_features(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    mae = _mae("mae_vit_tiny_patch16", 224)
    source = tmp_path / "official.pth"
    torch.save({"model": mae.state_dict()}, source)  # the official layout
    out = tmp_path / "tiny.safetensors"
    assert main(["export", str(source), "--to", "timm", "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "timm's vit_tiny_patch16_224" in stdout

    strict_flags = []
    original = torch.nn.Module.load_state_dict

    def spy(self: torch.nn.Module, state_dict: dict, strict: bool = True, assign: bool = False):  # noqa: ANN202
        strict_flags.append(strict)
        return original(self, state_dict, strict=strict, assign=assign)

    monkeypatch.setattr(timm.models.vision_transformer.VisionTransformer, "load_state_dict", spy, raising=False)
    model = _printed_model(stdout)
    assert strict_flags == [True]  # the overlay's num_classes=0 keeps timm's loader strict
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert _features_close(model, mae, 224) <= 1e-5

    written = load_file(out)
    encoder = {k: v for k, v in mae.state_dict().items() if k != "mask_token" and not k.startswith("decoder_")}
    assert written.keys() == encoder.keys() and all(torch.equal(written[k], v) for k, v in encoder.items())
    vit = fastmae.vit.vit_tiny_patch16(num_classes=0, global_pool=False)  # fastmae's own ViT reads the file too
    result = fastmae.vit.load_pretrained(vit, out)
    assert (result.missing_keys, result.unexpected_keys, result.dropped_keys) == ([], [], [])
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in encoder.items())
    # the plain overlay (file only) also loads it: timm then drops the classifier keys and loads non-strictly,
    # and every weight arrives
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              num_classes=0)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_run_trained_at_another_size_exports_with_its_img_size(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    mae = _mae("mae_vit_tiny_patch16", 32)
    run = _run_folder(tmp_path / "run", mae, {"model": "mae_vit_tiny_patch16_dec128d2b", "norm_pix_loss": True,
                                              "mask_ratio": 0.75, "img_size": 32})
    loaded = read_checkpoint(run)
    assert (loaded.arch.preset, loaded.arch.img_size, loaded.norm_pix_loss) == ("mae_vit_tiny_patch16", 32, True)
    assert "ckpt-00000002.pt (step 2)" in loaded.source
    out = tmp_path / "tiny.pth"  # torch.save instead of safetensors
    assert main(["export", str(run), "--to", "timm", "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "img_size=32" in stdout and "trained at 32 px" in stdout
    assert _features_close(_printed_model(stdout), mae, 32) <= 1e-5
    assert torch.load(out, weights_only=True).keys() == {k for k in mae.state_dict() if k != "mask_token"
                                                         and not k.startswith("decoder_")}


def test_every_official_encoder_has_a_timm_name_and_the_demo_none(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    assert timm_names() == {"mae_vit_tiny_patch16": "vit_tiny_patch16_224", "mae_vit_small_patch16":
                            "vit_small_patch16_224", "mae_vit_base_patch16": "vit_base_patch16_224",
                            "mae_vit_large_patch16": "vit_large_patch16_224", "mae_vit_huge_patch14":
                            "vit_huge_patch14_224"}
    for name in timm_names().values():
        assert name in timm.list_models(name)
    hub_eps = dataclasses.replace(preset_archs()["mae_vit_base_patch16"], norm_eps=1e-12, preset=None)
    assert timm_name(hub_eps) == "vit_base_patch16_224"  # the Hub's ViTMAE configs say 1e-12: a note, not a refusal
    demo = _mae("mae_vit_demo_patch8_dec128d2b", 64)
    source = tmp_path / "demo.pth"
    torch.save(demo.state_dict(), source)
    assert main(["export", str(source), "--to", "timm", "--output", str(tmp_path / "demo.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmae export: timm has no ViT with this encoder (mae_vit_demo_patch8_dec128d2b")
    assert "mae_vit_huge_patch14 (patch 14, width 1280 x 32) -> vit_huge_patch14_224" in err
    assert "--to hf takes any dimensions" in err and not (tmp_path / "demo.safetensors").exists()


def test_an_encoder_only_checkpoint_exports_to_timm_but_not_to_hf(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    mae = _mae("mae_vit_tiny_patch16", 32)
    encoder = {k: v for k, v in mae.state_dict().items() if k != "mask_token" and not k.startswith("decoder_")}
    source = tmp_path / "mae_pretrain_vit_tiny.pth"  # as the released encoder-only files
    torch.save({"model": encoder}, source)
    assert main(["export", str(source), "--to", "timm", "--output", str(tmp_path / "enc.safetensors")]) == 0
    assert _features_close(_printed_model(capsys.readouterr().out), mae, 32) <= 1e-5
    assert main(["export", str(source), "--to", "hf", "--output", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (
        "fastmae export: a Hugging Face ViTMAEForPreTraining needs the decoder; this checkpoint has none "
        "(mae_vit_tiny_patch16 (patch 16, width 192 x 12 blocks, no decoder, 32 px)): export its encoder with "
        "--to timm\n")
    assert not (tmp_path / "hf").exists()


def test_official_args_ddp_prefixes_and_fsdp_folders_are_read(tmp_path: Path) -> None:
    mae = _mae("mae_vit_tiny_patch16", 32)
    args = argparse.Namespace(model="mae_vit_tiny_patch16", norm_pix_loss=True, mask_ratio=0.6, input_size=32)
    torch.save({"model": mae.state_dict(), "optimizer": {}, "epoch": 7, "args": args}, tmp_path / "checkpoint-7.pth")
    official = read_checkpoint(tmp_path / "checkpoint-7.pth")
    assert (official.arch.preset, official.norm_pix_loss, official.mask_ratio) == ("mae_vit_tiny_patch16", True, 0.6)
    assert official.source.endswith("(epoch 7)")

    torch.save({f"module.{k}": v for k, v in mae.state_dict().items()}, tmp_path / "ddp.pth")
    plain = read_checkpoint(tmp_path / "ddp.pth")
    assert plain.norm_pix_loss is None and plain.arch.preset == "mae_vit_tiny_patch16"
    assert all(torch.equal(plain.state_dict[k], v) for k, v in mae.state_dict().items())

    folder = tmp_path / "run" / "checkpoints" / "ckpt-00000005"  # FSDP's layout, saved here by one process
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": mae.state_dict(), "optimizer": {"state": {}}}, checkpoint_id=folder)
    (folder / "COMMITTED").write_text("{}")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "mae_vit_tiny_patch16",
                                                              "norm_pix_loss": False, "mask_ratio": 0.75}))
    sharded = read_checkpoint(tmp_path / "run")
    assert sharded.source.startswith("fastmae FSDP checkpoint") and sharded.norm_pix_loss is False
    assert all(torch.equal(sharded.state_dict[k], v) for k, v in mae.state_dict().items())
    assert sharded.model().state_dict().keys() == mae.state_dict().keys()


def test_the_model_flag_names_an_architecture_the_shapes_cannot(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    arch = MaeArch(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                   decoder_depth=1, decoder_num_heads=4)
    torch.save(arch.build().state_dict(), tmp_path / "custom.pth")
    assert main(["export", str(tmp_path / "custom.pth"), "--to", "timm", "--output", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmae export: the checkpoint's architecture (patch 8, width 64 x 2 blocks, MLP 256, "
                          "decoder width 32 x 1 blocks) matches no preset, and it does not record its model: pass "
                          "--model with one of the presets (mae_vit_tiny_patch16: patch 16, width 192 x 12")
    tiny = tmp_path / "tiny.pth"
    torch.save(_mae("mae_vit_tiny_patch16", 32).state_dict(), tiny)
    assert main(["export", str(tiny), "--to", "timm", "--output", str(tmp_path / "x.pth"),
                 "--model", "mae_vit_small_patch16"]) == 2
    assert capsys.readouterr().err.startswith(
        "fastmae export: the checkpoint does not fit mae_vit_small_patch16 (patch 16, width 384 x 12 blocks, decoder "
        "width 256 x 4 blocks, 32 px): cls_token is (1, 1, 192), expected (1, 1, 384)")
    assert main(["export", str(tiny), "--to", "timm", "--output", str(tmp_path / "x.pth"), "--model", "vit_b"]) == 2
    assert capsys.readouterr().err.startswith("fastmae export: --model must be a fastmae preset (mae_vit_tiny_patch16, ")


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.pth", "fastmae export: no such checkpoint file or folder: '{d}/missing.pth'\n"),
    (lambda d: (d / "junk.pth").write_bytes(b"not a checkpoint") and d / "junk.pth",
     "fastmae export: cannot read '{d}/junk.pth' as a checkpoint (torch.load with weights_only=True): "),
    (lambda d: torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, d / "cnn.pth") or d / "cnn.pth",
     "fastmae export: not an MAE checkpoint: expected the official MAE keys (patch_embed.proj.weight, pos_embed, "
     "cls_token, blocks.0.attn.qkv.weight, ...), missing patch_embed.proj.weight, pos_embed, cls_token, "
     "blocks.0.attn.qkv.weight; its keys start conv1.weight\n"),
    (lambda d: torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), d / "vit.pth") or d / "vit.pth",
     "fastmae export: the checkpoint does not fit mae_vit_tiny_patch16 (patch 16, width 192 x 12 blocks, no "
     "decoder, 224 px): unexpected head.weight; unexpected head.bias\n"),
    (lambda d: d, "fastmae export: a folder to read must be a fastmae run folder (with checkpoints/), "),
    (lambda d: torch.save({"model": [1, 2]}, d / "list.pth") or d / "list.pth",
     "fastmae export: '{d}/list.pth' is no MAE checkpoint: expected a state dict or {{'model': state_dict}}, got dict"),
])
def test_bad_sources_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, make, message: str) -> None:  # noqa: ANN001
    source = make(tmp_path)
    assert main(["export", str(source), "--to", "timm", "--output", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(d=tmp_path)) and err.count("\n") == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_flags_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for flags, message in ((["--to", "onnx"], "argument --to: invalid choice: 'onnx'"),
                           ([], "one of the arguments --to --from is required"),
                           (["--to", "timm", "--from", "hf"], "argument --from: not allowed with argument --to")):
        with pytest.raises(SystemExit) as caught:
            main(["export", str(tmp_path / "x.pth"), "--output", str(tmp_path / "y"), *flags])
        assert caught.value.code == 2 and message in capsys.readouterr().err
    torch.save(_mae("mae_vit_tiny_patch16", 32).state_dict(), tmp_path / "tiny.pth")
    assert main(["export", str(tmp_path / "tiny.pth"), "--to", "timm", "--output", str(tmp_path / "tiny.npz")]) == 2
    assert capsys.readouterr().err.startswith("fastmae export: --output must end in .safetensors, .pth, .pt, .bin")
