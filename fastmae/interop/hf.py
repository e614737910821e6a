"""The MAE as a Hugging Face ``ViTMAEForPreTraining`` folder (``save_pretrained``: ``config.json`` and
safetensors), and such a folder back into a fastmae checkpoint.

Design note. The two models compute the same function: patch embedding by a stride-p convolution, fixed
position tables added to the patches before masking and to the cls token after, the same masking (``argsort`` of
``noise``, the ``int(L * (1 - mask_ratio))`` smallest kept), pre-LN blocks with the exact GELU, the decoder's
unshuffle, and the same loss (MSE over removed patches, targets normalised per patch with variance + 1e-6 under
``norm_pix_loss``). Only the names differ, and the attention input projection: fastmae's packed ``qkv``
``(3D, D)`` is transformers' ``q_proj``, ``k_proj``, ``v_proj`` stacked in that order, each ``(D, D)`` with the
heads in the same order. The mapping is written for the module names of transformers 5 (``vit.layers.N``,
``attention.q_proj``, ``mlp.fc1``); reading goes through ``from_pretrained``, so any layout transformers 5 reads
(the Hub's 4.x folders included) is read. One MLP ratio and one LayerNorm eps serve encoder and decoder in both.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from fastmae.interop.checkpoints import LoadedMAE, MaeArch, preset_archs

_TOP = {  # fastmae key -> transformers 5 key, outside the blocks
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}
_TOP_BACK = {hf: ours for ours, hf in _TOP.items()}
_STACKS = {"blocks": "vit.layers", "decoder_blocks": "decoder.decoder_layers"}
_STACKS_BACK = {hf: ours for ours, hf in _STACKS.items()}
_IN_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # module inside a block, fastmae -> transformers
_IN_BLOCK_BACK = {hf: ours for ours, hf in _IN_BLOCK.items()}
_QKV = ("q_proj", "k_proj", "v_proj")


def _transformers():  # noqa: ANN202
    """The transformers module, version 5 or later (the module names mapped here)."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("Hugging Face interop needs transformers >= 5: pip install 'transformers>=5'") from exc
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ImportError(f"Hugging Face interop needs transformers >= 5 (its ViTMAE module names), got "
                          f"{transformers.__version__}")
    return transformers


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official-key MAE state dict -> ``ViTMAEForPreTraining``'s (transformers 5 names); ``attn.qkv``
    ``(3D, ...)`` becomes ``q_proj``/``k_proj``/``v_proj`` ``(D, ...)`` each. Exact: only views of the tensors."""
    out = {}
    for key, value in state_dict.items():
        block = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if block is None:
            if key not in _TOP:
                raise ValueError(f"no Hugging Face ViTMAE name for the MAE key {key!r}")
            out[_TOP[key]] = value
            continue
        stack, index, module, param = block.groups()
        prefix = f"{_STACKS[stack]}.{index}."
        if module == "attn.qkv":
            for name, part in zip(_QKV, value.chunk(3, dim=0)):  # (3D, ...) -> 3 x (D, ...)
                out[f"{prefix}attention.{name}.{param}"] = part
        elif module in _IN_BLOCK:
            out[f"{prefix}{_IN_BLOCK[module]}.{param}"] = value
        else:
            raise ValueError(f"no Hugging Face ViTMAE name for the MAE key {key!r}")
    return out


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_hf_state_dict`: ``q_proj``/``k_proj``/``v_proj`` ``(D, ...)`` are concatenated
    into ``attn.qkv`` ``(3D, ...)``; every other tensor is carried as is."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf_state_dict.items():
        block = re.match(r"^(vit\.layers|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if block is None:
            if key not in _TOP_BACK:
                raise ValueError(f"unexpected key in a Hugging Face ViTMAE state dict: {key!r}")
            out[_TOP_BACK[key]] = value
            continue
        stack, index, module, param = block.groups()
        prefix = f"{_STACKS_BACK[stack]}.{index}."
        projection = module.removeprefix("attention.")
        if projection in _QKV:
            qkv.setdefault(f"{prefix}attn.qkv.{param}", {})[projection] = value
        elif module in _IN_BLOCK_BACK:
            out[f"{prefix}{_IN_BLOCK_BACK[module]}.{param}"] = value
        else:
            raise ValueError(f"unexpected key in a Hugging Face ViTMAE state dict: {key!r}")
    for key, parts in qkv.items():
        if set(parts) != set(_QKV):
            raise ValueError(f"{key}: the Hugging Face state dict has {sorted(parts)} of q_proj, k_proj, v_proj")
        out[key] = torch.cat([parts[name] for name in _QKV], dim=0)  # 3 x (D, ...) -> (3D, ...)
    return out


def hf_config(arch: MaeArch, norm_pix_loss: bool, mask_ratio: float):  # noqa: ANN201
    """The ``ViTMAEConfig`` of ``arch`` (no dropout, the exact GELU, qkv bias, one LayerNorm eps)."""
    transformers = _transformers()
    if not arch.has_decoder:
        raise ValueError(f"a Hugging Face ViTMAEForPreTraining needs the decoder; this checkpoint has none "
                         f"({arch.describe()}): export its encoder with --to timm")
    return transformers.ViTMAEConfig(
        hidden_size=arch.embed_dim, num_hidden_layers=arch.depth, num_attention_heads=arch.num_heads,
        intermediate_size=int(arch.embed_dim * arch.mlp_ratio), hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=arch.norm_eps, image_size=arch.img_size,
        patch_size=arch.patch_size, num_channels=arch.in_chans, qkv_bias=True,
        decoder_num_attention_heads=arch.decoder_num_heads, decoder_hidden_size=arch.decoder_embed_dim,
        decoder_num_hidden_layers=arch.decoder_depth,
        decoder_intermediate_size=int(arch.decoder_embed_dim * arch.mlp_ratio),
        mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss)


def arch_from_hf_config(config) -> MaeArch:  # noqa: ANN001
    """The fastmae architecture of a ``ViTMAEConfig``; ValueError for what fastmae's MAE cannot express."""
    problems = []
    if config.hidden_act != "gelu":
        problems.append(f"hidden_act must be gelu (the exact GELU), got {config.hidden_act!r}")
    if not config.qkv_bias:
        problems.append("qkv_bias must be true")
    sizes = {}
    for name in ("image_size", "patch_size"):
        value = getattr(config, name)
        if isinstance(value, list | tuple):
            if len(value) != 2 or value[0] != value[1]:
                problems.append(f"{name} must be square, got {value}")
            value = value[0]
        sizes[name] = int(value)
    ratio = config.intermediate_size / config.hidden_size
    if config.decoder_intermediate_size != int(config.decoder_hidden_size * ratio):
        problems.append(f"decoder_intermediate_size / decoder_hidden_size must equal intermediate_size / hidden_size "
                        f"(one MLP ratio), got {config.decoder_intermediate_size} / {config.decoder_hidden_size} and "
                        f"{config.intermediate_size} / {config.hidden_size}")
    if int(config.hidden_size * ratio) != config.intermediate_size:
        problems.append(f"intermediate_size {config.intermediate_size} is no whole MLP ratio of hidden_size "
                        f"{config.hidden_size}")
    if problems:
        raise ValueError("this Hugging Face ViTMAE config has no fastmae MAE: " + "; ".join(problems))
    arch = MaeArch(img_size=sizes["image_size"], patch_size=sizes["patch_size"], embed_dim=config.hidden_size,
                   depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
                   decoder_embed_dim=config.decoder_hidden_size, decoder_depth=config.decoder_num_hidden_layers,
                   decoder_num_heads=config.decoder_num_attention_heads, mlp_ratio=ratio,
                   norm_eps=float(config.layer_norm_eps), in_chans=config.num_channels)
    preset = next((name for name, a in preset_archs().items() if a.same_dims(arch)), None)
    return dataclasses.replace(arch, preset=preset)


