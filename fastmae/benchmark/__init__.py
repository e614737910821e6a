"""``fastmae bench``: end-to-end training-step throughput, MFU and memory of fastmae and the baselines.

``train_step`` holds the ``TrainStep`` every implementation is wrapped in and fastmae's pretraining variants;
``baselines`` the implementations fastmae is measured against (the official MAE, compiled and
CUDA-graphed, and Hugging Face's ViTMAE, eager and compiled); ``finetune_step`` the fine-tuning rows
(``--task finetune``: fastmae's ViT and timm's, eager and compiled); ``registry`` maps names to builders;
``timing`` times one; ``peak`` measures the matmul rate and knows the cards' specs; ``results``
upserts and compares the per-GPU CSV; ``report`` prints the table; ``run`` orchestrates; ``command``
is the command line.
"""
