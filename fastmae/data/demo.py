"""The embedded demo dataset: real photos shipped offline by scikit-image, cut into JPEG crops.

``demo_dataset()`` writes, once, an ImageFolder tree ``<cache>/demo-v1/<photo>/<i>.jpg`` of random
crops of nine natural colour photos, so that a demo run decodes real JPEG files exactly as a run on
ImageNet does. The tree is built in a temporary folder and renamed into place, so an interrupted
build is never mistaken for a complete one.
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


def demo_dataset(cache_dir: str | os.PathLike | None = None, crops_per_photo: int = 64, size: int = 128) -> Path:
    """The demo ImageFolder tree (one class per photo), written on first use; returns its root."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / f"{DEMO_VERSION}-{crops_per_photo}x{size}"
    if root.is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=cache))
    try:
        photos = importlib.resources.files("skimage.data")
        for name in DEMO_PHOTOS:
            with Image.open(photos / name) as photo:
                photo = photo.convert("RGB")
                folder = tmp / Path(name).stem
                folder.mkdir()
                for i, crop in enumerate(_random_crops(photo, crops_per_photo, size, rng)):
                    crop.save(folder / f"{i:03d}.jpg", quality=92)
        try:
            tmp.rename(root)
        except OSError:  # another process finished first: keep its copy
            if not root.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
