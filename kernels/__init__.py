"""fastmae.kernels: the Triton kernels behind the ``triton`` backend of :mod:`fastmae.ops`.

Installed as the subpackage ``fastmae.kernels`` (this folder is mapped there by ``setup.py``;
``kernels`` as a top-level name belongs to another PyPI project). One file per op: its ``@triton.jit``
kernels and the launchers ``<name>`` / ``<name>_backward`` that the op's one definition in
``fastmae/ops/<op>.py`` calls with the op's own arguments (no registration, fake or autograd here), with a
short design note at the top. ``attention_plan.py`` and ``attention_tuning.py`` hold the attention's tiling
policy and the tuning search space ``bench/tune_attention.py`` times.
"""
