"""The model traces as one graph: torch.compile(fullgraph=True) and torch.export (on meta tensors)."""

import pytest
import torch

import fastmae
import fastmae.extension


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


KERNEL_OPS = ("random_masking", "patch_embed_visible", "attention", "unshuffle", "masked_mse", "layer_norm",
              "bias_gelu")  # linear_gelu's kernels: cuBLAS's GEMM, then fastmae::bias_gelu
CUDA_OPS = ("random_masking", "unshuffle", "masked_mse")  # the ops fastmae._C implements


def _kernel_backend(name: str) -> str:
    if name == "cuda" and not fastmae.extension.extension_status()[0]:
        pytest.skip(f"the cuda backend needs fastmae._C: {fastmae.extension.extension_status()[1]}")
    return name


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_export_traces_each_op_as_one_node(backend: str) -> None:
    """Every op with kernels is one ``fastmae::<op>`` node in the exported graph, whichever backend runs it."""
    model = _tiny("meta")
    imgs, noise = torch.empty(2, 3, 64, 96, device="meta"), torch.empty(2, 24, device="meta")
    with fastmae.use_backend(_kernel_backend(backend)):
        exported = torch.export.export(model, (imgs, 0.75, noise))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    for op in KERNEL_OPS if backend == "triton" else CUDA_OPS:
        assert f"fastmae.{op}.default" in targets, (op, sorted(targets))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compile_partitions_forward_and_backward_ops(backend: str) -> None:
    """torch.compile(fullgraph=True) of the model's training step with inductor's partitioner, on meta tensors:
    every op's forward and backward custom op is in the joint graph, and the partitioner splits it (on the H200,
    torch 2.11, it once failed over an op that seemed to write its input)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.compilers import nop
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    joints = []

    def partition(joint, inputs, **kwargs):  # noqa: ANN001, ANN003, ANN202
        joints.append(joint)
        return min_cut_rematerialization_partition(joint, inputs, **kwargs)

    torch._dynamo.reset()
    model = _tiny("meta")
    imgs, noise = torch.empty(3, 3, 64, 96, device="meta"), torch.empty(3, 24, device="meta")
    with fastmae.use_backend(_kernel_backend(backend)):
        compiled = torch.compile(model, fullgraph=True,
                                 backend=aot_autograd(fw_compiler=nop, bw_compiler=nop, partition_fn=partition))
        loss, _, _ = compiled(imgs, 0.75, noise)
    assert loss.shape == () and joints
    targets = {str(n.target) for joint in joints for n in joint.graph.nodes if n.op == "call_function"}
    for op in KERNEL_OPS if backend == "triton" else CUDA_OPS:
        assert f"fastmae.{op}.default" in targets, (op, sorted(targets))
        if op != "random_masking":  # no gradient: indices and a 0/1 mask
            assert f"fastmae.{op}_backward.default" in targets, (op, sorted(targets))


@pytest.mark.gpu
def test_compile_fullgraph_with_triton_backends_on_gpu() -> None:
    torch.manual_seed(0)
    model = _tiny("cuda")
    imgs, noise = torch.randn(3, 3, 64, 96, device="cuda"), torch.rand(3, 24, device="cuda")
    with fastmae.use_backend("triton"):
        eager_loss, _, _ = model(imgs, 0.75, noise)
        loss, _, _ = torch.compile(model, fullgraph=True)(imgs, 0.75, noise)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
