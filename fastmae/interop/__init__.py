"""Interop: MAE checkpoints to and from timm and Hugging Face, and the reconstruction figure for any checkpoint.

- ``fastmae.interop.checkpoints``: read any MAE checkpoint (a fastmae run, an official ``{"model": ...}`` file, a
  plain state dict, a Hugging Face ViTMAE folder) into one form, its architecture inferred and checked;
- ``fastmae.interop.timm_export``: the encoder as a timm ``vit_<size>_patch<p>_224`` state dict;
- ``fastmae.interop.hf``: the whole MAE as a Hugging Face ``ViTMAEForPreTraining`` folder, and back;
- ``fastmae.interop.command``: the ``fastmae export`` and ``fastmae visualize`` commands.

Importing this package imports no torch (the command line's parser reads ``command``); the modules do.
"""
