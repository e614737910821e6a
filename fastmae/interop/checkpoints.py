"""Any MAE checkpoint read into one form: a state dict with the official keys, the architecture it fits, and what
the checkpoint says about its loss (``norm_pix_loss``) and masking (``mask_ratio``).

Design note. Sources, told apart by what they are and hold:

- a fastmae run folder (``<run>/checkpoints/``: its newest complete checkpoint), a one-file checkpoint
  ``ckpt-<step>.pt`` (``{"model": ..., "optimizer": ..., "step": ...}``) or an FSDP folder ``ckpt-<step>/``
  (DCP shards, read without a process group); the run's ``config.json`` beside ``checkpoints/`` names the preset
  and gives ``norm_pix_loss`` and ``mask_ratio``;
- an official MAE file ``{"model": state_dict}``, whose training checkpoints also hold ``args`` (an
  ``argparse.Namespace`` with ``model``, ``norm_pix_loss``, ``mask_ratio``); the released encoder-only files
  (no decoder) are read too, for ``--to timm``;
- a file written by ``fastmae export --from hf``: ``{"model": state_dict, "mae": architecture and loss settings}``;
- a plain state dict (``.pth``/``.pt``/``.bin`` or ``.safetensors``), keys with or without DDP's ``module.``;
- a Hugging Face ViTMAE folder (``config.json`` with ``model_type`` ``vit_mae``), or a weights file in one
  (``fastmae.interop.hf``).

The number of attention heads cannot be read from tensor shapes, so a checkpoint that does not record its
architecture is matched against the presets by its shapes (patch size, widths, depths, MLP width); no match
is an error that lists them (``--model`` names one). Whatever named the architecture, the state dict is then
checked against it key by key and shape by shape. Nothing arbitrary is unpickled: ``torch.load`` runs with
``weights_only=True``, admitting ``argparse.Namespace`` (the official ``args``) besides tensors and containers.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pickle
import re
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fastmae.model import MaskedAutoencoderViT

RUN_CONFIG = "config.json"  # written by `fastmae pretrain` beside checkpoints/
_ENCODER_PROBES = ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight")
ENCODER_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "norm_eps", "in_chans")


def is_decoder_key(key: str) -> bool:
    """Whether ``key`` (an official MAE state-dict key) belongs to the decoder."""
    return key == "mask_token" or key.startswith("decoder_")


@dataclass(frozen=True)
class MaeArch:
    """The constructor arguments of a ``MaskedAutoencoderViT``; the decoder fields are None for an encoder-only
    checkpoint. ``preset`` is the fastmae preset with these dimensions (its official short name), if any."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int | None
    decoder_depth: int | None
    decoder_num_heads: int | None
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    in_chans: int = 3
    preset: str | None = None

    @property
    def has_decoder(self) -> bool:
        return self.decoder_embed_dim is not None

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size

    def describe(self) -> str:
        """One line: the preset (or "custom") and the dimensions."""
        decoder = (f"decoder width {self.decoder_embed_dim} x {self.decoder_depth} blocks" if self.has_decoder
                   else "no decoder")
        return (f"{self.preset or 'custom architecture'} (patch {self.patch_size}, width {self.embed_dim} x "
                f"{self.depth} blocks, {decoder}, {self.img_size} px)")

    def same_dims(self, other: MaeArch) -> bool:
        """Equal in everything but ``img_size`` and ``preset``."""
        ignore = {"img_size", "preset"}
        return all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self)
                   if f.name not in ignore)

    def same_encoder(self, other: MaeArch) -> bool:
        """Equal in the encoder's dimensions (``ENCODER_FIELDS``)."""
        return all(getattr(self, name) == getattr(other, name) for name in ENCODER_FIELDS)

    def without_decoder(self) -> MaeArch:
        return dataclasses.replace(self, decoder_embed_dim=None, decoder_depth=None, decoder_num_heads=None)

    def build(self, norm_pix_loss: bool = False, img_size: int | None = None) -> MaskedAutoencoderViT:
        """The MAE of this architecture (at ``img_size``, default its own), freshly initialised."""
        if not self.has_decoder:
            raise ValueError(f"this checkpoint has no decoder ({self.describe()}): it holds an encoder only (as the "
                             "released mae_pretrain_vit_*.pth files do), enough for --to timm but not for a whole MAE")
        return MaskedAutoencoderViT(
            img_size=img_size or self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
            embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
            decoder_embed_dim=self.decoder_embed_dim, decoder_depth=self.decoder_depth,
            decoder_num_heads=self.decoder_num_heads, mlp_ratio=self.mlp_ratio,
            norm_layer=partial(nn.LayerNorm, eps=self.norm_eps), norm_pix_loss=norm_pix_loss)

    def expected_shapes(self) -> dict[str, torch.Size]:
        """The state-dict keys of this architecture and their shapes (built on the meta device: no memory);
        encoder keys only without a decoder."""
        arch = self if self.has_decoder else dataclasses.replace(self, decoder_embed_dim=8, decoder_depth=1,
                                                                 decoder_num_heads=1)
        with torch.device("meta"):
            model = arch.build()
        return {k: v.shape for k, v in model.state_dict().items() if self.has_decoder or not is_decoder_key(k)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MaeArch:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or not set(values) <= names:
            raise ValueError(f"an architecture record holds the keys {sorted(names)}, got "
                             f"{sorted(values) if isinstance(values, dict) else type(values).__name__}")
        return cls(**values)


def _arch_of(model: MaskedAutoencoderViT, preset: str | None) -> MaeArch:
    """The architecture of a built model."""
    embed_dim = model.cls_token.shape[-1]
    return MaeArch(img_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
                   embed_dim=embed_dim, depth=len(model.blocks), num_heads=model.blocks[0].attn.num_heads,
                   decoder_embed_dim=model.mask_token.shape[-1], decoder_depth=len(model.decoder_blocks),
                   decoder_num_heads=model.decoder_blocks[0].attn.num_heads,
                   mlp_ratio=model.blocks[0].mlp.fc1.out_features / embed_dim, norm_eps=model.norm.eps,
                   in_chans=model.patch_embed.in_chans, preset=preset)


@functools.cache
def preset_archs() -> dict[str, MaeArch]:
    """Every fastmae preset (the official ones under their short names, and the demo's) -> its architecture at
    224 px, read from the factories (built on the meta device)."""
    from fastmae.train.config import model_presets

    names: dict[object, str] = {}
    for name, factory in model_presets().items():
        names[factory] = name  # an alias listed later (the official short name) wins
    with torch.device("meta"):
        return {name: _arch_of(factory(img_size=224), name) for factory, name in names.items()}


def preset_arch(name: str, img_size: int) -> MaeArch:
    """The architecture of the preset ``name`` (any name ``fastmae pretrain --model`` takes) at ``img_size``."""
    from fastmae.train.config import model_presets

    factories = model_presets()
    if name not in factories:
        raise ValueError(f"--model must be a fastmae preset ({', '.join(preset_archs())}), got {name!r}")
    canonical = next(n for n, a in preset_archs().items() if factories[n] is factories[name])
    return dataclasses.replace(preset_archs()[canonical], img_size=img_size)


def _block_count(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(rf"^{prefix}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _img_size(state_dict: dict[str, torch.Tensor], patch_size: int) -> int:
    """The training resolution, from the encoder's position table ``(1, 1+L, D)`` (a square grid)."""
    tokens = state_dict["pos_embed"].shape[1] - 1
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"pos_embed holds {tokens} patch positions, not a square grid: fastmae reads square "
                         "images only")
    return side * patch_size


def _check_mae_keys(state_dict: dict[str, torch.Tensor]) -> None:
    missing = [k for k in _ENCODER_PROBES if k not in state_dict]
    if missing:
        sample = ", ".join(list(state_dict)[:5])
        raise ValueError(f"not an MAE checkpoint: expected the official MAE keys ({', '.join(_ENCODER_PROBES)}, "
                         f"...), missing {', '.join(missing)}; its keys start {sample}")


def infer_arch(state_dict: dict[str, torch.Tensor]) -> MaeArch:
    """The preset whose shapes the state dict has (patch size, widths, depths, MLP width; the decoder's when the
    checkpoint has one), at the resolution of its position table. ValueError when none or several match."""
    _check_mae_keys(state_dict)
    width, in_chans, patch, _ = state_dict["patch_embed.proj.weight"].shape  # (D, C, p, p)
    depth = _block_count(state_dict, "blocks")
    mlp = state_dict["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state_dict else None
    has_decoder = "decoder_embed.weight" in state_dict
    decoder = (state_dict["decoder_embed.weight"].shape[0] if has_decoder else None,
               _block_count(state_dict, "decoder_blocks"))
    found = f"patch {patch}, width {width} x {depth} blocks, MLP {mlp}" + (
        f", decoder width {decoder[0]} x {decoder[1]} blocks" if has_decoder else ", no decoder")
    matches = [a for a in preset_archs().values()
               if (a.patch_size, a.embed_dim, a.depth, a.in_chans, int(a.embed_dim * a.mlp_ratio))
               == (patch, width, depth, in_chans, mlp)
               and (not has_decoder or (a.decoder_embed_dim, a.decoder_depth) == decoder)]
    if len(matches) != 1:
        known = "; ".join(f"{a.preset}: patch {a.patch_size}, width {a.embed_dim} x {a.depth}, decoder "
                          f"{a.decoder_embed_dim} x {a.decoder_depth}" for a in preset_archs().values())
        what = "matches no preset" if not matches else f"matches several presets ({', '.join(a.preset for a in matches)})"
        raise ValueError(f"the checkpoint's architecture ({found}) {what}, and it does not record its model: "
                         f"pass --model with one of the presets ({known})")
    arch = dataclasses.replace(matches[0], img_size=_img_size(state_dict, patch))
    return arch if has_decoder else arch.without_decoder()


def check_state_dict(state_dict: dict[str, torch.Tensor], arch: MaeArch) -> None:
    """ValueError naming the keys the state dict lacks, has beyond ``arch``'s, or holds in another shape."""
    expected = arch.expected_shapes()
    problems = [f"{k} is {tuple(state_dict[k].shape)}, expected {tuple(shape)}"
                for k, shape in expected.items() if k in state_dict and state_dict[k].shape != shape]
    problems += [f"missing {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in expected]
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise ValueError(f"the checkpoint does not fit {arch.describe()}: {'; '.join(problems[:6])}{more}")


@dataclass
class LoadedMAE:
    """A checkpoint read by :func:`read_checkpoint`. ``norm_pix_loss`` and ``mask_ratio`` are None where the
    checkpoint does not record them; ``source`` says what was read."""

    state_dict: dict[str, torch.Tensor]
    arch: MaeArch
    norm_pix_loss: bool | None
    mask_ratio: float | None
    source: str

    def model(self, img_size: int | None = None, norm_pix_loss: bool | None = None) -> MaskedAutoencoderViT:
        """The MAE with these weights, loaded strictly (the position tables interpolated at another ``img_size``);
        ``norm_pix_loss`` defaults to the recorded one, else False (the official constructor's default)."""
        if norm_pix_loss is None:
            norm_pix_loss = bool(self.norm_pix_loss)
        model = self.arch.build(norm_pix_loss=norm_pix_loss, img_size=img_size)
        model.load_state_dict(self.state_dict, strict=True)  # copies (and casts to the model's fp32)
        return model


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, damaged, or pickling more than weights
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
            hint = (". It holds objects other than tensors and plain containers; if you trust the file, load it "
                    "yourself (torch.load(path, map_location='cpu', weights_only=False)) and pass the dict")
        raise ValueError(f"cannot read {str(path)!r} as a checkpoint (torch.load with weights_only=True): "
                         f"{first}{hint}") from None


def _run_settings(config_path: Path) -> dict[str, Any]:
    """``model``, ``norm_pix_loss`` and ``mask_ratio`` from a fastmae run's ``config.json`` (empty if absent)."""
    if not config_path.is_file():
        return {}
    config = json.loads(config_path.read_text())
    return {k: config[k] for k in ("model", "norm_pix_loss", "mask_ratio") if config.get(k) is not None}


def read_sharded_model(folder: Path) -> dict[str, torch.Tensor]:
    """The model state of an FSDP checkpoint folder ``ckpt-<step>/``, gathered in this one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from fastmae.train.sharded import SafeFileSystemReader, SafeLoadPlanner

    reader = SafeFileSystemReader(folder)
    metadata = reader.read_metadata()
    state = {key.removeprefix("model."): torch.empty(item.size, dtype=item.properties.dtype)
             for key, item in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}
    if not state:
        raise ValueError(f"{str(folder)!r} holds no model state (a DCP folder with model.* entries was expected)")
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load({"model": state}, storage_reader=SafeFileSystemReader(folder), planner=SafeLoadPlanner())
    return state


def _hf_config(folder: Path) -> dict[str, Any] | None:
    """The folder's ``config.json`` if it is a Hugging Face one (it has a ``model_type``)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config if isinstance(config, dict) and "model_type" in config else None


def hf_folder(path: str | Path) -> Path | None:
    """The Hugging Face ViTMAE folder ``path`` is, or holds as a weights file (``.safetensors``/``.bin``); None when
    it is neither. ValueError for a Hugging Face folder of another model type."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = _hf_config(folder)
    if config is None or not (path.is_dir() or path.suffix in (".safetensors", ".bin")):
        return None
    if config["model_type"] != "vit_mae":
        raise ValueError(f"{str(folder)!r} is a Hugging Face {config['model_type']!r} model, not vit_mae")
    return folder


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """``(state_dict, recorded settings, description)`` of a fastmae/official/plain checkpoint file or folder (a
    run folder or its ``checkpoints/``: the newest complete checkpoint), as the module's note lists them; ValueError
    for anything else. The state dict is returned as saved (keys not checked against an architecture)."""
    from fastmae.train.checkpoint import COMMIT_MARKER, checkpoint_step, list_checkpoints

    if path.is_dir():
        if (path / COMMIT_MARKER).is_file():
            settings = _run_settings(path.parent.parent / RUN_CONFIG) if path.parent.name == "checkpoints" else {}
            return read_sharded_model(path), settings, f"fastmae FSDP checkpoint {path} (step {checkpoint_step(path)})"
        for folder in (path / "checkpoints", path):
            found = list_checkpoints(folder) if folder.is_dir() else []
            if found:
                return read_state_dict(found[-1])
        if (path / "checkpoints").is_dir():
            raise ValueError(f"the run folder {str(path)!r} holds no complete checkpoint in checkpoints/")
        raise ValueError(f"a folder to read must be a fastmae run folder (with checkpoints/), its checkpoints/ folder, "
                         f"an FSDP checkpoint folder ckpt-<step>/ (with {COMMIT_MARKER}) or a Hugging Face ViTMAE "
                         f"folder (config.json with model_type vit_mae), got {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path), {}, f"safetensors state dict {path}"
        except Exception as exc:  # safetensors' own error type: a damaged or foreign file
            raise ValueError(f"cannot read {str(path)!r} as a safetensors file: {exc}") from None
    obj = _torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state = obj["model"]
        if isinstance(obj.get("mae"), dict):  # written by `fastmae export --from hf`
            return state, obj["mae"], f"fastmae MAE file {path}"
        if isinstance(obj.get("args"), argparse.Namespace):  # an official training checkpoint
            args = vars(obj["args"])
            settings = {k: args[k] for k in ("model", "norm_pix_loss", "mask_ratio") if k in args}
            return state, settings, f"official MAE checkpoint {path} (epoch {obj.get('epoch', '?')})"
        if "optimizer" in obj and "step" in obj:  # a fastmae pretraining checkpoint
            settings = _run_settings(path.parent.parent / RUN_CONFIG) if path.parent.name == "checkpoints" else {}
            return state, settings, f"fastmae checkpoint {path} (step {obj['step']})"
        return state, {}, f"MAE checkpoint {path}"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # e.g. a Lightning-style file
        return obj["state_dict"], {}, f"checkpoint {path} (its 'state_dict')"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}, f"state dict {path}"
    raise ValueError(f"{str(path)!r} is no MAE checkpoint: expected a state dict or {{'model': state_dict}}, got "
                     f"{type(obj).__name__}" + (f" with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else ""))


def read_checkpoint(path: str | Path, model: str | None = None) -> LoadedMAE:
    """Read any MAE checkpoint (see the module's note) and check it against its architecture.

    ``model`` (a preset name) overrides what the checkpoint records or its shapes suggest. Raises
    FileNotFoundError for a missing path and ValueError for anything that is no MAE checkpoint, or fits no
    preset without ``model``, or does not fit the architecture named.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint file or folder: {str(path)!r}")
    folder = hf_folder(path)
    if folder is not None:
        from fastmae.interop.hf import read_hf

        loaded = read_hf(folder)
        if model is not None:
            loaded.arch = _named(model, loaded.arch, loaded.source)
        return loaded
    state, settings, source = read_state_dict(path)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source}: the state dict holds non-tensor values")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}
    _check_mae_keys(state)
    has_decoder = "decoder_embed.weight" in state
    name = model or settings.get("model")
    if "embed_dim" in settings:  # a full architecture record (fastmae export --from hf)
        arch = MaeArch.from_dict({k: settings[k] for k in settings if k not in ("norm_pix_loss", "mask_ratio")})
        if model is not None:
            arch = _named(model, arch, source)
    elif name is not None and (model is not None or _is_preset(name)):
        patch = state["patch_embed.proj.weight"].shape[-1]
        arch = preset_arch(name, _img_size(state, patch))
        arch = arch if has_decoder else arch.without_decoder()
    else:
        arch = infer_arch(state)
    check_state_dict(state, arch)
    return LoadedMAE(state, arch, settings.get("norm_pix_loss"), settings.get("mask_ratio"), source)


def _named(model: str, arch: MaeArch, source: str) -> MaeArch:
    """The preset ``model`` in place of a recorded architecture, which it must equal."""
    named = preset_arch(model, arch.img_size)
    fits = named.same_dims(arch) if arch.has_decoder else named.same_encoder(arch)
    if not fits:
        raise ValueError(f"--model {model} is {named.describe()}, but {source} is {arch.describe()}")
    return named if arch.has_decoder else named.without_decoder()


def _is_preset(name: str) -> bool:
    from fastmae.train.config import model_presets

    return name in model_presets()


def load_mae(path: str | Path, model: str | None = None, img_size: int | None = None,
             norm_pix_loss: bool | None = None) -> MaskedAutoencoderViT:
    """``fastmae.MAE`` with the weights of any MAE checkpoint (see :func:`read_checkpoint`), loaded strictly."""
    return read_checkpoint(path, model).model(img_size=img_size, norm_pix_loss=norm_pix_loss)
