"""fastmae.data.synthetic_shapes: deterministic, balanced, correctly labelled trees of the right size, in which
colour alone does not tell the classes apart."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastmae.data.synthetic_shapes import CLASSES, MIN_CONTRAST, render, shapes_dataset


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_render_is_deterministic_and_depends_on_every_seed_part() -> None:
    base = render("disc", 32, seed=3, split="train", index=5)
    assert base.shape == (32, 32, 3) and base.dtype == np.uint8
    assert np.array_equal(base, render("disc", 32, seed=3, split="train", index=5))
    for other in (render("disc", 32, seed=4, split="train", index=5), render("disc", 32, seed=3, split="val", index=5),
                  render("disc", 32, seed=3, split="train", index=6), render("ring", 32, seed=3, split="train", index=5)):
        assert not np.array_equal(base, other)


def test_foreground_and_background_contrast() -> None:
    """The pattern stands out: some pixels are ~MIN_CONTRAST from the background (the corner's colour: no pattern
    reaches the corner), and most pixels are background, in every class."""
    for name in CLASSES:
        for index in range(5):
            img = render(name, 32, seed=0, index=index).astype(float)  # (S, S, 3)
            background = img[:2, :2].reshape(-1, 3).mean(0)  # (3,)
            distance = np.linalg.norm(img - background, axis=-1)  # (S, S)
            assert np.percentile(distance, 99) > 0.8 * MIN_CONTRAST, (name, index)
            assert np.median(distance) < 0.5 * MIN_CONTRAST, (name, index)  # the background is the majority


def test_tree_layout_balance_sizes_and_labels(tmp_path) -> None:
    classes = ("disc", "stripes_h", "checker")
    splits = shapes_dataset(tmp_path / "set", 4, img_size=16, seed=7, classes=classes, n_val_per_class=2,
                            n_pretrain_per_class=6)
    assert set(splits) == {"train", "val", "pretrain"}
    for split, count in (("train", 4), ("val", 2), ("pretrain", 6)):
        assert sorted(p.name for p in splits[split].iterdir()) == sorted(classes)
        for name in classes:
            files = sorted((splits[split] / name).glob("*.png"))
            assert len(files) == count, (split, name)
            for i, path in enumerate(files):
                with Image.open(path) as img:
                    assert img.size == (16, 16) and img.mode == "RGB"
                # the label is the folder: the file is that class's image i of its split
                expected = render(name, 16, seed=7, split="val" if split == "val" else "train", index=i)
                assert np.array_equal(_pixels(path), expected), path
    # the labelled images are the first pretraining images; no validation image is a training image
    for name in classes:
        for i in range(4):
            assert np.array_equal(_pixels(splits["train"] / name / f"{i:04d}.png"),
                                  _pixels(splits["pretrain"] / name / f"{i:04d}.png"))
    train = {_pixels(p).tobytes() for p in splits["pretrain"].rglob("*.png")}
    assert not train & {_pixels(p).tobytes() for p in splits["val"].rglob("*.png")}


def test_same_arguments_reuse_the_tree_and_others_replace_it(tmp_path) -> None:
    root = tmp_path / "set"
    first = shapes_dataset(root, 2, img_size=8, classes=("square",))
    marker = first["train"] / "square" / "0000.png"
    stamp = marker.stat().st_mtime_ns
    assert shapes_dataset(root, 2, img_size=8, classes=("square",)) == first
    assert marker.stat().st_mtime_ns == stamp  # reused, not rewritten
    again = shapes_dataset(root, 3, img_size=8, classes=("square",))
    assert len(list((again["train"] / "square").glob("*.png"))) == 3
    assert not list(tmp_path.glob(".shapes-*"))  # no temporary folder left behind


def test_colour_alone_classifies_at_chance() -> None:
    """A nearest-centroid classifier on each image's mean colour, fitted on 40 images per class and scored on 40
    others, stays near chance (1/8); the same classifier on a feature of the pattern does far better."""
    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        imgs = np.stack([render(name, 16, seed=1, split=split, index=i).astype(float)
                         for name in CLASSES for i in range(40)])  # (8*40, 16, 16, 3)
        return imgs, np.repeat(np.arange(len(CLASSES)), 40)

    def nearest_centroid(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> float:
        centroids = np.stack([train[y_train == c].mean(0) for c in range(len(CLASSES))])  # (8, F)
        pred = np.argmin(((test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
        return float((pred == y_test).mean())

    (train, y_train), (test, y_test) = features("train"), features("val")
    colour = nearest_centroid(train.mean((1, 2)), y_train, test.mean((1, 2)), y_test)
    assert colour < 0.25  # chance 0.125; 320 test images: binomial std ~0.018
    # sanity: the test can tell a learnable feature apart. Mean absolute difference between horizontal neighbours and
    # between vertical neighbours (normalised by the image's contrast) separate the stripes' orientations.
    def edges(imgs: np.ndarray) -> np.ndarray:
        g = imgs.mean(-1)  # (N, S, S)
        scale = g.std((1, 2))[:, None] + 1e-6
        return np.stack([np.abs(np.diff(g, axis=1)).mean((1, 2)), np.abs(np.diff(g, axis=2)).mean((1, 2))], 1) / scale
    structure = nearest_centroid(edges(train), y_train, edges(test), y_test)
    assert structure > colour + 0.1


@pytest.mark.parametrize("kwargs, match", [
    ({"classes": ("disc", "hexagon")}, "classes must be distinct names"),
    ({"classes": ("disc", "disc")}, "classes must be distinct names"),
    ({"img_size": 4}, "img_size must be an int >= 8"),
    ({"n_per_class": 0}, "n_per_class must be an int >= 1"),
    ({"n_pretrain_per_class": 1}, "n_pretrain_per_class must be at least n_per_class"),
    ({"seed": -1}, "seed must be an int >= 0"),
])
def test_bad_arguments_raise_naming_them(tmp_path, kwargs, match) -> None:
    args = {"n_per_class": 2, "img_size": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        shapes_dataset(tmp_path / "set", **args)
    assert not (tmp_path / "set").exists()


def test_classes_as_a_string_is_a_type_error(tmp_path) -> None:
    with pytest.raises(TypeError, match="classes must be a non-empty sequence"):
        shapes_dataset(tmp_path / "set", 2, classes="disc")


def test_foreign_folder_is_refused(tmp_path) -> None:
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "mine.txt").write_text("not a shapes tree")
    with pytest.raises(ValueError, match="root must be a new or empty folder"):
        shapes_dataset(tmp_path / "set", 2, img_size=8)
    assert (tmp_path / "set" / "mine.txt").read_text() == "not a shapes tree"
