"""The ``fastmae export`` and ``fastmae visualize`` commands: their flags (defined without importing torch, so
``fastmae --help`` stays fast) and what they run (importing what they need).

Exit codes: 0 written; 2 a bad input, said in one line on stderr (a missing file, a file that is no MAE
checkpoint, an architecture that fits no preset or has no name in the target library, a bad flag).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fastmae.train.exit_codes import EXIT_BAD_SETTING

SOURCE_HELP = ("an MAE checkpoint: a fastmae run folder (its newest checkpoint) or checkpoint (ckpt-<step>.pt or an "
               "FSDP ckpt-<step>/ folder), an official MAE file ({'model': state_dict}), a plain MAE state dict "
               "(.pth/.pt/.bin/.safetensors), a Hugging Face ViTMAE folder, or a file written by --from hf")
MODEL_HELP = ("the fastmae preset (as fastmae pretrain --model) when the checkpoint records none and its shapes "
              "match no preset (default: the recorded model, else the preset whose shapes match)")
NORM_PIX_HELP = "whether the model was trained with the norm-pix loss (default: as the checkpoint records, else off)"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``export`` and ``visualize`` subcommands of the ``fastmae`` parser."""
    epilog = f"Exit codes: 0 written; {EXIT_BAD_SETTING} a bad input (said in one line on stderr)."
    add_export_arguments(sub.add_parser(
        "export", help="an MAE checkpoint to timm or Hugging Face, or Hugging Face back to fastmae", epilog=epilog,
        description="Convert an MAE checkpoint: --to timm writes the encoder as a timm ViT state dict and prints "
                    "the timm.create_model call that loads it; --to hf writes a Hugging Face ViTMAEForPreTraining "
                    "folder; --from hf turns such a folder into a fastmae checkpoint file."))
    add_visualize_arguments(sub.add_parser(
        "visualize", help="the paper's Figure 2 (original, masked, reconstruction, + visible) for image files",
        epilog=epilog,
        description="Reconstruct each image through an MAE checkpoint and draw one row of panels per image: the "
                    "original, the masked input, the reconstruction, and the reconstruction with the visible "
                    "patches pasted back."))


def run(args: argparse.Namespace) -> int:
    """Run ``fastmae export`` or ``fastmae visualize``; returns the exit code."""
    return cmd_export(args) if args.command == "export" else cmd_visualize(args)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help=SOURCE_HELP)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=("timm", "hf"),
                           help="timm: the encoder as a timm vit_<size>_patch<p>_224 state dict (the official MAE "
                                "encoders only); hf: the whole MAE as a Hugging Face ViTMAEForPreTraining folder "
                                "(save_pretrained: config.json + model.safetensors), any dimensions")
    direction.add_argument("--from", dest="from_", choices=("hf",),
                           help="hf: a Hugging Face ViTMAE folder (or a weights file in one) back into a fastmae "
                                "checkpoint file {'model': state_dict, 'mae': architecture and loss settings}")
    parser.add_argument("--output", required=True,
                        help="--to timm: a .safetensors (or .pth) file; --to hf: a folder; --from hf: a .pth file")
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--norm-pix-loss", dest="norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                        help=NORM_PIX_HELP + "; --to hf writes it into the config")
    parser.add_argument("--mask-ratio", type=float, default=None,
                        help="--to hf: the config's mask_ratio (default: the checkpoint's, else 0.75)")


def add_visualize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help=SOURCE_HELP.replace("a file written by --from hf",
                                                               "a file written by fastmae export --from hf"))
    parser.add_argument("images", nargs="+", help="image files (resized on the short side and centre-cropped)")
    parser.add_argument("--output", required=True, help="the figure, a .png file")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed [default 0.75]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks [default 0]")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input resolution (default: the checkpoint's; another interpolates the position tables)")
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--norm-pix-loss", dest="norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                        help=NORM_PIX_HELP + "; with it, reconstructions are shown with each patch's mean/std "
                                             "restored from the original")
    parser.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")


