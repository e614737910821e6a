"""Classification on top of a pretrained encoder: ``fastmae finetune`` (end-to-end or partial fine-tuning),
``fastmae linprobe`` (linear probing) and ``fastmae eval`` (top-1/top-5 of a checkpoint).

``config``: the settings and the official recipe per model size; ``lr_decay``: layer-wise lr decay groups;
``lars``: the LARS optimiser of linear probing; ``trainer``: the training loop (reusing ``fastmae.train``'s
checkpoints, DDP and FSDP2, preemption, logging); ``evaluate``: accuracy over a validation set; ``command``: the CLI.
Importing this package imports no torch.
"""