def export_hf(loaded: LoadedMAE, output: str | Path, norm_pix_loss: bool, mask_ratio: float) -> Path:
    """Write ``loaded`` as a ``ViTMAEForPreTraining`` ``save_pretrained`` folder ``output``; returns it."""
    transformers = _transformers()
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output must be a folder for a Hugging Face model, got the file {str(output)!r}")
    config = hf_config(loaded.arch, norm_pix_loss, mask_ratio)
    model = transformers.ViTMAEForPreTraining(config)
    model.load_state_dict(to_hf_state_dict(loaded.state_dict), strict=True)
    model.save_pretrained(output)
    return output


def read_hf(folder: str | Path) -> LoadedMAE:
    """A Hugging Face ViTMAE folder (``ViTMAEForPreTraining``; a ``ViTMAEModel`` folder gives an encoder-only
    checkpoint) as fastmae weights, with its config's ``norm_pix_loss`` and ``mask_ratio``."""
    transformers = _transformers()
    folder = Path(folder)
    config = transformers.ViTMAEConfig.from_pretrained(folder)
    arch = arch_from_hf_config(config)
    model, info = transformers.ViTMAEForPreTraining.from_pretrained(folder, output_loading_info=True)
    missing = sorted(info["missing_keys"])
    encoder_only = bool(missing) and all(k.startswith("decoder.") for k in missing)
    if missing and not encoder_only:
        raise ValueError(f"the Hugging Face folder {str(folder)!r} lacks weights: {', '.join(missing[:6])}")
    hf_state = {k: v for k, v in model.state_dict().items() if not (encoder_only and k.startswith("decoder."))}
    if encoder_only:
        preset = next((name for name, a in preset_archs().items() if a.same_encoder(arch)), None)
        arch = dataclasses.replace(arch.without_decoder(), preset=preset)
    return LoadedMAE(from_hf_state_dict(hf_state), arch, bool(config.norm_pix_loss), float(config.mask_ratio),
                     f"Hugging Face ViTMAE {folder}")
