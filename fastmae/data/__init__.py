"""Input pipelines: the embedded demo dataset, the pretraining loader (DALI or torch backend), the
fine-tuning and evaluation loaders, and the bad-file policy."""

from fastmae.data.bad_files import BadImageError, scan_images
from fastmae.data.demo import demo_dataset
from fastmae.data.eval import EvalLoader, eval_loader, finetune_loader
from fastmae.data.images import IMAGENET_MEAN, IMAGENET_STD, list_images
from fastmae.data.loader import PretrainLoader, dali_available, pretrain_loader

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadImageError",
    "EvalLoader",
    "PretrainLoader",
    "dali_available",
    "demo_dataset",
    "eval_loader",
    "finetune_loader",
    "list_images",
    "pretrain_loader",
    "scan_images",
]
