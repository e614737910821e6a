"""``fastmae bench``: end-to-end pretraining-step throughput, MFU and memory of fastmae and the baselines.

``train_step`` holds the ``TrainStep`` every implementation is wrapped in (the baselines in
``bench/baselines`` build it too) and fastmae's variants; ``timing`` times one; ``peak`` measures
the matmul rate and knows the cards' specs; ``results`` upserts and compares the per-GPU CSV;
``report`` prints the table; ``run`` orchestrates; ``command`` is the command line.
"""
