"""fastmae.data.pretrain_loader on generated JPEG trees, with each backend (DALI runs CPU pipelines
without a GPU): shapes, dtypes, normalisation, the planned crops and flips, seeds, rank shards,
save/restore of the position, list files in place of a tree."""

import importlib.resources
import importlib.util
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.data import IMAGENET_MEAN, IMAGENET_STD, list_images, pretrain_loader
from fastmae.data.sampling import EpochPlan
from fastmae.data.torch_backend import crop_resize_flip, normalize

HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
NO_DALI = pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI is not installed")
BACKENDS = ["torch", pytest.param("dali", marks=NO_DALI)]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
SOLID_SIZES = [(48, 36), (36, 48), (20, 30), (64, 64)]  # (20, 30): smaller than the 32 px crop


def solid_color(i: int) -> tuple[int, int, int]:
    """The colour of image ``i`` of a solid tree: 16 levels apart, so JPEG noise cannot confuse two."""
    return (16 * (i % 16) + 8, 16 * (i // 16 % 16) + 8, 200 - 16 * (i // 256))


def write_solid_tree(root: Path, count: int, classes: int = 3) -> Path:
    """``count`` single-colour JPEGs (colour ``solid_color(i)``) in ``classes`` folders, various sizes."""
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", SOLID_SIZES[i % len(SOLID_SIZES)], solid_color(i)).save(folder / f"{i:04d}.jpg", quality=95)
    return root


def write_photo_tree(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` JPEG crops (36-80 px a side) of a natural photo, in 2 class folders."""
    rng = random.Random(seed)
    with Image.open(importlib.resources.files("skimage.data") / "chelsea.png") as photo:
        photo = photo.convert("RGB")
    for i in range(count):
        w, h = rng.randint(36, 80), rng.randint(36, 80)
        left, top = rng.randint(0, photo.width - 3 * w), rng.randint(0, photo.height - 3 * h)
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        photo.crop((left, top, left + 3 * w, top + 3 * h)).resize((w, h)).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def identify(batch: torch.Tensor, count: int) -> list[int]:
    """The index of the solid-colour image each ``(N, 3, S, S)`` normalised image shows."""
    rgb = (batch.float().cpu() * STD + MEAN).mean(dim=(2, 3)) * 255  # (N, 3)
    colors = torch.tensor([solid_color(i) for i in range(count)], dtype=torch.float32)  # (count, 3)
    dist = (rgb[:, None, :] - colors[None, :, :]).abs().amax(dim=2)  # (N, count)
    assert (dist.amin(dim=1) < 6).all(), "an output is not one of the solid colours"
    return dist.argmin(dim=1).tolist()


@pytest.fixture(scope="module")
def solid_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_solid_tree(tmp_path_factory.mktemp("solid"), 48)


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photo_tree(tmp_path_factory.mktemp("photos"), 24)


def _loader(root: Path, backend: str, **kw):
    kw.setdefault("img_size", 32)
    kw.setdefault("num_workers", 0 if backend == "torch" else 2)
    return pretrain_loader(root, kw.pop("batch_size", 8), backend=backend, device="cpu", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_dtypes_and_normalisation(solid_root: Path, backend: str) -> None:
    loader = _loader(solid_root, backend, dtype=torch.bfloat16)
    assert loader.backend == backend and len(loader) == 6 and loader.num_images == 48 and loader.skipped == []
    batch = next(loader)
    assert batch.shape == (8, 3, 32, 32) and batch.dtype == torch.bfloat16 and batch.device.type == "cpu"
    ids = identify(batch, 48)
    expected = (torch.tensor([solid_color(i) for i in ids]).view(8, 3, 1, 1) / 255 - MEAN) / STD
    assert (batch.float() - expected).abs().max() < 0.1  # each image is its colour, normalised (JPEG noise, bf16)
    assert next(_loader(solid_root, backend)).dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_shards_are_disjoint_and_cover_each_epoch_once(solid_root: Path, backend: str) -> None:
    seen = []
    for rank in range(2):
        loader = _loader(solid_root, backend, world_size=2, rank=rank, batch_size=6)
        assert len(loader) == 4
        epochs = [[i for _ in range(len(loader)) for i in identify(next(loader), 48)] for _ in range(2)]
        seen.append(epochs)
        assert epochs[0] != epochs[1] and sorted(epochs[0]) != sorted(epochs[1])  # reshuffled each epoch
    for epoch in range(2):
        assert sorted(seen[0][epoch] + seen[1][epoch]) == list(range(48))  # disjoint, together the whole set


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_batches_and_restore_continues_exactly(photo_root: Path, backend: str) -> None:
    loader = _loader(photo_root, backend, seed=5)  # 3 batches per epoch
    for _ in range(4):  # into the second epoch
        next(loader)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 1
    expected = [next(loader) for _ in range(3)]  # across the epoch boundary
    again = _loader(photo_root, backend, seed=5)
    first = next(again)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [next(again) for _ in range(3)]))
    assert torch.equal(first, next(_loader(photo_root, backend, seed=5)))  # same seed, same batch
    assert not torch.equal(first, next(_loader(photo_root, backend, seed=6)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_apply_the_planned_crops_and_flips(photo_root: Path, backend: str) -> None:
    """The torch backend's output is the plan applied by hand; DALI's matches it up to resampling."""
    loader = _loader(photo_root, backend, seed=1)
    batches = [next(loader) for _ in range(2)]
    files = sorted(photo_root.rglob("*.jpg"))
    sizes = np.array([Image.open(f).size for f in files])
    plan = EpochPlan(sizes, batch_size=8, seed=1)
    for index, batch in enumerate(batches):
        p = plan.batch(0, index)
        with torch.no_grad():
            by_hand = normalize(torch.stack([crop_resize_flip(Image.open(files[i]).convert("RGB"), tuple(box), 32,
                                                              bool(flip))
                                             for i, box, flip in zip(p.image_ids, p.boxes, p.flips)]), torch.float32)
        if backend == "torch":
            assert torch.equal(batch, by_hand)
        else:  # another bicubic resampler: close on average, and far from the unflipped image
            assert (batch - by_hand).abs().mean() < 0.03
            assert (batch - by_hand.flip(3)).abs().mean() > 0.1


def test_worker_count_does_not_change_the_batches(photo_root: Path) -> None:
    in_process = [next(loader) for loader in [_loader(photo_root, "torch")] for _ in range(2)]
    workers = _loader(photo_root, "torch", num_workers=2)
    assert all(torch.equal(a, next(workers)) for a in in_process)
    workers.close()


def test_state_is_plain_and_checked(tmp_path: Path, photo_root: Path) -> None:
    loader = _loader(photo_root, "torch")
    next(loader)
    torch.save({"loader": loader.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)["loader"]
    assert state["epoch"] == 0 and state["batch"] == 1 and all(isinstance(v, int) for v in state.values())
    with pytest.raises(ValueError, match=r"another setup: seed 0 \(saved\) != 3 \(now\)"):
        _loader(photo_root, "torch", seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"batch in \[0, 3\)"):
        loader.load_state_dict({**state, "batch": 3})
    with pytest.raises(ValueError, match="backend must be one of"):
        _loader(photo_root, "jax")


def test_iterating_leaves_the_global_rng_alone(photo_root: Path) -> None:
    """A new DataLoader iterator (at the start, after a restore) draws nothing from torch's global
    generator, so a resumed run's global random stream matches the uninterrupted run's."""
    loader = _loader(photo_root, "torch")
    before = torch.get_rng_state()
    for _ in range(4):  # into the second epoch
        next(loader)
    loader.load_state_dict(loader.state_dict())  # restarts the DataLoader at its position
    next(loader)
    assert torch.equal(torch.get_rng_state(), before)


def write_list_file(list_file: Path, files: list[Path]) -> Path:
    """``files`` listed in ``list_file``, in that order, alternately relative to its folder and
    absolute, with a comment and blank lines."""
    list_file.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# the tree's images", ""]
    for i, path in enumerate(files):
        lines += [os.path.relpath(path, list_file.parent) if i % 2 else str(path.absolute()), "  "]
    list_file.write_text("\n".join(lines) + "\n")
    return list_file


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_list_file_reads_as_the_equivalent_tree(solid_root: Path, tmp_path: Path, backend: str) -> None:
    list_file = write_list_file(tmp_path / "lists" / "train.txt", list_images(solid_root)[::-1])  # any order
    assert any(line.startswith("..") for line in list_file.read_text().splitlines())  # relative entries
    tree = _loader(solid_root, backend, seed=3, rank=1, world_size=2, batch_size=6)
    listed = _loader(list_file, backend, seed=3, rank=1, world_size=2, batch_size=6)
    assert listed.files == tree.files and len(listed) == len(tree) == 4
    for _ in range(len(tree) + 2):  # into the second epoch
        assert torch.equal(next(listed), next(tree))


def test_list_file_errors(solid_root: Path, tmp_path: Path) -> None:
    files = list_images(solid_root)
    gone = [tmp_path / "gone" / "a.jpg", tmp_path / "gone" / "b.jpg"]
    with pytest.raises(ValueError, match=rf"names 2 paths that are not files, the first: '{gone[0]}'"):
        list_images(write_list_file(tmp_path / "missing.txt", [*files[:3], *gone]))
    (tmp_path / "comments.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="names no files"):
        list_images(tmp_path / "comments.txt")
    with pytest.raises(ValueError, match="not a UTF-8 text file listing image paths"):
        list_images(files[0])  # an image, not a list
    with pytest.raises(ValueError, match="a text file listing image paths, .* which is neither"):
        list_images(tmp_path / "nowhere")


@pytest.mark.gpu
def test_torch_backend_on_cuda(photo_root: Path) -> None:
    cuda = pretrain_loader(photo_root, 8, img_size=32, backend="torch", device="cuda", num_workers=2)
    batch = next(cuda)
    assert batch.device.type == "cuda" and batch.dtype == torch.float32
    assert torch.allclose(batch.cpu(), next(_loader(photo_root, "torch")), atol=1e-6)


@pytest.mark.gpu
@NO_DALI
def test_dali_mixed_decode_gives_cuda_batches(photo_root: Path) -> None:
    dali = pretrain_loader(photo_root, 8, img_size=32, backend="dali", device="cuda", dtype=torch.bfloat16)
    torch_ = pretrain_loader(photo_root, 8, img_size=32, backend="torch", device="cuda", num_workers=0)
    batch = next(dali)
    assert batch.device.type == "cuda" and batch.dtype == torch.bfloat16 and batch.shape == (8, 3, 32, 32)
    assert "nvJPEG" in dali.describe()
    assert (batch.float() - next(torch_)).abs().mean() < 0.03  # same files, crops and flips


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_continues_exactly_on_cuda(photo_root: Path, backend: str) -> None:
    """test_same_seed_same_batches_and_restore_continues_exactly with the batches on the GPU: DALI decodes with
    nvJPEG (mixed), the torch backend copies to the device; after load_state_dict the next batches are the same."""
    def cuda_loader() -> object:
        return pretrain_loader(photo_root, 8, img_size=32, backend=backend, device="cuda", seed=5, num_workers=2)

    loader = cuda_loader()  # 3 batches per epoch
    for _ in range(4):  # into the second epoch
        next(loader)
    state = loader.state_dict()
    expected = [next(loader).clone() for _ in range(3)]  # across the epoch boundary
    again = cuda_loader()
    next(again)
    again.load_state_dict(state)
    restored = [next(again) for _ in range(3)]
    assert all(b.device.type == "cuda" for b in restored)
    assert all(torch.equal(a, b) for a, b in zip(expected, restored))
