"""The MAE encoder as an image classifier: the official MAE ``models_vit.VisionTransformer``, computed through
:mod:`fastmae.ops`, and the loading of pretrained encoders into it.

Design note. The official fine-tuning model is timm's ``VisionTransformer`` with one change, global pooling:
the mean of the patch tokens (cls token left out) through a fresh ``fc_norm``, the encoder's final ``norm``
removed. This module keeps that model's constructor, ``state_dict`` keys (timm's: ``cls_token``, a learned
``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``fc_norm`` or ``norm``, ``head``) and numbers, but builds it from the MAE's own pieces (``fastmae.model``:
``PatchEmbed``, ``Block`` with ``ops.attention``/``ops.layer_norm``/``ops.linear_gelu``, ``apply_norm``), so
fine-tuning runs on the same kernels and backends as pretraining. Dropout (timm's ``drop_rate``,
``pos_drop_rate``, ``attn_drop_rate``) is left out: the official recipes keep it at 0. Stochastic depth is
``Block``'s ``drop_path``.

:func:`load_pretrained` reproduces the official ``main_finetune.py`` loading (drop a head of another shape,
interpolate ``pos_embed`` to the model's grid, load the rest, expect exactly ``head`` and, with global pooling,
``fc_norm`` to be missing) with clear errors where the official code asserts or loads something else silently.

Shapes: N batch, C channels, (H, W) image, p patch, (h, w) = (H/p, W/p) grid, L = h*w patches, D width,
K classes.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from fastmae.model import Block, PatchEmbed, apply_norm, check_imgs
from fastmae.pos_embed import grid_for, interpolate_pos_embed

FINETUNE_HEAD_STD = 2e-5  # official main_finetune.py: trunc_normal_(head.weight, std=2e-5) after loading
LINPROBE_HEAD_STD = 0.01  # official main_linprobe.py (following MoCo v3)


class VisionTransformer(nn.Module):
    """ViT classifier with the official MAE ``models_vit`` semantics. ``global_pool`` defaults to True here, the
    official fine-tuning default (``main_finetune.py``); the official class's own default, and linear probing's
    (``main_linprobe.py``), is False.

    ``global_pool=True``: logits = ``head(fc_norm(mean of the patch tokens after the blocks))``; the model has
    ``fc_norm`` and no ``norm``. ``global_pool=False``: logits = ``head(norm(tokens)[:, 0])`` (the cls token);
    the model has ``norm`` and no ``fc_norm``. ``num_classes=0`` makes ``head`` an ``nn.Identity`` (features).

    Initialisation (:meth:`init_weights`): timm 1.0.31's default ``VisionTransformer.init_weights`` mode ('',
    ``init_weights_vit_timm``): ``pos_embed`` truncated normal std 0.02, ``cls_token`` normal std 1e-6, every
    Linear (head included) truncated normal std 0.02 with zero bias, LayerNorms 1 / 0 and the patch
    projection (a Conv2d) PyTorch's default init. Truncation is at +-2 (absolute), as timm's and torch's
    ``trunc_normal_``. (The official code ran on timm 0.3.2, whose init differs only in ``cls_token``: truncated
    normal std 0.02; loading pretrained weights overwrites it.) After loading pretrained weights, :func:`init_head` gives the head the official
    fine-tuning (``FINETUNE_HEAD_STD``) or linear-probing (``LINPROBE_HEAD_STD``) init.

    ``drop_path_rate``: stochastic depth rising linearly over the blocks, ``torch.linspace(0, rate, depth)``
    (timm's rule), applied per sample in training only.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 global_pool: bool = True, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        for name, value, low in (("num_classes", num_classes, 0), ("embed_dim", embed_dim, 1), ("depth", depth, 1),
                                 ("num_heads", num_heads, 1), ("in_chans", in_chans, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(drop_path_rate, numbers.Real) or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be a number in [0, 1), got {drop_path_rate!r}")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.global_pool = bool(global_pool)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))  # learned
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # timm's calculate_drop_path_rates
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer,
                                           drop_path=rate) for rate in rates])
        if self.global_pool:
            self.fc_norm = norm_layer(embed_dim)
        else:
            self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @property
    def depth(self) -> int:
        """The number of blocks."""
        return len(self.blocks)

    def init_weights(self) -> None:
        """(Re)initialise every weight as timm 1.0.31's default ViT init (see the class docstring)."""
        with torch.no_grad():
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
            self.patch_embed.proj.reset_parameters()
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                    module.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """Parameter names the official recipes exempt from weight decay (besides biases and norms)."""
        return {"pos_embed", "cls_token"}

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``imgs (N, C, H, W)`` -> every token after the blocks, ``(N, 1+L, D)`` (cls first). Without global
        pooling these are after the final ``norm``; with it they are the blocks' raw output (the model has no
        ``norm``; ``fc_norm`` applies to the pooled vector only)."""
        x = check_imgs(x, self.patch_embed, self.cls_token.device)
        x = self.patch_embed(x) + self.pos_embed[:, 1:]  # (N, L, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (N, 1, D)
        x = torch.cat([cls, x], dim=1)  # (N, 1+L, D)
        for block in self.blocks:
            x = block(x)
        return x if self.global_pool else apply_norm(self.norm, x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``imgs (N, C, H, W)`` -> the pooled, normalised features ``(N, D)`` the head reads: ``fc_norm`` of the
        mean patch token with global pooling, else the normalised cls token."""
        tokens = self.forward_tokens(x)  # (N, 1+L, D)
        if self.global_pool:
            return apply_norm(self.fc_norm, tokens[:, 1:].mean(dim=1))  # (N, L, D) -> (N, D)
        return tokens[:, 0]  # (N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``imgs (N, C, H, W)`` -> logits ``(N, num_classes)`` (features ``(N, D)`` when ``num_classes=0``)."""
        return self.head(self.forward_features(x))