def _quiet_hub() -> None:
    """No progress bars from transformers' loading and saving (read when transformers is imported)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _export(args: argparse.Namespace) -> None:
    import torch

    from fastmae.interop.checkpoints import hf_folder, read_checkpoint
    from fastmae.train.checkpoint import write_atomic

    if args.from_ == "hf":
        if not Path(args.source).exists():
            raise FileNotFoundError(f"no such Hugging Face folder or file: {args.source!r}")
        folder = hf_folder(args.source)
        if folder is None:
            raise ValueError(f"--from hf reads a Hugging Face ViTMAE folder (config.json with model_type vit_mae) "
                             f"or a weights file in one, got {args.source!r}")
        if not args.output.endswith((".pth", ".pt")):
            raise ValueError(f"--output must be a .pth or .pt file with --from hf, got {args.output!r}")
        loaded = read_checkpoint(folder, args.model)
        norm_pix = loaded.norm_pix_loss if args.norm_pix_loss is None else args.norm_pix_loss
        record = {**loaded.arch.to_dict(), "norm_pix_loss": norm_pix, "mask_ratio": loaded.mask_ratio}
        state = {"model": loaded.state_dict, "mae": record}
        write_atomic(Path(args.output), lambda f: torch.save(state, f))
        print(f"fastmae export: wrote {args.output}: {loaded.arch.describe()}, norm_pix_loss {norm_pix}, from "
              f"{loaded.source}")
        print(f"load it with: import fastmae.interop.checkpoints; "
              f"model = fastmae.interop.checkpoints.load_mae({args.output!r})")
        if loaded.arch.preset is not None:
            print(f"or: import torch, fastmae.model; model = fastmae.model.{loaded.arch.preset}(img_size="
                  f"{loaded.arch.img_size}, norm_pix_loss={norm_pix}); "
                  f"model.load_state_dict(torch.load({args.output!r})['model'])")
        return
    loaded = read_checkpoint(args.source, args.model)
    if args.to == "timm":
        from fastmae.interop.timm_export import export_timm

        result = export_timm(loaded, args.output)
        print(f"fastmae export: wrote {result.path}: the encoder of {loaded.arch.describe()} ({loaded.source}) as "
              f"timm's {result.model_name}")
        for note in result.notes:
            print(f"note: {note}")
        print(f"load it with: import timm; model = {result.command()}")
        return
    from fastmae.interop.hf import export_hf

    norm_pix = loaded.norm_pix_loss if args.norm_pix_loss is None else args.norm_pix_loss
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else loaded.mask_ratio or 0.75
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in (0, 1), got {mask_ratio}")
    out = export_hf(loaded, args.output, norm_pix_loss=bool(norm_pix), mask_ratio=mask_ratio)
    print(f"fastmae export: wrote {out}/ (config.json, model.safetensors): {loaded.arch.describe()}, norm_pix_loss "
          f"{bool(norm_pix)}, mask_ratio {mask_ratio}, from {loaded.source}")
    if norm_pix is None:
        print("note: the checkpoint does not record norm_pix_loss: written as false (the official default); pass "
              "--norm-pix-loss if it was trained with normalised targets")
    print(f"load it with: from transformers import ViTMAEForPreTraining; "
          f"model = ViTMAEForPreTraining.from_pretrained({str(out)!r})")


def cmd_export(args: argparse.Namespace) -> int:
    _quiet_hub()
    try:
        _export(args)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"fastmae export: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTING
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    _quiet_hub()
    import torch

    from fastmae.visualize import visualize

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        out = visualize(args.checkpoint, args.images, args.output, mask_ratio=args.mask_ratio, seed=args.seed,
                        img_size=args.img_size, model=args.model, norm_pix_loss=args.norm_pix_loss, device=device)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"fastmae visualize: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTING
    print(f"fastmae visualize: wrote {out} ({len(args.images)} image(s))")
    return 0
