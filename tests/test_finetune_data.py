"""The fine-tuning input pipeline: timm's RandAugment (from ``create_transform``) on the torch backend, timm's
random erasing on the batch, both seeded by the batch's position (exact resume), the crops sampled as timm's
RandomResizedCrop, and DALI's RandAugment given a timm policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_data_loader import write_photo_tree

from fastmae.data import finetune_loader
from fastmae.data.eval import dali_rand_augment
from fastmae.data.loader import dali_available

POLICY = "rand-m9-mstd0.5-inc1"


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photo_tree(tmp_path_factory.mktemp("photos"), 12)


def _batches(root: Path, count: int, backend: str = "torch", state: dict | None = None,
             **kw: object) -> list[torch.Tensor]:
    loader = finetune_loader(root, 4, img_size=32, backend=backend, device="cpu",
                             num_workers=0 if backend == "torch" else 1, **kw)
    if state is not None:
        loader.load_state_dict(state)
    return [next(loader)[0] for _ in range(count)]


def test_timm_rand_augment_is_seeded_and_changes_the_images(photo_root: Path) -> None:
    augmented = _batches(photo_root, 2, rand_augment=POLICY)
    assert all(torch.equal(a, b) for a, b in zip(augmented, _batches(photo_root, 2, rand_augment=POLICY)))
    plain = _batches(photo_root, 2, rand_augment=None)
    changed = torch.cat([(a - b).abs().amax(dim=(1, 2, 3)) > 0.05 for a, b in zip(augmented, plain)])
    assert changed.float().mean() > 0.5  # each of 2 ops is applied with p 0.5: most images change
    assert not all(torch.equal(a, b) for a, b in zip(augmented, _batches(photo_root, 2, rand_augment=POLICY, seed=1)))


def test_random_erasing_is_timms_on_the_batch_and_resumes_exactly(photo_root: Path) -> None:
    kw = {"rand_augment": POLICY, "re_mode": "pixel"}
    clean = _batches(photo_root, 3, re_prob=0.0, **kw)
    erased = _batches(photo_root, 3, re_prob=1.0, **kw)
    for a, b in zip(clean, erased):  # the same crops and RandAugment, one erased rectangle per image
        differs = (a != b).any(dim=1)  # (N, S, S)
        assert differs.any(dim=(1, 2)).all()
        area = differs.float().mean(dim=(1, 2))
        assert ((area > 0.01) & (area < 0.4)).all()  # timm's default area fraction is 0.02-1/3
    loader = finetune_loader(photo_root, 4, img_size=32, backend="torch", device="cpu", num_workers=0, re_prob=0.5,
                             **kw)
    next(loader)
    state = loader.state_dict()
    expected = [next(loader)[0] for _ in range(2)]
    resumed = _batches(photo_root, 2, state=state, re_prob=0.5, **kw)
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed))


def test_crops_are_sampled_as_timms_random_resized_crop(photo_root: Path) -> None:
    from timm.data import create_transform
    from timm.data.transforms import RandomResizedCropAndInterpolation

    crop, flip = create_transform(32, is_training=True, auto_augment=POLICY, interpolation="bicubic",
                                  separate=True)[0].transforms
    assert isinstance(crop, RandomResizedCropAndInterpolation) and flip.p == 0.5
    plan = finetune_loader(photo_root, 4, img_size=32, backend="torch", device="cpu", num_workers=0)._plan
    assert (plan.scale, plan.ratio) == (crop.scale, crop.ratio) == ((0.08, 1.0), (3 / 4, 4 / 3))
    assert crop.interpolation.name == "BICUBIC"  # as the torch backend's resize


def test_bad_policies_and_erasing_settings_are_refused(photo_root: Path) -> None:
    with pytest.raises(ValueError, match="rand_augment must be a timm RandAugment policy such as "
                                         "rand-m9-mstd0.5-inc1, got 'rand-z1'"):
        finetune_loader(photo_root, 4, img_size=32, backend="torch", rand_augment="rand-z1")
    with pytest.raises(ValueError, match="random erasing needs re_prob in"):
        finetune_loader(photo_root, 4, img_size=32, backend="torch", re_prob=0.5, re_mode="blur")


def test_a_timm_policy_maps_to_dalis_rand_augment() -> None:
    assert dali_rand_augment(POLICY) == (2, 27)  # magnitude 9 of timm's 10 = 27 of DALI's 30
    assert dali_rand_augment("rand-n3-m5-mstd1") == (3, 15) and dali_rand_augment("rand-inc1") == (2, 30)


@pytest.mark.slow  # two DALI pipelines with RandAugment: ~6 s on 2 cores
@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_backend_takes_a_timm_policy_and_erases(photo_root: Path) -> None:
    erased = _batches(photo_root, 1, backend="dali", rand_augment=POLICY, re_prob=1.0)[0]
    clean = _batches(photo_root, 1, backend="dali", rand_augment=POLICY, re_prob=0.0)[0]  # same seed: same RandAugment
    assert erased.shape == (4, 3, 32, 32)
    differs = (erased != clean).any(dim=1).float().mean(dim=(1, 2))  # (N,) erased area fraction
    assert ((differs > 0.01) & (differs < 0.4)).all()  # one rectangle per image, all else equal
