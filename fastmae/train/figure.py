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
                seed: int = 0, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``imgs (N, 3, H, W)`` normalised -> the four panels as ``(N, H, W, 3)`` RGB in [0, 1].

    ``noise (N, L)`` fixes the masks (default: drawn from a generator seeded with ``seed``). With
    ``norm_pix_loss`` the model predicts normalised patches; they are shown with each patch's true
    mean and standard deviation put back (the only way to display them).
    """
    was_training = model.training
    model.eval()
    if noise is None:
        noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches,
                           generator=torch.Generator().manual_seed(seed))
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise.to(imgs.device))
    model.train(was_training)
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


def masked_errors(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float,
                  noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the model's loss on its removed patches and that of the flat-patch baseline (``(N,)`` each)."""
    from fastmae.train.heldout import flat_patches

    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses, baselines = [], []
        for i in range(imgs.shape[0]):
            img, n = imgs[i:i + 1], noise[i:i + 1].to(imgs.device)
            loss, _, mask = model(img, mask_ratio=mask_ratio, noise=n)
            losses.append(float(loss))
            baselines.append(float(model.forward_loss(img, flat_patches(model, img), mask)))
    model.train(was_training)
    return torch.tensor(losses), torch.tensor(baselines)


def caption(mask_ratio: float, norm_pix_loss: bool, step: int | None = None, heldout: bool | None = None) -> str:
    """The lines under the panels that say what they show: which images, after how many steps, and each panel."""
    lines = []
    if step is not None or heldout is not None:
        which = {True: "held-out images: crops of photo regions never trained on",
                 False: "training images (no held-out set)", None: "images"}[heldout]
        lines.append(which + (f", after {step} training steps" if step is not None else "")
                     + "; each image's mask is fixed (the same in every run).")
    lines += [f"masked: {mask_ratio:.0%} of the patches removed at random (grey); the model sees only the rest.",
             "reconstruction: the raw prediction; the loss covers removed patches only, so the visible "
             "positions are untrained (whatever the decoder emits there, often noise-like).",
             "reconstruction + visible: the prediction at removed positions, the visible patches pasted back "
             "(the paper's Figure 2)."]
    if norm_pix_loss:
        lines.append("norm-pix loss: the model predicts each patch normalised; its mean and std are taken from the "
                     "original to display it.")
    return "\n".join(lines)


def save_reconstruction_figure(model: MaskedAutoencoderViT, imgs: torch.Tensor, path: str | os.PathLike,
                               mask_ratio: float = 0.75, title: str = "", step: int | None = None,
                               heldout: bool | None = None, noise: torch.Tensor | None = None,
                               labels: list[str] | None = None, note: str = "") -> tuple[float, float]:
    """Write the four-panel figure for ``imgs`` to ``path`` (PNG), a caption under the panels; each row is
    labelled (``labels``) with its masked-patch loss and the flat-patch baseline's. ``step`` and ``heldout``
    (whether the images are held out) go into the caption, and ``note``, a last line; ``noise (N, L)`` fixes
    the masks. The PNG's ``Title`` and ``Description`` text entries hold the title and the caption. Returns the
    mean masked-patch loss over the rows and the baseline's."""
    if noise is None:
        noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=torch.Generator().manual_seed(0))
    panels = reconstruct(model, imgs, mask_ratio, noise=noise)
    errors, baselines = masked_errors(model, imgs, mask_ratio, noise)
    rows, cols = imgs.shape[0], len(panels)
    text = caption(mask_ratio, model.norm_pix_loss, step, heldout)
    text += (f"\nmasked-patch MSE (normalised pixels) under each row; over these {rows} images "
             f"{errors.mean():.3f}, the flat-patch baseline "
             f"({'each patch its own mean colour' if model.norm_pix_loss else 'each image its mean colour'}) "
             f"{baselines.mean():.3f}.")
    if note:
        text += "\n" + note
    caption_height = 0.2 * (text.count("\n") + 1) + 0.2
    size = 1.9
    row_height = size + 0.25  # a square image, and room for the row's MSE line under it
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, row_height * rows + 0.5 + caption_height),
                             squeeze=False)
    for c, (name, batch) in enumerate(panels.items()):
        for r in range(rows):
            ax = axes[r][c]
            ax.imshow(batch[r].numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0 and labels is not None:
                ax.set_ylabel(labels[r], fontsize=7)
            if c == cols - 1:
                ax.set_xlabel(f"MSE {errors[r]:.3f} (flat {baselines[r]:.3f})", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.text(0.01, 0.005, text, fontsize=6.5, va="bottom", ha="left", wrap=True)
    top = 1 - (0.3 / fig.get_figheight() if title else 0)  # room for the title above the column names
    fig.tight_layout(rect=(0, caption_height / fig.get_figheight(), 1, top))
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100, metadata={"Title": title, "Description": text})
    plt.close(fig)
    os.replace(tmp, path)
    return float(errors.mean()), float(baselines.mean())
