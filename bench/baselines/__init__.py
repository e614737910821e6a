"""Baselines for the throughput benchmark: the official MAE as plain PyTorch (``official_mae``, which
imports nothing from fastmae) and the complete training steps built on it and on Hugging Face's
ViTMAE (``steps``). Import the submodules directly; this package imports neither."""
