"""The model traces as one graph: torch.compile(fullgraph=True) and torch.export (on meta tensors)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fastmae


def _tiny(device: str = "cpu") -> fastmae.MAE:
    with torch.device(device):
        return fastmae.MAE(img_size=(64, 96), patch_size=16, embed_dim=64, depth=2, num_heads=4,
                           decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, norm_pix_loss=True)


def test_compile_fullgraph_forward_backward() -> None:
    torch.manual_seed(0)
    model = _tiny()
    imgs, noise = torch.randn(3, 3, 64, 96), torch.rand(3, 24)
    eager_loss, _, eager_mask = model(imgs, 0.75, noise)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    loss, _, mask = compiled(imgs, 0.75, noise)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.equal(mask, eager_mask)
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_export_on_meta() -> None:
    model = _tiny("meta")
    imgs, noise = torch.empty(2, 3, 64, 96, device="meta"), torch.empty(2, 24, device="meta")
    exported = torch.export.export(model, (imgs, 0.75, noise))
    loss, pred, mask = exported.module()(imgs, 0.75, noise)
    assert loss.shape == () and pred.shape == (2, 24, 768) and mask.shape == (2, 24)


EXPORT_TRITON = """
import json, torch, fastmae
with torch.device("meta"):
    model = fastmae.MAE(img_size=(64, 96), patch_size=16, embed_dim=64, depth=2, num_heads=4,
                        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, norm_pix_loss=True)
imgs, noise = torch.empty(2, 3, 64, 96, device="meta"), torch.empty(2, 24, device="meta")
with fastmae.use_backend("triton"):
    exported = torch.export.export(model, (imgs, 0.75, noise))
print(json.dumps(sorted({str(n.target) for n in exported.graph.nodes if n.op == "call_function"})))
"""


def test_export_traces_triton_ops_as_single_nodes() -> None:
    """In a process without the interpreter (as on a GPU machine), triton_op ops trace as one node each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", EXPORT_TRITON], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    targets = json.loads(run.stdout.strip().splitlines()[-1])
    # linear_gelu's triton backend is cuBLAS's GEMM, then its fused kernel, named fastmae_triton::bias_gelu
    for op in ("random_masking", "patch_embed_visible", "attention", "unshuffle", "masked_mse", "layer_norm",
               "bias_gelu"):
        assert any(t.startswith(f"fastmae_triton.{op}") for t in targets), (op, targets)


@pytest.mark.gpu
def test_compile_fullgraph_with_triton_backends_on_gpu() -> None:
    torch.manual_seed(0)
    model = _tiny("cuda")
    imgs, noise = torch.randn(3, 3, 64, 96, device="cuda"), torch.rand(3, 24, device="cuda")
    with fastmae.use_backend("triton"):
        eager_loss, _, _ = model(imgs, 0.75, noise)
        loss, _, _ = torch.compile(model, fullgraph=True)(imgs, 0.75, noise)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
