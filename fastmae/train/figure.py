"""The reconstruction figure of the paper's Figure 2: original | masked | reconstruction |
reconstruction with the visible patches pasted back, one row per image."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fastmae.data.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from fastmae.model import MaskedAutoencoderViT  # noqa: E402


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float = 0.75,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """``imgs (N, 3, H, W)`` normalised -> the four panels as ``(N, H, W, 3)`` RGB in [0, 1].

    With ``norm_pix_loss`` the model predicts normalised patches; they are shown with each
    patch's true mean and standard deviation put back (the only way to display them).
    """
    model.eval()
    noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=torch.Generator().manual_seed(seed))
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise.to(imgs.device))
    if model.norm_pix_loss:
        target = model.patchify(imgs)  # (N, L, P)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    recon = model.unpatchify(pred.float())  # (N, 3, H, W)
    p = model.patch_embed.patch_size[0]
    pixel_mask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * 3))  # (N, 3, H, W), 1 = removed
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)

    def to_rgb(x: torch.Tensor) -> torch.Tensor:
        return (x.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu()  # (N, H, W, 3)

    return {
        "original": to_rgb(imgs),
        "masked": to_rgb(imgs) * (1 - pixel_mask.permute(0, 2, 3, 1).cpu()) + 0.5 * pixel_mask.permute(0, 2, 3, 1).cpu(),
        "reconstruction": to_rgb(recon),
        "reconstruction + visible": to_rgb(imgs * (1 - pixel_mask) + recon * pixel_mask),
    }


def save_reconstruction_figure(model: MaskedAutoencoderViT, imgs: torch.Tensor, path: str | os.PathLike,
                               mask_ratio: float = 0.75, title: str = "") -> None:
    """Write the four-panel figure for ``imgs`` to ``path`` (PNG)."""
    panels = reconstruct(model, imgs, mask_ratio)
    rows, cols = imgs.shape[0], len(panels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows + 0.4), squeeze=False)
    for c, (name, batch) in enumerate(panels.items()):
        for r in range(rows):
            ax = axes[r][c]
            ax.imshow(batch[r].numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
