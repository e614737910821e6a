"""Shared by the fine-tuning tests: a tiny ImageFolder of coloured PNGs (class ``c`` is dominated by colour channel
``c``) and the command line of a tiny CPU run on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_color_tree(root: Path, per_class: int, classes: tuple[str, ...] = ("class0", "class1", "class2"),
                     channels: tuple[int, ...] | None = None, size: int = 40, seed: int = 0) -> Path:
    """``per_class`` noisy ``size``-px PNGs per class folder; class ``i`` is bright in channel ``channels[i]``
    (default ``i``)."""
    rng = np.random.default_rng(seed)
    for i, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        channel = channels[i] if channels is not None else i
        for j in range(per_class):
            img = np.full((size, size, 3), 40.0)
            img[..., channel] = 210
            img += rng.normal(0, 20, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{j:03d}.png")
    return root


TINY = {"model": "vit_demo_patch8", "img_size": 32, "batch_size": 4, "accum": 1, "device": "cpu", "loader": "torch",
        "num_workers": 0, "log_every": 1, "precision": "fp32"}


def cli_args(command: str, data: Path, out: Path, **overrides: object) -> list[str]:
    """``fastmae <command>`` flags of a tiny CPU run (``TINY`` plus ``overrides``; None drops a flag)."""
    args = [command, "--no-progress", "--data", str(data), "--output", str(out)]
    for key, value in {**TINY, **overrides}.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args
