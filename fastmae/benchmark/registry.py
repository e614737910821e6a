"""Implementation names -> step builders: fastmae's own variants and the baselines in ``bench/baselines``.

The baselines live in the repository, not in the package: ``bench/baselines/steps.py`` defines
``build_official_step``, ``build_modern_step`` and ``build_hf_step``, each
``(model_name, batch_size, img_size, device) -> TrainStep``. The folder is found next to the
package (an editable install or a source checkout) or given explicitly; where it or a builder is
missing, that implementation is skipped with the reason.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

import fastmae
from fastmae.benchmark.train_step import FASTMAE_IMPLS, TrainStep, build_fastmae_step

Builder = Callable[[str, int, int, torch.device], TrainStep]

BASELINE_IMPLS = ("official", "modern", "hf")
ALL_IMPLS = (*FASTMAE_IMPLS, *BASELINE_IMPLS)
DEFAULT_IMPLS = ("fastmae", "fastmae-compile", "fastmae-cudagraph", "fastmae-reference", "official", "modern", "hf")


def check_impl_names(impls: tuple[str, ...]) -> None:
    unknown = [i for i in impls if i not in ALL_IMPLS]
    if unknown:
        raise ValueError(f"unknown impl(s) {unknown}; expected names from {list(ALL_IMPLS)}")


def default_baselines_dir() -> Path | None:
    """``bench/baselines`` beside the package's source folder, when it is there (editable install, checkout)."""
    candidate = Path(fastmae.__file__).resolve().parent.parent / "bench" / "baselines"
    return candidate if candidate.is_dir() else None


@dataclass
class Builders:
    """What can be built: a builder per available implementation, a reason per unavailable one."""

    builders: dict[str, Builder] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def load_builders(impls: tuple[str, ...], baselines_dir: Path | None) -> Builders:
    """Builders for ``impls``: fastmae's from this package, the baselines from ``baselines_dir/steps.py``."""
    check_impl_names(impls)
    out = Builders()
    for impl in impls:
        if impl in FASTMAE_IMPLS:
            out.builders[impl] = partial(build_fastmae_step, impl)
    wanted = [i for i in impls if i in BASELINE_IMPLS]
    if not wanted:
        return out
    module, reason = _import_steps(baselines_dir)
    for impl in wanted:
        builder = getattr(module, f"build_{impl}_step", None) if module is not None else None
        if builder is not None:
            out.builders[impl] = builder
        else:
            out.unavailable[impl] = reason or f"{module.__file__} defines no build_{impl}_step"
    return out


def _import_steps(baselines_dir: Path | None) -> tuple[object | None, str | None]:
    """Import ``<baselines_dir>/steps.py`` as ``<parent>.<dir>.steps`` (so it may import its siblings
    either relatively or as ``bench.baselines.<module>``); (module, None) or (None, reason)."""
    if baselines_dir is None:
        return None, "no bench/baselines folder beside the package (pass --baselines DIR)"
    baselines_dir = Path(baselines_dir).resolve()
    if not (baselines_dir / "steps.py").is_file():
        return None, f"no steps.py in {baselines_dir}"
    package = f"{baselines_dir.parent.name}.{baselines_dir.name}"
    if not all(part.isidentifier() for part in package.split(".")):
        return None, f"{baselines_dir} must sit in a folder whose names are Python identifiers (e.g. bench/baselines)"
    for path in (str(baselines_dir.parent.parent), str(baselines_dir)):
        if path not in sys.path:
            sys.path.append(path)
    try:
        return importlib.import_module(f"{package}.steps"), None
    except Exception as exc:  # a baseline that cannot even be imported is skipped, with why
        return None, f"cannot import {baselines_dir / 'steps.py'}: {type(exc).__name__}: {exc}"
