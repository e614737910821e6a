"""Matmul FLOPs of one MAE pretraining step (and of one ViT fine-tuning step), the numerator of MFU.

Counted as 2 x multiply-adds of every matmul in the official algorithm: the patch embedding of all
L patches (as the official model computes it), the encoder on ``S = 1 + K`` tokens, the decoder
embedding, the decoder on ``T = 1 + L`` tokens and the prediction head. Per block of width ``D`` on
``S`` tokens: qkv ``6 S D^2``, q@k^T and attn@v ``4 S^2 D``, proj ``2 S D^2``, MLP
``4 r S D^2`` (r = mlp ratio). Norms, softmax, GELU and the loss are not counted. A training step is
3x the forward (backward = 2x forward). Every implementation is measured against the same count,
so the work fastmae skips (the removed patches' embedding) shows up as speed, not as FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from fastmae.model import MaskedAutoencoderViT


@dataclass(frozen=True)
class MAEFlops:
    """Forward matmul FLOPs per image, by part."""

    patch_embed: int
    encoder: int
    decoder_embed: int
    decoder: int
    decoder_pred: int
    patch_embed_visible: int  # what fastmae executes: only the K kept patches

    @property
    def forward(self) -> int:
        return self.patch_embed + self.encoder + self.decoder_embed + self.decoder + self.decoder_pred

    @property
    def train_step(self) -> int:
        """Forward + backward per image (3 x forward)."""
        return 3 * self.forward


def _blocks_flops(blocks: nn.ModuleList, tokens: int) -> int:
    total = 0
    for blk in blocks:
        d = blk.attn.qkv.in_features
        hidden = blk.mlp.fc1.out_features
        total += 2 * tokens * d * (3 * d + d + 2 * hidden) + 4 * tokens * tokens * d
    return total


def mae_flops(model: MaskedAutoencoderViT, mask_ratio: float = 0.75) -> MAEFlops:
    """FLOPs per image of ``model`` (a meta-device model is enough) at ``mask_ratio``."""
    pe = model.patch_embed
    num_patches, d = pe.num_patches, pe.proj.out_channels
    patch_dim = pe.patch_size[0] * pe.patch_size[1] * pe.in_chans
    len_keep = int(num_patches * (1 - mask_ratio))
    enc_tokens, dec_tokens = 1 + len_keep, 1 + num_patches
    return MAEFlops(
        patch_embed=2 * num_patches * patch_dim * d,
        encoder=_blocks_flops(model.blocks, enc_tokens),
        decoder_embed=2 * enc_tokens * model.decoder_embed.in_features * model.decoder_embed.out_features,
        decoder=_blocks_flops(model.decoder_blocks, dec_tokens),
        decoder_pred=2 * dec_tokens * model.decoder_pred.in_features * model.decoder_pred.out_features,
        patch_embed_visible=2 * len_keep * patch_dim * d,
    )


@dataclass(frozen=True)
class ClassifierFlops:
    """Forward matmul FLOPs per image of a ViT classifier (``fastmae.vit.VisionTransformer``), by part: the patch
    embedding of the ``L`` patches, the blocks on ``S = 1 + L`` tokens (the cls token and every patch: nothing is
    masked when fine-tuning), the head. Counted as :func:`mae_flops` counts (2 x multiply-adds of the matmuls)."""

    patch_embed: int
    encoder: int
    head: int

    @property
    def forward(self) -> int:
        return self.patch_embed + self.encoder + self.head

    @property
    def train_step(self) -> int:
        """Forward + backward per image (3 x forward): end-to-end fine-tuning, every parameter trained."""
        return 3 * self.forward


def classifier_flops(model: nn.Module) -> ClassifierFlops:
    """FLOPs per image of ``model``, a ``fastmae.vit.VisionTransformer`` (a meta-device model is enough)."""
    pe = model.patch_embed
    num_patches, d = pe.num_patches, pe.proj.out_channels
    patch_dim = pe.patch_size[0] * pe.patch_size[1] * pe.in_chans
    head = model.head
    return ClassifierFlops(
        patch_embed=2 * num_patches * patch_dim * d,
        encoder=_blocks_flops(model.blocks, 1 + num_patches),
        head=2 * head.in_features * head.out_features if isinstance(head, nn.Linear) else 0,
    )
