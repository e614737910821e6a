"""Fine-tuning and evaluation loaders, with each backend: labels (from a tree or a list file),
every image once per evaluation pass, resize + center crop, RandAugment."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_loader import BACKENDS, identify, write_list_file, write_photo_tree, write_solid_tree

from fastmae.data import eval_loader, finetune_loader
from fastmae.data.eval_transform import ImageFiles, eval_transform
from fastmae.data.images import class_labels, list_images


@pytest.fixture(scope="module")
def solid_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_solid_tree(tmp_path_factory.mktemp("solid"), 47)  # class = index % 3


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photo_tree(tmp_path_factory.mktemp("photos"), 12)


def _workers(backend: str) -> int:
    return 0 if backend == "torch" else 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_pass_covers_every_image_once_with_labels(solid_root: Path, backend: str) -> None:
    seen = []
    for rank in range(3):  # 47 images: ranks of 16, 16, 15
        loader = eval_loader(solid_root, 5, img_size=32, backend=backend, device="cpu", rank=rank, world_size=3,
                             num_workers=_workers(backend))
        assert loader.classes == ["class0", "class1", "class2"] and len(loader) == 4 - (rank == 2)
        for _ in range(2):  # each iteration is a fresh, identical pass
            ids, labels = [], []
            for images, batch_labels in loader:
                assert images.shape[1:] == (3, 32, 32) and batch_labels.dtype == torch.int64
                ids += identify(images, 47)
                labels += batch_labels.tolist()
            assert labels == [i % 3 for i in ids]
        seen += ids
    assert sorted(seen) == list(range(47))


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_file_labels_are_the_parent_folders(solid_root: Path, tmp_path: Path, backend: str) -> None:
    files = list_images(solid_root)
    list_file = write_list_file(tmp_path / "val.txt", files[::-1])
    assert class_labels(files, list_file) == class_labels(files, solid_root)
    tree = eval_loader(solid_root, 5, img_size=32, backend=backend, device="cpu", num_workers=_workers(backend))
    listed = eval_loader(list_file, 5, img_size=32, backend=backend, device="cpu", num_workers=_workers(backend))
    assert listed.classes == tree.classes == ["class0", "class1", "class2"] and listed.files == tree.files
    for (images, labels), (tree_images, tree_labels) in zip(listed, tree, strict=True):
        assert torch.equal(images, tree_images) and labels.tolist() == tree_labels.tolist()
    finetune = finetune_loader(list_file, 8, img_size=32, backend=backend, device="cpu", rand_augment=None,
                               num_workers=_workers(backend))
    images, labels = next(finetune)
    assert finetune.classes == tree.classes and labels.tolist() == [i % 3 for i in identify(images, 47)]


@pytest.fixture(scope="module")
def smooth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Smooth colour waves, different in each image (a half-pixel shift changes them little)."""
    root = tmp_path_factory.mktemp("smooth")
    (root / "waves").mkdir()
    for i, (w, h) in enumerate([(64, 48), (48, 64), (50, 50), (90, 40)]):
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        rgb = np.stack([np.sin(x / (20 + 3 * i) + y / 25), np.cos(y / (18 + 3 * i) + i), np.sin((x - y) / 30 + i)],
                       axis=2)
        Image.fromarray(np.uint8(127.5 + 120 * rgb)).save(root / "waves" / f"{i}.jpg", quality=95)
    return root


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_is_resize_and_center_crop(smooth_root: Path, backend: str) -> None:
    (images, _), = list(eval_loader(smooth_root, 4, img_size=32, backend=backend, device="cpu",
                                    num_workers=_workers(backend)))
    files = list_images(smooth_root)
    reference = ImageFiles(files, eval_transform(32, crop_fraction=0.875))
    expected = torch.stack([reference[i] for i in range(len(files))])  # torchvision Resize(37) + CenterCrop(32)
    error = (images - expected).abs().mean(dim=(1, 2, 3))  # (4,) sub-pixel differences of the crop box only
    assert (error < 0.08).all()
    assert ((images - expected.roll(1, 0)).abs().mean(dim=(1, 2, 3)) > 0.4).all()  # unlike the other images
    assert ((images - expected.flip(3)).abs().mean(dim=(1, 2, 3)) > 0.3).all()  # and unlike their mirror images


@pytest.mark.parametrize("backend", BACKENDS)
def test_finetune_batches_labels_and_rand_augment(solid_root: Path, photo_root: Path, backend: str) -> None:
    plain = finetune_loader(solid_root, 8, img_size=32, backend=backend, device="cpu", rand_augment=None,
                            num_workers=_workers(backend))
    images, labels = next(plain)
    assert labels.tolist() == [i % 3 for i in identify(images, 47)]

    def first_batches(seed: int, rand_augment: tuple[int, int] | None) -> list[torch.Tensor]:
        loader = finetune_loader(photo_root, 4, img_size=32, backend=backend, device="cpu", seed=seed,
                                 rand_augment=rand_augment, num_workers=_workers(backend))
        return [next(loader)[0] for _ in range(2)]

    augmented = first_batches(0, (2, 9))
    assert all(torch.equal(a, b) for a, b in zip(augmented, first_batches(0, (2, 9))))  # seeded
    unaugmented = first_batches(0, None)
    changed = [(a - b).abs().amax(dim=(1, 2, 3)) > 0.05 for a, b in zip(augmented, unaugmented)]
    assert torch.cat(changed).float().mean() > 0.5  # most images were changed by RandAugment


def test_finetune_restore_is_exact_with_torch(photo_root: Path) -> None:
    loader = finetune_loader(photo_root, 4, img_size=32, backend="torch", device="cpu", num_workers=0)
    next(loader)
    state = loader.state_dict()
    expected = [next(loader)[0] for _ in range(3)]
    again = finetune_loader(photo_root, 4, img_size=32, backend="torch", device="cpu", num_workers=0)
    again.load_state_dict(state)
    assert all(torch.equal(a, next(again)[0]) for a in expected)
