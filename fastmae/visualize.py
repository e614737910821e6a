"""``fastmae visualize``: the paper's Figure 2 panels (original, masked, reconstruction, reconstruction with the
visible patches) for image files through any MAE checkpoint.

Design note. The checkpoint is read by ``fastmae.interop.checkpoints`` (a fastmae run, an official file, a plain
state dict, a Hugging Face ViTMAE folder or its conversion back) and the figure is the one ``fastmae pretrain``
draws (``fastmae.train.figure``). Images go through the evaluation transform (short side resized, centre
crop); each image's mask comes from one generator seeded with ``seed``, so a command repeats its figure. Under
``norm_pix_loss`` the model predicts each patch normalised: the figure shows it with the mean and standard
deviation of the original image's patch restored, as the official demo notebook does, and its title and caption
say so. Where the checkpoint does not record ``norm_pix_loss`` it is taken as off (the official constructor's
default) and the caption says that it was assumed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastmae.data.eval_transform import ImageFiles, eval_transform
from fastmae.interop.checkpoints import read_checkpoint
from fastmae.train.figure import save_reconstruction_figure

NORM_PIX_TITLE = "norm-pix (see below)"


def visualize(checkpoint: str | Path, images: list[str | Path], output: str | Path, mask_ratio: float = 0.75,
              seed: int = 0, img_size: int | None = None, model: str | None = None,
              norm_pix_loss: bool | None = None, device: str | torch.device = "cpu") -> Path:
    """Draw the reconstruction figure of ``images`` through ``checkpoint`` into ``output`` (a ``.png``).

    ``img_size`` defaults to the checkpoint's resolution (another one interpolates the position tables);
    ``model`` names the preset when the checkpoint does not; ``norm_pix_loss`` overrides the recorded setting.
    Raises FileNotFoundError for a missing checkpoint or image, ValueError for bad settings or checkpoints.
    """
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise ValueError(f"--output must be a .png file, got {str(output)!r}")
    files = [Path(f) for f in images]
    if not files:
        raise ValueError("give at least one image file")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file: {', '.join(missing)}")
    loaded = read_checkpoint(checkpoint, model)
    size = img_size or loaded.arch.img_size
    if size % loaded.arch.patch_size:
        raise ValueError(f"--img-size must be a multiple of the patch size {loaded.arch.patch_size}, got {size}")
    num_patches = (size // loaded.arch.patch_size) ** 2
    len_keep = int(num_patches * (1 - mask_ratio))
    if not 0.0 < mask_ratio < 1.0 or not 1 <= len_keep < num_patches:
        raise ValueError(f"--mask-ratio must keep at least one of the {num_patches} patches and remove at least one, "
                         f"got {mask_ratio}")
    norm_pix = loaded.norm_pix_loss if norm_pix_loss is None else norm_pix_loss
    note = ""
    if norm_pix is None:
        norm_pix = False
        note = ("norm_pix_loss is not recorded in this checkpoint: taken as off (the official default); run with "
                "--norm-pix-loss if it was trained with normalised targets.")
    mae = loaded.model(img_size=size, norm_pix_loss=norm_pix).to(device)
    dataset = ImageFiles(files, eval_transform(size))
    try:
        imgs = torch.stack([dataset[i] for i in range(len(dataset))]).to(device)  # (N, 3, S, S)
    except RuntimeError as exc:  # ImageFiles: a file PIL cannot decode, named
        raise ValueError(str(exc)) from None
    noise = torch.rand(len(files), num_patches, generator=torch.Generator().manual_seed(seed))  # (N, L)
    title = f"{Path(checkpoint).name}: {loaded.arch.preset or 'custom MAE'}, {size} px, mask {mask_ratio}, seed {seed}"
    if norm_pix:
        title += f", {NORM_PIX_TITLE}"
    save_reconstruction_figure(mae, imgs, output, mask_ratio, title=title, noise=noise,
                               labels=[f"{f.parent.name}/{f.name}" for f in files], note=note)
    return output
