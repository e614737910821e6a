"""The masking strategies of ``fastmae.masking`` (random, block, grid), the decoder settings and their flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastmae.model
import fastmae.train.pretrain as pretrain_module
from fastmae import ops
from fastmae.cli import build_parser, main
from fastmae.data import demo_dataset
from fastmae.masking import (BlockDraws, block_mask, block_mask_reference, block_mask_vectorised, generator_seed,
                             grid_mask, mask_noise_for, min_block_patches)
from fastmae.model import mae_vit_tiny_patch16
from fastmae.train.checkpoint import checkpoint_path
from fastmae.train.config import PretrainConfig, SettingError
from fastmae.train.pretrain import new_model

SHAPES = [((14, 14), 49), ((8, 8), 16), ((14, 14), 98), ((5, 7), 10), ((2, 2), 1), ((4, 4), 15), ((3, 3), 0)]


def _kept(noise: torch.Tensor, len_keep: int) -> torch.Tensor:
    """``(N, L)`` bool: the patches the model keeps for ``noise``, from the model's own masking op."""
    _, _, mask = ops.random_masking(noise, len_keep)
    return mask == 0


def _in_full_2x2(removed: torch.Tensor, grid: tuple[int, int]) -> float:
    """The fraction of removed patches that lie in a fully removed 2x2 square of the patch grid."""
    r = removed.view(-1, 1, *grid).float()  # (N, 1, gh, gw)
    full = (F.avg_pool2d(r, 2, stride=1) == 1).float()  # (N, 1, gh-1, gw-1): 2x2 squares all removed
    covered = F.conv_transpose2d(full, torch.ones(1, 1, 2, 2)) > 0  # (N, 1, gh, gw): in such a square
    return float((covered & (r == 1)).sum() / r.sum())


# ------------------------------------------------------------------------------------------------------------ grid

def test_grid_keeps_the_top_left_patch_of_every_2x2_cell() -> None:
    noise = mask_noise_for("grid", 3, (4, 6), 6, seed=5, counter=9)  # (3, 24)
    kept = _kept(noise, 6).view(3, 4, 6)
    want = torch.zeros(4, 6, dtype=torch.bool)
    want[0::2, 0::2] = True
    assert torch.equal(kept, want.expand(3, -1, -1))
    ids_keep, _, _ = ops.random_masking(noise, 6)
    assert ids_keep.tolist() == [[0, 2, 4, 12, 14, 16]] * 3  # raster order: deterministic
    assert torch.equal(noise, mask_noise_for("grid", 3, (4, 6), 6, seed=0, counter=0))
    assert torch.equal(grid_mask(1, (4, 6))[0], ~want.view(-1))


@pytest.mark.parametrize("grid, len_keep, message", [
    ((3, 4), 3, "needs an even patch grid, got 3x4"), ((4, 4), 5, "keeps one patch in four, 4 of 16, got 5 kept")])