def init_head(model: VisionTransformer, std: float) -> None:
    """Re-initialise the classifier: head weight truncated normal with ``std`` (cut at +-2, absolute), bias 0.

    The official recipes call this after loading pretrained weights: ``FINETUNE_HEAD_STD`` (2e-5) for fine-tuning,
    ``LINPROBE_HEAD_STD`` (0.01) for linear probing. ``model.head`` must hold exactly one ``nn.Linear`` (a plain
    head, or a ``Sequential`` such as linear probing's BatchNorm + Linear)."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a fastmae.vit.VisionTransformer, got {type(model).__name__}")
    if not isinstance(std, numbers.Real) or not std > 0:
        raise ValueError(f"std must be a positive number, got {std!r}")
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise ValueError(f"model.head must hold exactly one nn.Linear to initialise, got {len(linears)} "
                         f"(head: {type(model.head).__name__}; num_classes={model.num_classes})")
    with torch.no_grad():
        nn.init.trunc_normal_(linears[0].weight, std=float(std))
        if linears[0].bias is not None:
            nn.init.zeros_(linears[0].bias)


# ------------------------------------------------------------------------------------------------ presets
_LN_EPS6 = partial(nn.LayerNorm, eps=1e-6)


def _vit(patch_size: int, embed_dim: int, depth: int, num_heads: int, **kwargs) -> VisionTransformer:  # noqa: ANN003
    return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             mlp_ratio=4.0, qkv_bias=True, norm_layer=_LN_EPS6, **kwargs)


def vit_tiny_patch16(**kwargs) -> VisionTransformer:  # noqa: ANN003
    """ViT-Ti/16: 192 wide, 12 blocks, 3 heads (the encoder of ``mae_vit_tiny_patch16_dec128d2b``)."""
    return _vit(16, 192, 12, 3, **kwargs)


def vit_small_patch16(**kwargs) -> VisionTransformer:  # noqa: ANN003
    """ViT-S/16: 384 wide, 12 blocks, 6 heads (the encoder of ``mae_vit_small_patch16_dec256d4b``)."""
    return _vit(16, 384, 12, 6, **kwargs)


def vit_base_patch16(**kwargs) -> VisionTransformer:  # noqa: ANN003
    """ViT-B/16: 768 wide, 12 blocks, 12 heads (the paper's; encoder of ``mae_vit_base_patch16_dec512d8b``)."""
    return _vit(16, 768, 12, 12, **kwargs)


def vit_large_patch16(**kwargs) -> VisionTransformer:  # noqa: ANN003
    """ViT-L/16: 1024 wide, 24 blocks, 16 heads (the paper's; encoder of ``mae_vit_large_patch16_dec512d8b``)."""
    return _vit(16, 1024, 24, 16, **kwargs)


def vit_huge_patch14(**kwargs) -> VisionTransformer:  # noqa: ANN003
    """ViT-H/14: 1280 wide, 32 blocks, 16 heads (the paper's; encoder of ``mae_vit_huge_patch14_dec512d8b``)."""
    return _vit(14, 1280, 32, 16, **kwargs)


def vit_demo_patch8(**kwargs) -> VisionTransformer:  # noqa: ANN003
    """Demo-only: 8 px patches, 128 wide, 4 blocks, 4 heads (the encoder of ``mae_vit_demo_patch8_dec128d2b``)."""
    return _vit(8, 128, 4, 4, **kwargs)


VIT_PRESETS: dict[str, Callable[..., VisionTransformer]] = {
    f.__name__: f for f in (vit_tiny_patch16, vit_small_patch16, vit_base_patch16, vit_large_patch16,
                            vit_huge_patch14, vit_demo_patch8)
}


def vit_preset_for(mae_model_name: str) -> str:
    """The ViT preset whose model is the encoder of the MAE preset ``mae_model_name`` (any name of
    ``fastmae.model.PRESETS`` or the demo preset): ``mae_vit_base_patch16_dec512d8b`` and
    ``mae_vit_base_patch16`` -> ``vit_base_patch16``. A ViT preset name maps to itself."""
    from fastmae.train.config import model_presets

    if mae_model_name in VIT_PRESETS:
        return mae_model_name
    if isinstance(mae_model_name, str) and mae_model_name in model_presets():
        vit_name = "vit_" + mae_model_name.removeprefix("mae_vit_").split("_dec")[0]
        if vit_name in VIT_PRESETS:
            return vit_name
    raise ValueError(f"no ViT preset for model {mae_model_name!r}; known MAE presets: {sorted(model_presets())}, "
                     f"ViT presets: {sorted(VIT_PRESETS)}")


# ------------------------------------------------------------------------------------------------ loading
@dataclass(frozen=True)
class LoadResult:
    """What :func:`load_pretrained` did. ``missing_keys``: the model's keys the checkpoint did not fill (left at
    their init: ``head.*`` and, with global pooling, ``fc_norm.*``); ``unexpected_keys``: checkpoint keys the model
    has no use for (the encoder's ``norm.*`` under global pooling, ``fc_norm.*`` without it); ``interpolated``:
    whether ``pos_embed`` was resized to the model's patch grid; ``dropped_keys``: keys removed before loading
    (the MAE decoder: ``decoder_*``, ``mask_token``; a ``head.*`` of another shape or for a model without head)."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    interpolated: bool
    dropped_keys: list[str]


_DECODER_KEY = re.compile(r"^(decoder_|mask_token$)")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


def _state_dict_of(source: str | os.PathLike | Mapping) -> dict[str, torch.Tensor]:
    """The model state held by ``source``: a checkpoint ``{"model": state_dict, ...}`` (fastmae pretraining,
    official MAE), ``{"state_dict": ...}``, or a state dict itself; given as a dict or a file (a folder: its newest
    fastmae checkpoint). Keys lose a ``module.``/``_orig_mod.`` prefix that every key has."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.exists():
            raise ValueError(f"checkpoint {str(path)!r} does not exist")
        from fastmae.interop.checkpoints import read_state_dict  # every fastmae, official, timm or plain file

        loaded, _, where = read_state_dict(path)
    elif isinstance(source, Mapping):
        loaded, where = source, "the given dict"
    else:
        raise TypeError(f"source must be a checkpoint path or a state dict, got {type(source).__name__}")
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{where} holds a {type(loaded).__name__}, not a checkpoint dict or a state dict")
    for key in ("model", "state_dict"):
        if isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    not_tensors = [k for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors or not loaded:
        raise ValueError(f"{where} is not a state dict (name -> tensor) nor a checkpoint with one under 'model' or "
                         f"'state_dict'; keys that are not tensors: {sorted(map(str, not_tensors))[:8]}")
    state = dict(loaded)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _architecture(state: Mapping[str, torch.Tensor]) -> str:
    """A one-line summary (width, patch, channels, depth) of a ViT state dict, from what it holds."""
    parts = []
    proj = state.get("patch_embed.proj.weight")  # (D, C, p, p)
    if proj is not None and proj.ndim == 4:
        parts += [f"width {proj.shape[0]}", f"patch {tuple(proj.shape[2:])}", f"{proj.shape[1]} channels"]
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))}
    parts.append(f"{len(blocks)} blocks")
    return ", ".join(parts)


