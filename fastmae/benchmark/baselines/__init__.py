"""Baselines for ``fastmae bench``: the implementations fastmae is measured against.

Import the submodules directly; this package imports neither.

- ``official_mae`` — the official MAE (facebookresearch/mae ``models_mae.py`` with timm's ``Block``) as
  plain PyTorch; its code uses only torch, nothing of fastmae: every patch embedded by a Conv2d,
  ``argsort`` + ``gather`` masking, mask tokens and an unshuffle ``gather`` in the decoder, per-patch
  ``norm_pix`` loss with the unbiased variance. ``attn_impl="explicit"`` (timm's
  ``softmax(q @ k^T * scale) @ v``) or ``"sdpa"``. Same ``state_dict`` keys and shapes as
  ``fastmae.MAE`` for every preset, so weights load both ways with ``strict=True``.
- ``steps`` — ``TrainStep`` builders, ``BUILDERS[impl](model_name, batch_size, img_size, device)``:

  - ``official``: the official engine as it runs: eager, fp16 autocast + GradScaler, explicit
    attention, ``torch.optim.AdamW`` with timm's parameter groups, ``loss.item()`` + gradient norm +
    ``torch.cuda.synchronize()`` every step;
  - ``modern``: the same model with bf16 autocast, SDPA, ``AdamW(fused=True)`` and ``torch.compile``;
  - ``modern-cudagraph``: ``modern`` with its whole step (forward, backward, optimiser step)
    captured in one CUDA graph, the way fastmae's own ``fastmae-cudagraph`` is (CUDA only);
  - ``hf``: Hugging Face ``ViTMAEForPreTraining`` (SDPA) configured from the preset;
  - ``hf-compile``: the same under ``torch.compile`` (compiled on every device).

  Off CUDA every step runs in fp32 with the default AdamW, and ``modern`` runs eagerly
  (``compile=False`` in its ``TrainStep``). ``unavailable_reason(impl, device)`` says, without building
  anything, why a baseline cannot run here (transformers missing for ``hf*``, no CUDA for
  ``modern-cudagraph``); the builders raise ``StepUnavailable`` with the same reason, and
  ``fastmae bench`` reports such a row as skipped.

``tests/test_baselines.py`` proves the comparison is apples to apples: with fastmae's weights and the
same noise, the official baseline gives fastmae's mask, loss, prediction and every gradient (fp32,
relative error ≤ 1e-5), a tolerance that a biased norm_pix variance already breaks.
"""