def test_grid_refuses_odd_grids_and_other_ratios(grid: tuple[int, int], len_keep: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mask_noise_for("grid", 2, grid, len_keep)


def test_the_config_refuses_grid_without_ratio_0_75_or_an_even_grid() -> None:
    PretrainConfig(model="mae_vit_tiny_patch16", img_size=64, mask_strategy="grid")  # 4x4, 4 kept: fine
    with pytest.raises(SettingError, match=r"mask_strategy grid .* needs mask_ratio 0.75 .* got 6 kept") as caught:
        PretrainConfig(model="mae_vit_tiny_patch16", img_size=64, mask_strategy="grid", mask_ratio=0.6)
    assert {"mask_strategy", "mask_ratio"} <= set(caught.value.keys)
    with pytest.raises(SettingError, match=r"even patch grid, got 3x3 patches .*img_size 48"):
        PretrainConfig(model="mae_vit_tiny_patch16", img_size=48, mask_strategy="grid")


# ----------------------------------------------------------------------------------------------------------- block

@pytest.mark.parametrize("grid, len_keep", SHAPES)
def test_block_reference_and_vectorised_are_bit_identical(grid: tuple[int, int], len_keep: int) -> None:
    num_patches = grid[0] * grid[1]
    for seed in range(3):
        reference = block_mask_reference(BlockDraws(8, num_patches, seed, 4), grid, len_keep)
        vectorised = block_mask_vectorised(BlockDraws(8, num_patches, seed, 4), grid, len_keep)
        assert torch.equal(reference, vectorised), (grid, len_keep, seed)
        assert (vectorised.sum(dim=1) == num_patches - len_keep).all()  # exactly L - K removed


def test_block_masks_are_rectangles_and_keep_exactly_len_keep() -> None:
    removed = block_mask(64, (14, 14), 49, seed=0, counter=0)  # (64, 196)
    assert (removed.sum(dim=1) == 147).all()
    noise = mask_noise_for("block", 64, (14, 14), 49, seed=0, counter=0)
    assert torch.equal(_kept(noise, 49), ~removed)  # the noise keeps exactly the unmasked patches
    assert sorted(noise[0].tolist()) == list(range(196))  # distinct ranks: no ties
    assert _in_full_2x2(removed, (14, 14)) > 0.95  # blocks: a random 75% masking gives about 0.75
    random_removed = ~_kept(mask_noise_for("random", 64, (14, 14), 49), 49)
    assert _in_full_2x2(random_removed, (14, 14)) < 0.8
    assert len({tuple(row.tolist()) for row in removed}) == 64  # every sample its own blocks
    assert min_block_patches((14, 14)) == 16 and min_block_patches((4, 4)) == 9 and min_block_patches((2, 2)) == 1


def test_block_masks_are_a_function_of_seed_and_counter() -> None:
    first = mask_noise_for("block", 4, (8, 8), 16, seed=3, counter=7)
    assert torch.equal(first, mask_noise_for("block", 4, (8, 8), 16, seed=3, counter=7))
    assert not torch.equal(first, mask_noise_for("block", 4, (8, 8), 16, seed=3, counter=8))
    assert not torch.equal(first, mask_noise_for("block", 4, (8, 8), 16, seed=4, counter=7))
    assert generator_seed(1, 23) != generator_seed(12, 3)


@pytest.mark.parametrize("strategy", ["random", "block", "grid"])
def test_ranks_get_their_rows_of_the_global_batch(strategy: str) -> None:
    world = 3
    whole = mask_noise_for(strategy, 4 * world, (8, 8), 16, seed=2, counter=5)  # (12, 64): one process
    for rank in range(world):
        mine = mask_noise_for(strategy, 4, (8, 8), 16, seed=2, counter=5, rank=rank, world_size=world)
        assert torch.equal(mine, whole[rank::world]), rank


def test_the_model_keeps_exactly_the_strategys_patches() -> None:
    torch.manual_seed(0)
    model = mae_vit_tiny_patch16(img_size=64)  # 4x4 patches
    imgs = torch.randn(2, 3, 64, 64)
    for strategy in ("block", "grid"):
        noise = mask_noise_for(strategy, 2, model.patch_embed.grid_size, 4, seed=1, counter=2)
        latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)
        assert latent.shape == (2, 1 + 4, 192)  # cls + the 4 kept tokens only
        assert torch.equal(mask == 0, _kept(noise, 4))


def test_bad_arguments_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"strategy must be one of \['random', 'block', 'grid'\], got 'diamond'"):
        mask_noise_for("diamond", 2, (4, 4), 4)
    with pytest.raises(ValueError, match=r"grid_size must be a pair \(gh, gw\) of positive ints, got 16"):
        mask_noise_for("block", 2, 16, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"len_keep must be an int in \[0, L=16\], got 17"):
        mask_noise_for("block", 2, (4, 4), 17)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world_size=2\), got 2"):
        mask_noise_for("random", 2, (4, 4), 4, rank=2, world_size=2)


