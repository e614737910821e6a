"""fastmae.kernels: the Triton kernels behind the ``triton`` backend of :mod:`fastmae.ops`.

Installed as the subpackage ``fastmae.kernels`` (this folder is mapped there by ``setup.py``;
``kernels`` as a top-level name belongs to another PyPI project). One file per op: its kernels,
launcher and autograd Function, with a short design note at the top.
"""
