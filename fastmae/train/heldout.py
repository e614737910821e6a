"""Held-out images: a fixed set of images never trained on, each with a fixed mask, scored at every log interval.

``HeldOut(files, img_size, grid_size, mask_ratio, device, dtype, mask_strategy)`` decodes the images once (the
evaluation transform: a resize, no augmentation) and fixes one mask per image, drawn as the run's ``mask_strategy``
draws its masks (``fastmae.masking``) but from a seed of its own (``MASK_SEED``; the random strategy from a torch
generator with that seed), so the score of a run does not depend on its seed, every run of the same settings is
scored on the same patches, and a block- or grid-masked run is scored on the masks it learns from.

``score(model)``: the model's loss (the training objective: the mean squared error over the removed patches,
per-patch normalised under ``norm_pix_loss``) on these images and masks. ``baseline``: the same loss of the
flat-patch answer: each removed patch filled with its image's mean colour (raw-pixel loss), or, under
``norm_pix_loss``, with its own mean colour (a prediction of zeros in the normalised space). Both are in the
units of the loss: the squared error of ImageNet-normalised pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastmae.data.eval_transform import ImageFiles, eval_transform
from fastmae.masking import mask_noise_for
from fastmae.model import MaskedAutoencoderViT

MASK_SEED = 0  # the held-out masks' generator: the same patches whatever the run's seed
BATCH = 64  # images per forward pass when scoring


class HeldOut:
    def __init__(self, files: list[Path], img_size: int, grid_size: tuple[int, int], mask_ratio: float,
                 device: torch.device, dtype: torch.dtype = torch.float32, mask_strategy: str = "random") -> None:
        self.files = files
        dataset = ImageFiles(files, eval_transform(img_size))
        self.imgs = torch.stack([dataset[i] for i in range(len(dataset))]).to(device, dtype)  # (N, 3, S, S)
        num_patches = grid_size[0] * grid_size[1]
        if mask_strategy == "random":
            generator = torch.Generator().manual_seed(MASK_SEED)
            self.noise = torch.rand(len(files), num_patches, generator=generator).to(device)  # (N, L)
        else:
            len_keep = int(num_patches * (1 - mask_ratio))  # as the model computes it
            self.noise = mask_noise_for(mask_strategy, len(files), grid_size, len_keep, seed=MASK_SEED,
                                        device=device)  # (N, L)
        self.mask_ratio = mask_ratio
        self.baseline = float("nan")

    def __len__(self) -> int:
        return len(self.files)

    @torch.no_grad()
    def score(self, model: MaskedAutoencoderViT) -> float:
        """The model's mean loss over the held-out images (eval mode, restored after); sets ``baseline`` the
        first time. Every rank must call it under FSDP (the forward gathers the shards)."""
        was_training = model.training
        model.eval()
        total = base = 0.0
        try:
            for start in range(0, len(self.files), BATCH):
                imgs, noise = self.imgs[start:start + BATCH], self.noise[start:start + BATCH]
                loss, pred, mask = model(imgs, mask_ratio=self.mask_ratio, noise=noise)
                total += float(loss) * len(imgs)
                base += float(model.forward_loss(imgs, flat_patches(model, imgs), mask)) * len(imgs)
        finally:
            model.train(was_training)
        self.baseline = base / len(self.files)
        return total / len(self.files)


def flat_patches(model: MaskedAutoencoderViT, imgs: torch.Tensor) -> torch.Tensor:
    """The flat-patch prediction ``(N, L, P)``: each image's mean colour in every patch (raw pixels), or zeros
    under ``norm_pix_loss`` (each patch its own mean colour, once normalised)."""
    n, c = imgs.shape[:2]
    p = model.patch_embed.patch_size[0]
    num_patches = model.patch_embed.num_patches
    if model.norm_pix_loss:
        return imgs.new_zeros(n, num_patches, p * p * c)
    colour = imgs.float().mean(dim=(2, 3))  # (N, C)
    return colour.view(n, 1, 1, c).expand(n, num_patches, p * p, c).reshape(n, num_patches, p * p * c)
