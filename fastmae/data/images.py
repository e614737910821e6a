"""Image files: listing an ImageFolder tree, opening a file as an upright RGB image, the ImageNet
normalisation constants."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

EXIF_ORIENTATION = 0x0112
UPRIGHT = {  # EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

log = logging.getLogger("fastmae.data")


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every file with an image extension below ``root`` (an ImageFolder tree or a flat folder), sorted.

    Files with other extensions are left out, and their count is logged (nothing is dropped silently).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data root must be a folder of images (ImageFolder tree), got {str(root)!r}")
    files, others = [], []
    visited = set()  # real folders already listed: a symlinked folder is followed once (no cycles)
    for folder, subfolders, names in os.walk(root, followlinks=True):  # symlinked class folders are common
        real = os.path.realpath(folder)
        if real in visited:
            subfolders.clear()
            continue
        visited.add(real)
        for name in names:
            path = Path(folder, name)
            if path.is_file() and not name.startswith("."):
                (files if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    if others:
        log.warning("ignoring %d files without an image extension (%s) below %s, e.g. %s", len(others),
                    " ".join(IMAGE_EXTENSIONS), root, min(others))
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found below {str(root)!r}")
    return sorted(files)


def class_labels(files: list[Path], root: str | os.PathLike) -> tuple[list[int], list[str]]:
    """ImageFolder labels: each file's class index (its top-level folder below ``root``, among the sorted
    folder names), and the class names."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for path in files:
        parts = path.relative_to(root).parts
        if len(parts) < 2:
            raise ValueError(f"labels need an ImageFolder tree (root/<class>/<image>), but {str(path)!r} is not "
                             f"inside a class folder of {str(root)!r}")
        labels.append(index[parts[0]])
    return labels, classes


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """The decoded image at ``path``, turned upright by its EXIF orientation (as DALI's decoders do)
    and converted to RGB (grayscale, CMYK, palette; the alpha channel of RGBA is dropped)."""
    with Image.open(path) as img:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        rgb = img.convert("RGB")
    return rgb.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else rgb


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the open image ``img`` once turned upright by its EXIF orientation."""
    width, height = img.size
    return (height, width) if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)
