"""The golden run: a fixed-seed ``fastmae pretrain`` of the tiny preset on CPU whose per-step losses, masks,
first input batch and final weights are committed in ``tests/golden/pretrain_tiny.json``.

A change that alters numerics fails ``tests/test_golden_loss.py``; a change that alters them on purpose
rewrites the file with ``python tests/golden_run.py --update`` and says why in its commit.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import fastmae.train.pretrain as pretrain_module
from fastmae.data import demo_dataset
from fastmae.data.loader import pretrain_loader
from fastmae.ops import use_backend
from fastmae.train.checkpoint import checkpoint_path
from fastmae.train.config import PretrainConfig
from fastmae.train.pretrain import pretrain

GOLDEN = Path(__file__).parent / "golden" / "pretrain_tiny.json"
STEPS = 50
# 64 px crops of the demo photos: 16 patches, 4 kept; batch 8; warmup then cosine over the 50 steps
SETTINGS = {"model": "mae_vit_tiny_patch16", "steps": STEPS, "img_size": 64, "batch_size": 8, "log_every": 1,
            "save_every": STEPS, "keep_last": 1, "num_workers": 0, "device": "cpu", "deterministic": True,
            "precision": "fp32", "loader": "torch", "seed": 11, "blr": 1.5e-3, "norm_pix_loss": True}


def golden_data(cache: Path) -> Path:
    return demo_dataset(cache, crops_per_photo=4, size=64)


def first_batch(data: Path) -> torch.Tensor:
    """The run's first input batch ``(8, 3, 64, 64)``: decoded JPEGs plus the loader's augmentation."""
    loader = pretrain_loader(data, SETTINGS["batch_size"], SETTINGS["img_size"], device=torch.device("cpu"),
                             dtype=torch.float32, seed=SETTINGS["seed"], rank=0, world_size=1, num_workers=0,
                             backend="torch")
    return next(loader)


def run(data: Path, out: Path, backend: str | None = None) -> dict[str, object]:
    """Run the golden configuration (under ``use_backend(backend)`` when given) and summarise it."""
    masks: list[str] = []
    draw = pretrain_module.mask_noise

    def recording(*args: object) -> torch.Tensor:
        noise = draw(*args)  # (B, L): each patch's rank in its sample's noise order
        len_keep = args[4]
        mask = (noise >= len_keep).to(torch.uint8)  # (B, L), 1 = removed
        masks.append(hashlib.sha256(mask.numpy().tobytes()).hexdigest()[:16])
        return noise

    cfg = PretrainConfig(**SETTINGS, data=str(data), output=str(out))
    with pytest.MonkeyPatch.context() as monkeypatch, use_backend(backend) if backend else contextlib.nullcontext():
        monkeypatch.setattr(pretrain_module, "mask_noise", recording)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one reduction order for the CPU matmuls, whatever the machine's cores
        try:
            summary = pretrain(cfg, progress=False)
        finally:
            torch.set_num_threads(threads)
    assert summary.status == "complete" and summary.steps == STEPS
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = torch.load(checkpoint_path(out / "checkpoints", STEPS), weights_only=True)["model"]
    return {
        "settings": SETTINGS,
        "torch": torch.__version__,
        "first_batch": _stats(first_batch(data)),
        "losses": [row["loss"] for row in rows],
        "masks": masks,
        "weights": {name: _stats(t) for name, t in sorted(weights.items())},
        "numel": {name: t.numel() for name, t in sorted(weights.items())},
    }


def _stats(t: torch.Tensor) -> list[float]:
    """``[sum, sum of squares]`` in float64: a checksum that says how far two tensors are apart."""
    t = t.double()
    return [t.sum().item(), t.square().sum().item()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--update", action="store_true", help=f"rewrite {GOLDEN.name} from a fresh run")
    parser.add_argument("--work", default="/tmp/fastmae-golden", help="cache and output folder")
    args = parser.parse_args()
    work = Path(args.work)
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    result = run(golden_data(work / "cache"), out)
    text = json.dumps(result, indent=1) + "\n"
    if args.update:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
        print(f"wrote {GOLDEN}")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
