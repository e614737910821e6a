"""Input pipelines: the embedded demo dataset and the pretraining loader."""

from fastmae.data.demo import demo_dataset
from fastmae.data.loader import IMAGENET_MEAN, IMAGENET_STD, list_images, pretrain_loader

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "demo_dataset", "list_images", "pretrain_loader"]
