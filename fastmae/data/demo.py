"""The embedded demo dataset: real photos shipped offline by scikit-image, cut into JPEG crops.

``demo_dataset()`` writes, once, an ImageFolder tree ``<cache>/demo-v1-<n>x<size>/<photo>/<i>.jpg`` of
random crops of nine natural colour photos, so that a demo run decodes real JPEG files exactly as a run on
ImageNet does. The tree is built in a temporary folder and renamed into place, so an interrupted
build is never mistaken for a complete one.

``demo_dataset(split="train")`` and ``demo_dataset(split="heldout")`` are the two halves of the split tree
``<cache>/demo-v2-<n>x<size>/{train,heldout}/<photo>/<i>.jpg`` that ``fastmae pretrain`` uses without ``--data``:
each photo is cut at 70% of its width; training crops come from the left part, held-out crops from the right
part, so no held-out pixel is ever trained on. ``motorcycle_left`` and ``motorcycle_right`` are a stereo pair (the
same scene seen 7-60 px apart): the right view's training part stops 64 px earlier, so that the scene behind the
left view's held-out strip is in neither view's training part.
"""

from __future__ import annotations

import importlib.resources
import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image

DEMO_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
DEMO_VERSION = "demo-v1"
SPLIT_VERSION = "demo-v2"
SPLITS = ("train", "heldout")
HELDOUT_FROM = 0.7  # each photo's columns from 70% of its width on are held out
STEREO_MARGIN = {"motorcycle_right": 64}  # px: the pair's largest disparity is 60 px (skimage's disparity map)
HELDOUT_PER_PHOTO = 8  # held-out crops per photo


def default_cache_dir() -> Path:
    """``$FASTMAE_CACHE``, else ``$XDG_CACHE_HOME/fastmae``, else ``~/.cache/fastmae``."""
    if os.environ.get("FASTMAE_CACHE"):
        return Path(os.environ["FASTMAE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastmae"


def _random_crops(photo: Image.Image, count: int, size: int, rng: random.Random) -> list[Image.Image]:
    """``count`` square crops covering 10–60% of the photo's shorter side squared, resized to ``size``."""
    w, h = photo.size
    crops = []
    for _ in range(count):
        side = int(min(w, h) * rng.uniform(0.32, 0.77))
        left, top = rng.randint(0, w - side), rng.randint(0, h - side)
        crop = photo.crop((left, top, left + side, top + side))
        crops.append(crop.resize((size, size), Image.Resampling.BICUBIC))
    return crops


def _split_crops(photo: Image.Image, name: str, crops_per_photo: int, size: int,
                 rng: random.Random) -> dict[str, list[Image.Image]]:
    """The training crops of the photo's left part and the held-out crops of its right part (``HELDOUT_FROM``)."""
    w, h = photo.size
    cut = round(w * HELDOUT_FROM)
    train = photo.crop((0, 0, cut - STEREO_MARGIN.get(name, 0), h))
    heldout = photo.crop((cut, 0, w, h))
    held = []
    for _ in range(HELDOUT_PER_PHOTO):  # the strip is narrow: crops of 60-100% of its shorter side
        side = int(min(heldout.size) * rng.uniform(0.6, 1.0))
        left, top = rng.randint(0, heldout.size[0] - side), rng.randint(0, heldout.size[1] - side)
        held.append(heldout.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC))
    return {"train": _random_crops(train, crops_per_photo, size, rng), "heldout": held}


def demo_dataset(cache_dir: str | os.PathLike | None = None, crops_per_photo: int = 64, size: int = 128,
                 split: str | None = None) -> Path:
    """The demo ImageFolder tree (one class per photo), written on first use; returns its root.

    ``split=None``: crops from anywhere in the photos (``demo-v1``). ``split="train"`` / ``"heldout"``: the
    folder of that half of the split tree (``demo-v2``; both halves are written together): ``crops_per_photo``
    training crops of each photo's left 70%, ``HELDOUT_PER_PHOTO`` held-out crops of its right 30%.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be None or one of {SPLITS}, got {split!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    version = DEMO_VERSION if split is None else SPLIT_VERSION
    root = cache / f"{version}-{crops_per_photo}x{size}"
    if root.is_dir():
        return root if split is None else root / split
    cache.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=cache))
    try:
        photos = importlib.resources.files("skimage.data")
        for name in DEMO_PHOTOS:
            with Image.open(photos / name) as photo:
                photo = photo.convert("RGB")
                if split is None:
                    parts = {"": _random_crops(photo, crops_per_photo, size, rng)}
                else:
                    parts = _split_crops(photo, Path(name).stem, crops_per_photo, size, rng)
                for part, crops in parts.items():
                    folder = tmp / part / Path(name).stem
                    folder.mkdir(parents=True)
                    for i, crop in enumerate(crops):
                        crop.save(folder / f"{i:03d}.jpg", quality=92)
        try:
            tmp.rename(root)
        except OSError:  # another process finished first: keep its copy
            if not root.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root if split is None else root / split
