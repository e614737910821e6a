"""The MAE encoder as a timm ``vit_<size>_patch<p>_224`` state dict.

Design note. fastmae's encoder keys are timm's ``VisionTransformer`` keys (``cls_token``, ``pos_embed`` with the
cls position first, ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``), and timm computes the same function (cls token prepended, position table added, pre-LN blocks with
the exact GELU and LayerNorm eps 1e-6, the final norm), so the export is the encoder's tensors as they are: the
decoder and ``mask_token`` are left out (a ``mask_token`` key would also send timm's loader down its DINOv2
conversion). ``forward_features`` then equals ``MAE.forward_encoder`` with nothing masked, token for token.

How timm 1.0 loads it (``timm.models._builder.load_pretrained``): ``pretrained_cfg_overlay=dict(file=...)``
reads the file (``.safetensors`` by its suffix, else ``torch.load(weights_only=True)``), resets the registry's
``custom_load`` (an ``.npz`` loader for some tags), runs the ViT's ``checkpoint_filter_fn`` (which resamples
``pos_embed`` when the model is built for another resolution), and then, when the model's ``num_classes``
differs from the pretrained config's (1000 for most tags), drops the classifier keys and loads with
``strict=False``. The printed command therefore puts ``num_classes=0`` into the overlay too: with the model's
``num_classes=0`` the load is strict. With ``num_classes=1000`` (fine-tuning) the head is new and the rest loads.
The overlay also gives the ImageNet mean/std the MAE was trained with (the registry's tags say 0.5).

Only the official MAE encoders have a timm name (``--to hf`` takes any dimensions): ViT-Ti/S/B/L 16 and ViT-H 14.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastmae.data.images import IMAGENET_MEAN, IMAGENET_STD
from fastmae.interop.checkpoints import LoadedMAE, MaeArch, is_decoder_key, preset_archs
from fastmae.train.checkpoint import write_atomic

TIMM_NORM_EPS = 1e-6  # timm's ViT LayerNorm
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def timm_names() -> dict[str, str]:
    """Each official preset with a timm ViT of the same encoder -> that timm model name."""
    names = {}
    for preset in preset_archs():
        match = re.fullmatch(r"mae_vit_(tiny|small|base|large|huge)_patch(\d+)", preset)
        if match is not None:
            names[preset] = f"vit_{match.group(1)}_patch{match.group(2)}_224"
    return names


def timm_name(arch: MaeArch) -> str:
    """The timm model with ``arch``'s encoder; ValueError naming the supported ones when there is none."""
    archs = preset_archs()
    probe = dataclasses.replace(arch, norm_eps=TIMM_NORM_EPS)  # another eps: a note, not a refusal
    for preset, name in timm_names().items():
        if archs[preset].same_encoder(probe):
            return name
    supported = "; ".join(f"{p} (patch {archs[p].patch_size}, width {archs[p].embed_dim} x {archs[p].depth}) -> {n}"
                          for p, n in timm_names().items())
    raise ValueError(f"timm has no ViT with this encoder ({arch.describe()}): --to timm supports the official MAE "
                     f"encoders: {supported}. --to hf takes any dimensions")


def timm_state_dict(loaded: LoadedMAE) -> dict[str, torch.Tensor]:
    """The encoder's tensors under their (identical) timm keys, contiguous."""
    return {k: v.detach().contiguous() for k, v in loaded.state_dict.items() if not is_decoder_key(k)}


@dataclass
class TimmExport:
    """What :func:`export_timm` wrote: the file, the timm model, ``timm.create_model``'s arguments that load it,
    and notes for the user."""

    path: Path
    model_name: str
    create_kwargs: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def command(self) -> str:
        """The Python call that builds the timm model with these weights."""
        def render(value: object) -> str:
            if isinstance(value, dict):
                return "dict(" + ", ".join(f"{k}={render(v)}" for k, v in value.items()) + ")"
            return repr(value)

        args = ", ".join(f"{k}={render(v)}" for k, v in self.create_kwargs.items())
        return f"timm.create_model({self.model_name!r}, {args})"


def create_kwargs(path: str | Path, img_size: int) -> dict[str, Any]:
    """``timm.create_model``'s keyword arguments that load the file ``path`` strictly, headless."""
    kwargs: dict[str, Any] = {
        "pretrained": True,
        "pretrained_cfg_overlay": {"file": str(path), "num_classes": 0, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "num_classes": 0,
    }
    if img_size != 224:
        kwargs["img_size"] = img_size
    return kwargs


def export_timm(loaded: LoadedMAE, output: str | Path) -> TimmExport:
    """Write the encoder of ``loaded`` to ``output`` (``.safetensors``, or ``.pth``/``.pt``/``.bin`` for
    ``torch.save``); returns what was written and how timm loads it."""
    output = Path(output)
    if output.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"--output must end in {', '.join(WEIGHT_SUFFIXES)} (safetensors, or torch.save for the "
                         f"others), got {str(output)!r}")
    name = timm_name(loaded.arch)
    state = timm_state_dict(loaded)
    if output.suffix == ".safetensors":
        from safetensors.torch import save

        blob = save(state, metadata={"format": "pt", "timm_model": name, "source": loaded.source})
        write_atomic(output, lambda f: f.write(blob))
    else:
        write_atomic(output, lambda f: torch.save(state, f))
    notes = []
    if loaded.arch.norm_eps != TIMM_NORM_EPS:
        notes.append(f"this encoder's LayerNorm eps is {loaded.arch.norm_eps:g}, timm's ViT uses {TIMM_NORM_EPS:g}: "
                     "its features differ from the checkpoint's by the eps change (about 1e-6 relative)")
    if loaded.arch.img_size != 224:
        notes.append(f"trained at {loaded.arch.img_size} px: the command builds the model for that size; "
                     "without img_size, timm resamples the position table to 224 px")
    return TimmExport(output, name, create_kwargs(output, loaded.arch.img_size), notes)