# ------------------------------------------------------------------------------------------- decoder and the CLI

def test_decoder_settings_replace_the_presets_decoder() -> None:
    base = PretrainConfig(model="mae_vit_tiny_patch16", img_size=32)
    cfg = PretrainConfig(model="mae_vit_tiny_patch16", img_size=32, decoder_depth=1, decoder_embed_dim=64,
                         decoder_num_heads=2)
    default, changed = new_model(base).state_dict(), new_model(cfg).state_dict()
    assert "decoder_blocks.1.attn.qkv.weight" in default and "decoder_blocks.1.attn.qkv.weight" not in changed
    assert default["decoder_embed.weight"].shape == (128, 192) and changed["decoder_embed.weight"].shape == (64, 192)
    assert changed["decoder_pos_embed"].shape == (1, 5, 64) and new_model(cfg).decoder_blocks[0].attn.num_heads == 2
    encoder = {k: v.shape for k, v in default.items() if not k.startswith(("decoder", "mask_token"))}
    assert encoder == {k: v.shape for k, v in changed.items() if not k.startswith(("decoder", "mask_token"))}
    only_depth = new_model(PretrainConfig(model="mae_vit_tiny_patch16", img_size=32, decoder_depth=3))
    assert len(only_depth.decoder_blocks) == 3 and only_depth.decoder_embed.out_features == 128
    assert fastmae.model.mae_vit_base_patch16.__name__ == "mae_vit_base_patch16_dec512d8b"


@pytest.mark.parametrize("flags, message", [
    (["--decoder-depth", "0"], "--decoder-depth must be >= 1 (or unset for the preset's), got 0"),
    (["--decoder-embed-dim", "100", "--decoder-num-heads", "3"],
     "--decoder-embed-dim must be a multiple of --decoder-num-heads and of 4, got --decoder-embed-dim 100 and "
     "--decoder-num-heads 3 (mae_vit_tiny_patch16's unless given)"),
    (["--decoder-embed-dim", "130"],
     "--decoder-embed-dim must be a multiple of --decoder-num-heads and of 4, got --decoder-embed-dim 130 and "
     "--decoder-num-heads 4 (mae_vit_tiny_patch16's unless given)"),
    (["--mask-strategy", "grid", "--mask-ratio", "0.6", "--img-size", "64"],
     "--mask-strategy grid keeps the top-left patch of every 2x2 cell of the patch grid, so it needs --mask-ratio "
     "0.75 and an even grid (--img-size a multiple of 32): it keeps one patch in four, 4 of 16, got 6 kept "
     "(--mask-ratio 0.6, --img-size 64)"),
])
def test_bad_settings_exit_2_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch, flags: list[str], message: str) -> None:
    out = tmp_path / "run"
    monkeypatch.setattr("fastmae.train.pretrain.demo_dataset", lambda *_, **__: pytest.fail("the data was touched"))
    assert main(["pretrain", "--output", str(out), "--model", "mae_vit_tiny_patch16", *flags]) == 2
    assert capsys.readouterr().err == f"fastmae pretrain: {message}\n"
    assert not out.exists()


def test_flags_parse_choices_and_the_norm_pix_switch(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser(with_bench_flags=False)
    assert parser.parse_args(["pretrain"]).norm_pix_loss is None  # the preset default (paper: on, demo: off)
    assert parser.parse_args(["pretrain", "--norm-pix-loss"]).norm_pix_loss is True
    assert parser.parse_args(["pretrain", "--no-norm-pix-loss"]).norm_pix_loss is False
    args = parser.parse_args(["pretrain", "--mask-strategy", "block", "--decoder-depth", "4"])
    assert args.mask_strategy == "block" and args.decoder_depth == 4
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["pretrain", "--mask-strategy", "diamond"])
    assert caught.value.code == 2 and "invalid choice: 'diamond'" in capsys.readouterr().err
    assert PretrainConfig(data="x", norm_pix_loss=False).norm_pix_loss is False  # given beats the paper's True


