"""Image files: listing an ImageFolder tree or a text file of paths, opening a file as an upright RGB
image, the ImageNet normalisation constants."""

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


def list_images(source: str | os.PathLike) -> list[Path]:
    """The image files of ``source``, sorted: a folder (an ImageFolder tree or a flat folder) or a text
    file listing image paths.

    A folder: every file with an image extension below it. Hidden folders and files (names starting
    with ``.``) are left out, as ``class_labels`` leaves out hidden class folders; files with other
    extensions are left out too and their count is logged (nothing is dropped silently).

    A list file: one path a line, relative paths taken from the list file's folder; blank lines and
    lines starting with ``#`` are ignored. Every listed file is kept, whatever its name (the bad-file
    check judges it); a listed path that is not a file is a ValueError.
    """
    source = Path(source)
    if source.is_file():
        return _listed_images(source)
    if not source.is_dir():
        raise ValueError(f"data root must be a folder of images (ImageFolder tree) or a text file listing image "
                         f"paths, got {str(source)!r}, which is neither")
    files, others = [], []
    visited = set()  # real folders already listed: a symlinked folder is followed once (no cycles)
    for folder, subfolders, names in os.walk(source, followlinks=True):  # symlinked class folders are common
        real = os.path.realpath(folder)
        if real in visited:
            subfolders.clear()
            continue
        visited.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]  # hidden folders: not walked
        for name in names:
            path = Path(folder, name)
            if path.is_file() and not name.startswith("."):
                (files if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    if others:
        log.warning("ignoring %d files without an image extension (%s) below %s, e.g. %s", len(others),
                    " ".join(IMAGE_EXTENSIONS), source, min(others))
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found below {str(source)!r}")
    return sorted(files)


def _listed_images(list_file: Path) -> list[Path]:
    """The sorted paths named by the text file ``list_file`` (``list_images``)."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"data root {str(list_file)!r} is a file but not a UTF-8 text file listing image paths "
                         f"(one a line): {exc}") from None
    entries = [line.strip() for line in lines]
    files = [Path(os.path.normpath(list_file.parent / entry))  # an absolute entry replaces the folder
             for entry in entries if entry and not entry.startswith("#")]
    if not files:
        raise ValueError(f"the image list {str(list_file)!r} names no files (one path a line; blank lines and "
                         f"'#' comments are ignored)")
    missing = [path for path in files if not path.is_file()]
    if missing:
        raise ValueError(f"the image list {str(list_file)!r} names {len(missing)} paths that are not files, "
                         f"the first: {str(missing[0])!r}")
    return sorted(files)


def class_labels(files: list[Path], source: str | os.PathLike) -> tuple[list[int], list[str]]:
    """ImageFolder labels: each file's class index and the sorted class names.

    ``source`` as ``list_images``'s. A folder: a file's class is its top-level folder below ``source``,
    and the classes are the non-hidden folders there (an empty class folder still has its index). A
    list file: a file's class is the name of the folder that holds it, and the classes are the names
    that occur.
    """
    source = Path(source)
    if source.is_file():
        classes = sorted({path.parent.name for path in files})
        index = {name: i for i, name in enumerate(classes)}
        return [index[path.parent.name] for path in files], classes
    classes = sorted(d.name for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for path in files:
        parts = path.relative_to(source).parts
        if len(parts) < 2 or parts[0] not in index:
            raise ValueError(f"labels need an ImageFolder tree (root/<class>/<image>, class folders not hidden), "
                             f"but {str(path)!r} is not inside a class folder of {str(source)!r}")
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
