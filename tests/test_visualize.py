"""``fastmae visualize``: the Figure 2 panels for image files through any checkpoint; under the norm-pix loss the
patches are shown with the original's mean/std restored, and the figure says so; bad inputs exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastmae.model
from fastmae.cli import main
from fastmae.interop.checkpoints import MaeArch, read_checkpoint
from fastmae.interop.hf import export_hf
from fastmae.train.figure import reconstruct

NORM_PIX_SENTENCE = ("norm-pix loss: the model predicts each patch normalised; its mean and std are taken from the "
                     "original to display it.")
ASSUMED = "norm_pix_loss is not recorded in this checkpoint: taken as off"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two 80 x 96 photos-to-be (smooth colour ramps plus noise), in two folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    files = []
    for i, name in enumerate(("a/ramp.png", "b/ramp.jpg")):
        y, x = np.mgrid[0:80, 0:96]
        pixels = np.stack([x * 2.5, y * 3.0, np.full_like(x, 60 + 100 * i)], -1) + rng.normal(0, 8, (80, 96, 3))
        path = root / name
        path.parent.mkdir()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        files.append(path)
    return files


def _demo_run(root: Path, norm_pix_loss: bool) -> Path:
    """A fastmae run folder (config.json beside checkpoints/) of the demo preset at 32 px (16 patches)."""
    torch.manual_seed(0)
    model = fastmae.model.mae_vit_demo_patch8_dec128d2b(img_size=32, norm_pix_loss=norm_pix_loss)
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model": "mae_vit_demo_patch8_dec128d2b", "img_size": 32,
                                                  "norm_pix_loss": norm_pix_loss, "mask_ratio": 0.75}))
    torch.save({"model": model.state_dict(), "optimizer": {}, "step": 1}, root / "checkpoints" / "ckpt-00000001.pt")
    return root


def _png(path: Path) -> tuple[tuple[int, int], dict[str, str], np.ndarray]:
    with Image.open(path) as img:
        return img.size, dict(img.text), np.asarray(img.convert("RGB"))


def test_a_norm_pix_run_says_so_and_each_row_adds_its_height(tmp_path: Path, images: list[Path],
                                                             capsys: pytest.CaptureFixture) -> None:
    run = _demo_run(tmp_path / "run", norm_pix_loss=True)
    assert main(["visualize", str(run), str(images[0]), "--output", str(tmp_path / "one.png")]) == 0
    assert main(["visualize", str(run), *map(str, images), "--output", str(tmp_path / "two.png")]) == 0
    assert capsys.readouterr().out.endswith(f"wrote {tmp_path / 'two.png'} (2 image(s))\n")
    (w1, h1), _, _ = _png(tmp_path / "one.png")
    (w2, h2), text, _ = _png(tmp_path / "two.png")
    assert w1 == w2 == 760 and h2 - h1 == 215  # four 1.9-inch panels a row at 100 dpi; a row is 2.15 inches
    assert text["Title"] == "run: mae_vit_demo_patch8_dec128d2b, 32 px, mask 0.75, seed 0, norm-pix (see below)"
    assert NORM_PIX_SENTENCE in text["Description"] and ASSUMED not in text["Description"]
    assert "masked: 75% of the patches removed at random" in text["Description"]


def test_an_unrecorded_norm_pix_is_taken_as_off_and_the_figure_says_so(tmp_path: Path, images: list[Path]) -> None:
    torch.manual_seed(0)
    model = fastmae.model.mae_vit_demo_patch8_dec128d2b(img_size=32)
    torch.save({"model": model.state_dict()}, tmp_path / "official.pth")
    assert main(["visualize", str(tmp_path / "official.pth"), str(images[0]), "--output", str(tmp_path / "a.png")]) == 0
    _, text, _ = _png(tmp_path / "a.png")
    assert ASSUMED in text["Description"] and NORM_PIX_SENTENCE not in text["Description"]
    assert "norm-pix" not in text["Title"]
    assert main(["visualize", str(tmp_path / "official.pth"), str(images[0]), "--output", str(tmp_path / "b.png"),
                 "--norm-pix-loss"]) == 0
    _, text, _ = _png(tmp_path / "b.png")
    assert ASSUMED not in text["Description"] and NORM_PIX_SENTENCE in text["Description"]


def test_the_seed_fixes_the_masks(tmp_path: Path, images: list[Path]) -> None:
    run = _demo_run(tmp_path / "run", norm_pix_loss=False)
    figures = {}
    for name, seed in (("first", "3"), ("again", "3"), ("other", "4")):
        assert main(["visualize", str(run), str(images[1]), "--output", str(tmp_path / f"{name}.png"),
                     "--seed", seed]) == 0
        figures[name] = _png(tmp_path / f"{name}.png")[2]
    assert np.array_equal(figures["first"], figures["again"])
    assert not np.array_equal(figures["first"], figures["other"])


def test_norm_pix_predictions_are_shown_with_the_originals_patch_mean_and_std() -> None:
    torch.manual_seed(0)
    model = fastmae.model.mae_vit_demo_patch8_dec128d2b(img_size=32, norm_pix_loss=True)
    imgs = torch.rand(2, 3, 32, 32) * 0.8 - 0.4  # normalised pixels that stay inside [0, 1] once shown

    def perfect(imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor):  # noqa: ANN202
        """A model predicting every patch exactly, in normalised-patch units."""
        target = model.patchify(imgs)  # (N, L, P)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        mask = (noise > noise.median(dim=1, keepdim=True).values).float()  # (N, L)
        return torch.zeros(()), (target - mean) / (var + 1e-6) ** 0.5, mask

    model.forward = perfect  # the instance's forward: what reconstruct() calls
    panels = reconstruct(model, imgs, mask_ratio=0.5)
    assert (panels["reconstruction"] - panels["original"]).abs().max() <= 1e-5
    assert (panels["reconstruction + visible"] - panels["original"]).abs().max() <= 1e-5


def test_a_hugging_face_folder_is_visualized(tmp_path: Path, images: list[Path]) -> None:
    arch = MaeArch(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                   decoder_depth=1, decoder_num_heads=2)
    torch.manual_seed(0)
    state = {"model": arch.build().state_dict(), "mae": {**arch.to_dict(), "norm_pix_loss": True, "mask_ratio": 0.75}}
    torch.save(state, tmp_path / "custom.pth")
    export_hf(read_checkpoint(tmp_path / "custom.pth"), tmp_path / "hf", norm_pix_loss=True, mask_ratio=0.75)
    assert main(["visualize", str(tmp_path / "hf"), *map(str, images), "--output", str(tmp_path / "hf.png")]) == 0
    (width, _), text, _ = _png(tmp_path / "hf.png")
    assert width == 760 and text["Title"].startswith("hf: custom MAE, 32 px") and NORM_PIX_SENTENCE in text["Description"]


@pytest.mark.parametrize("flags, message", [
    (["--mask-ratio", "1.0"], "--mask-ratio must keep at least one of the 16 patches and remove at least one, got 1.0"),
    (["--mask-ratio", "0"], "--mask-ratio must keep at least one of the 16 patches and remove at least one, got 0.0"),
    (["--mask-ratio", "0.95"], "--mask-ratio must keep at least one of the 16 patches and remove at least one, got 0.95"),
    (["--img-size", "60"], "--img-size must be a multiple of the patch size 8, got 60"),
    (["--model", "mae_vit_tiny_patch16"], "the checkpoint does not fit mae_vit_tiny_patch16 (patch 16, width 192 x "
                                          "12 blocks, decoder width 128 x 2 blocks, 32 px): "),
])
def test_bad_settings_exit_2(tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture, flags: list[str],
                             message: str) -> None:
    run = _demo_run(tmp_path / "run", norm_pix_loss=False)
    assert main(["visualize", str(run), str(images[0]), "--output", str(tmp_path / "x.png"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastmae visualize: {message}") and err.count("\n") == 1 and not (tmp_path / "x.png").exists()


def test_bad_files_exit_2(tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture) -> None:
    run = _demo_run(tmp_path / "run", norm_pix_loss=False)
    (tmp_path / "broken.jpg").write_bytes(b"no jpeg")
    model = fastmae.model.mae_vit_demo_patch8_dec128d2b(img_size=32)
    encoder = {k: v for k, v in model.state_dict().items() if k != "mask_token" and not k.startswith("decoder_")}
    torch.save(encoder, tmp_path / "encoder.pth")
    for args, start in (
            ([str(run), str(tmp_path / "none.jpg")], f"no such image file: {tmp_path / 'none.jpg'}"),
            ([str(tmp_path / "none.pth"), str(images[0])], "no such checkpoint file or folder: "),
            ([str(run), str(tmp_path / "broken.jpg")], f"cannot decode image '{tmp_path / 'broken.jpg'}': "),
            ([str(tmp_path / "encoder.pth"), str(images[0])], "this checkpoint has no decoder"),
    ):
        assert main(["visualize", *args, "--output", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastmae visualize: {start}") and err.count("\n") == 1
    assert main(["visualize", str(run), str(images[0]), "--output", str(tmp_path / "x.jpg")]) == 2
    assert capsys.readouterr().err == f"fastmae visualize: --output must be a .png file, got '{tmp_path / 'x.jpg'}'\n"
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_a_real_pretraining_run_exports_and_visualizes(tmp_path: Path, images: list[Path],
                                                       capsys: pytest.CaptureFixture) -> None:
    from fastmae.data import demo_dataset

    data = demo_dataset(tmp_path / "cache", crops_per_photo=2, size=64)
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--output", str(run), "--steps", "1", "--model",
                 "mae_vit_tiny_patch16", "--img-size", "32", "--batch-size", "8", "--num-workers", "0",
                 "--device", "cpu", "--loader", "torch", "--no-progress", "--norm-pix-loss"]) == 0
    assert main(["visualize", str(run), str(images[0]), "--output", str(tmp_path / "run.png")]) == 0
    _, text, _ = _png(tmp_path / "run.png")
    assert text["Title"] == "run: mae_vit_tiny_patch16, 32 px, mask 0.75, seed 0, norm-pix (see below)"
    assert main(["export", str(run), "--to", "timm", "--output", str(tmp_path / "run.safetensors")]) == 0
    assert "timm.create_model('vit_tiny_patch16_224', " in capsys.readouterr().out