@pytest.mark.slow  # a 2-step run: ~5 s alone, more on a busy machine
def test_pretrain_with_block_masks_and_a_smaller_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = demo_dataset(tmp_path / "cache", crops_per_photo=2, size=64)
    out = tmp_path / "run"
    embedded: list[torch.Tensor] = []  # the ids_keep the encoder embeds, each (B, K)
    drawn: list[tuple] = []  # (strategy, noise) of each step
    embed, draw = fastmae.model.ops.patch_embed_visible, pretrain_module.mask_noise

    def recording_embed(imgs: torch.Tensor, ids_keep: torch.Tensor, *args: object) -> torch.Tensor:
        embedded.append(ids_keep.clone())
        return embed(imgs, ids_keep, *args)

    def recording_draw(*args: object) -> torch.Tensor:
        drawn.append((args[8], draw(*args)))
        return drawn[-1][1]

    monkeypatch.setattr(fastmae.model.ops, "patch_embed_visible", recording_embed)
    monkeypatch.setattr(pretrain_module, "mask_noise", recording_draw)
    args = ["pretrain", "--data", str(data), "--output", str(out), "--steps", "2", "--model", "mae_vit_tiny_patch16",
            "--img-size", "64", "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--loader", "torch",
            "--no-progress", "--mask-strategy", "block", "--decoder-depth", "1", "--decoder-embed-dim", "64",
            "--decoder-num-heads", "2"]
    assert main(args) == 0
    assert [strategy for strategy, _ in drawn] == ["block", "block"]
    for step, ((_, noise), ids_keep) in enumerate(zip(drawn, embedded)):  # the first embeddings: the 2 steps'
        assert ids_keep.shape == (4, 4)  # 16 patches, 4 kept
        assert torch.equal(noise.argsort(dim=1)[:, :4], ids_keep)  # exactly the block masking's kept patches
        assert torch.equal(noise, mask_noise_for("block", 4, (4, 4), 4, seed=0, counter=step))
    saved = json.loads((out / "config.json").read_text())
    assert saved["mask_strategy"] == "block" and saved["decoder_depth"] == 1
    weights = torch.load(checkpoint_path(out / "checkpoints", 2), weights_only=True)["model"]
    assert weights["decoder_embed.weight"].shape == (64, 192) and "decoder_blocks.1.norm1.weight" not in weights


@pytest.mark.parametrize("strategy", ["random", "block", "grid"])
def test_heldout_images_are_scored_on_the_runs_mask_strategy(tmp_path: Path, strategy: str) -> None:
    """The held-out loss (and the figure drawn from it) uses masks of the run's strategy, fixed by ``MASK_SEED``;
    the random strategy keeps its torch-generator draw (the held-out numbers of random-mask runs are unchanged)."""
    from fastmae.data.images import list_images
    from fastmae.train.heldout import MASK_SEED, HeldOut

    files = list_images(demo_dataset(tmp_path / "cache", crops_per_photo=1, size=64))[:3]
    heldout = HeldOut(files, 64, (4, 4), 0.75, torch.device("cpu"), mask_strategy=strategy)
    if strategy == "random":
        expected = torch.rand(3, 16, generator=torch.Generator().manual_seed(MASK_SEED))
    else:
        expected = mask_noise_for(strategy, 3, (4, 4), 4, seed=MASK_SEED)
    assert torch.equal(heldout.noise, expected)
    if strategy == "grid":
        assert torch.equal(_kept(heldout.noise, 4), ~grid_mask(3, (4, 4)))
    model = mae_vit_tiny_patch16(img_size=64)
    assert torch.isfinite(torch.tensor(heldout.score(model))) and heldout.baseline > 0
