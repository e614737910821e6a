"""The epoch plan shared by both loader backends: order, shards, crop boxes, flips."""

import math

import numpy as np
import pytest
import torch
from torchvision import transforms

from fastmae.data.sampling import EpochPlan, epoch_permutation, random_resized_crops, uniforms

SIZE = (500, 375)  # ImageNet-like width, height


def _plan(num_images: int = 20_000, **kw) -> EpochPlan:
    return EpochPlan(np.tile(SIZE, (num_images, 1)), batch_size=kw.pop("batch_size", 20_000), **kw)


def test_crop_area_and_ratio_follow_random_resized_crop() -> None:
    p = _plan().batch(epoch=0, index=0)
    area = p.boxes[:, 2] * p.boxes[:, 3] / (SIZE[0] * SIZE[1])  # (n,) fraction of the image
    assert area.min() >= 0.2 - 0.01 and area.max() <= 1.0  # scale (0.2, 1.0), up to rounding of w and h
    assert area.min() < 0.21 and area.max() > 0.97  # both ends are reached
    ratio = p.boxes[:, 2] / p.boxes[:, 3]
    assert ratio.min() >= 3 / 4 - 0.02 and ratio.max() <= 4 / 3 + 0.02
    assert (p.boxes[:, :2] >= 0).all() and (p.boxes[:, 0] + p.boxes[:, 2] <= SIZE[0]).all()
    assert (p.boxes[:, 1] + p.boxes[:, 3] <= SIZE[1]).all()
    torch.manual_seed(0)  # torchvision's own sampler on the same image size: the same distribution
    ref = np.array([transforms.RandomResizedCrop.get_params(torch.empty(3, SIZE[1], SIZE[0]), [0.2, 1.0],
                                                             [3 / 4, 4 / 3]) for _ in range(4000)])
    ref_area = ref[:, 2] * ref[:, 3] / (SIZE[0] * SIZE[1])
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(area, q) - np.quantile(ref_area, q)) < 0.03, q
    assert abs(np.mean(p.boxes[:, 0] + p.boxes[:, 2] / 2) - SIZE[0] / 2) < 3  # centres spread evenly


def test_crop_fallback_is_centered_and_ratio_clamped() -> None:
    never_fits = np.full((2, 41), 0.999)  # area ~1 at the widest ratio: fits neither a tall nor a wide image
    boxes = random_resized_crops(never_fits, np.array([100, 400]), np.array([400, 100]), (0.99, 1.0), (3 / 4, 4 / 3))
    assert boxes.tolist() == [[0, 133, 100, 133], [133, 0, 133, 100]]  # torchvision's fallback boxes


def test_flip_rate_is_one_half() -> None:
    assert abs(_plan().batch(0, 0).flips.mean() - 0.5) < 0.02


def test_draws_depend_on_seed_epoch_position_only() -> None:
    positions = np.array([5, 17, 99])
    full = uniforms(3, 1, np.arange(100), 41)
    assert np.array_equal(uniforms(3, 1, positions, 41), full[positions])  # any subset: the same draws
    assert not np.array_equal(uniforms(4, 1, positions, 41), full[positions])
    assert not np.array_equal(uniforms(3, 2, positions, 41), full[positions])
    assert 0.0 <= full.min() and full.max() < 1.0 and abs(full.mean() - 0.5) < 0.02


def test_epoch_order_is_a_seeded_permutation() -> None:
    perm = epoch_permutation(1000, seed=0, epoch=0)
    assert sorted(perm.tolist()) == list(range(1000))
    assert np.array_equal(perm, epoch_permutation(1000, seed=0, epoch=0))
    assert not np.array_equal(perm, epoch_permutation(1000, seed=0, epoch=1))
    assert not np.array_equal(perm, epoch_permutation(1000, seed=1, epoch=0))


@pytest.mark.parametrize("num_images,world_size", [(96, 3), (100, 3)])
def test_rank_shards_are_disjoint_and_cover_the_epoch_once(num_images: int, world_size: int) -> None:
    for epoch in (0, 1):
        shards = [_plan(num_images, batch_size=4, world_size=world_size, rank=r).epoch_image_ids(epoch)
                  for r in range(world_size)]
        ids = np.concatenate(shards)
        assert len(ids) == len(set(ids.tolist())) == world_size * (num_images // world_size // 4) * 4
        if num_images % (world_size * 4) == 0:
            assert sorted(ids.tolist()) == list(range(num_images))  # the whole dataset, once
        batches = [_plan(num_images, batch_size=4, world_size=world_size, rank=1).batch(epoch, b).image_ids
                   for b in range(math.floor(num_images / world_size / 4))]
        assert np.array_equal(np.concatenate(batches), shards[1])  # batches are the shard, in order


def test_partial_last_batch_and_bad_arguments() -> None:
    plan = EpochPlan(np.tile(SIZE, (10, 1)), batch_size=4, drop_last=False)
    assert len(plan) == 3 and len(plan.batch(0, 2).image_ids) == 2
    assert len(EpochPlan(np.tile(SIZE, (10, 1)), batch_size=4)) == 2
    with pytest.raises(ValueError, match="cannot fill one batch of 8 on each of 2 ranks"):
        EpochPlan(np.tile(SIZE, (10, 1)), batch_size=8, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        EpochPlan(np.tile(SIZE, (10, 1)), batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"batch index must be in \[0, 3\), got 3"):
        plan.batch(0, 3)