def load_pretrained(model: VisionTransformer, source: str | os.PathLike | Mapping) -> LoadResult:
    """Load pretrained weights into ``model`` as the official ``main_finetune.py`` does; what was done is returned.

    ``source``: a fastmae pretraining checkpoint file (``ckpt-<step>.pt``; a run folder or its ``checkpoints/``:
    the newest one-file checkpoint), an official MAE checkpoint (``{"model": state_dict}``, ``args`` allowed), an
    MAE state dict (fastmae's keys are the official ones), a timm ViT state dict (``norm``/``fc_norm``/``head``
    included; ``.safetensors`` files too), or a fine-tuned checkpoint of this class; a dict or a file. Files are
    read on the CPU with ``weights_only=True``; ``module.``/``_orig_mod.`` prefixes (DDP, torch.compile) are removed.

    Steps: drop the MAE decoder (``decoder_*``, ``mask_token``) and a ``head.*`` whose shape differs from the
    model's; resize ``pos_embed`` to the model's patch grid as the official ``interpolate_pos_embed`` does
    (:func:`fastmae.pos_embed.interpolate_pos_embed`: the cls row kept, the patch rows bicubic with
    ``align_corners=False``; the saved grid square, or of the model's aspect ratio); load the rest.

    Raises ``ValueError`` naming the keys when the checkpoint is of another architecture (expected and given
    shapes, and a summary of both), when a key other than ``head.*`` (and ``fc_norm.*`` under global pooling)
    is missing, and when it holds keys this model does not have other than the unused final norm
    (``norm.*`` under global pooling, ``fc_norm.*`` without). The number of heads is not in the weights and
    cannot be checked. The caller's dict is not modified.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a fastmae.vit.VisionTransformer, got {type(model).__name__}")
    state = _state_dict_of(source)
    own = model.state_dict()
    dropped = sorted(k for k in state if _DECODER_KEY.match(k))
    dropped += sorted(k for k in state if k.startswith("head.") and (k not in own or state[k].shape != own[k].shape))
    state = {k: v for k, v in state.items() if k not in dropped}

    interpolated = False
    saved_pos = state.get("pos_embed")
    if (saved_pos is not None and saved_pos.ndim == 3 and saved_pos.shape[0] == 1
            and saved_pos.shape[2] == own["pos_embed"].shape[2] and saved_pos.shape[1] != own["pos_embed"].shape[1]):
        grid = model.patch_embed.grid_size
        old_grid = grid_for(saved_pos.shape[1] - 1, aspect=grid)
        if old_grid is None:
            raise ValueError(f"cannot resize the checkpoint's pos_embed {tuple(saved_pos.shape)} to the model's "
                             f"{grid[0]}x{grid[1]} grid: its {saved_pos.shape[1] - 1} patch rows form neither a square "
                             f"grid nor one of the model's aspect ratio")
        state["pos_embed"] = interpolate_pos_embed(saved_pos, grid, old_grid)  # (1, 1 + h*w, D)
        interpolated = True

    mismatched = [f"{k}: model {tuple(own[k].shape)}, checkpoint {tuple(v.shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    own_blocks = {int(m.group(1)) for k in own if (m := _BLOCK_KEY.match(k))}
    extra_blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))} - own_blocks)
    if mismatched or extra_blocks:
        detail = mismatched[:6] + ([f"... and {len(mismatched) - 6} more"] if len(mismatched) > 6 else [])
        if extra_blocks:
            detail.append(f"blocks {extra_blocks[0]}..{extra_blocks[-1]} are not in the model")
        raise ValueError(f"the checkpoint is of another architecture ({_architecture(state)}) than the model "
                         f"({_architecture(own)}):\n  " + "\n  ".join(detail))

    head_keys = {k for k in own if k.startswith("head.")}
    allowed_missing = head_keys | ({k for k in own if k.startswith("fc_norm.")} if model.global_pool else set())
    unused_norm = "norm." if model.global_pool else "fc_norm."
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_missing = [k for k in missing if k not in allowed_missing]
    bad_unexpected = [k for k in unexpected if not k.startswith(unused_norm)]
    if bad_missing:
        hint = ""
        if not model.global_pool and any(k.startswith("norm.") for k in bad_missing) and "fc_norm.weight" in state:
            hint = " (the checkpoint has fc_norm, a global-pooling model's: build the model with global_pool=True)"
        raise ValueError(f"the checkpoint lacks {len(bad_missing)} of the model's keys{hint}: {bad_missing[:12]}"
                         + (" ..." if len(bad_missing) > 12 else ""))
    if bad_unexpected:
        raise ValueError(f"the checkpoint holds {len(bad_unexpected)} keys this ViT does not have (another "
                         f"architecture?): {bad_unexpected[:12]}" + (" ..." if len(bad_unexpected) > 12 else ""))
    model.load_state_dict(state, strict=False)
    return LoadResult(missing, unexpected, interpolated, dropped)
