"""Inductor's fusion around fastmae's custom ops, read from the generated code of a compiled fp32 CPU training
step (``fastmae.benchmark.fusion``): residual add + LayerNorm in one kernel, fc1's GELU in one kernel and its
bias's gradient in the GELU' kernel, no copy or cast kernel beside a ``fastmae::`` op, and at most K more
kernels than the all-Inductor baseline.

fp32, not bf16 autocast: under autocast the CPU scheduler's horizontal fusion of the small weight-gradient casts
changes with the batch size (batch 2 leaves three of them alone with the kernel mapping, batch 3 none), so the
counts would test Inductor's CPU heuristics; the fp32 structure is the same at batch 2, 3 and 4.
``python -m fastmae.benchmark.fusion --autocast bf16`` reports the casts.

The compiled tests share two compiles (the kernel mapping and the baseline, scalar C++ kernels: about 35 s cold
on 2 cores, 10 s with Inductor's caches warm): marked slow. Without a GPU, conftest sets TRITON_INTERPRET=1, so
attention and patch_embed_visible run their Triton kernels in the interpreter; on a GPU machine they run on SDPA
and the reference here (the step is compiled on the CPU either way).
"""

from __future__ import annotations

import pytest

from fastmae.benchmark import fusion

DEPTH, DECODER_DEPTH = 2, 1
BLOCKS = DEPTH + DECODER_DEPTH
LAYER_NORMS = 2 * BLOCKS + 2  # norm1 and norm2 of every block, the encoder's norm and the decoder_norm
# K: the kernels the custom ops may add over the baseline. Measured (torch 2.14.1, 2-core x86, fp32 and bf16): with
# unshuffle on its kernel the min-cut partitioner saves unshuffle's output and recomputes the decoder block's
# norm2 input from it, so that block's LayerNorm weight/bias gradient reductions get a kernel of their own (+1
# backward: 37 vs 36 kernels with only unshuffle on cuda). Every other op removes kernels: masked_mse its loss
# kernels, random_masking its mask kernel, attention its lse-transpose and dq/dk/dv-packing kernels,
# patch_embed_visible its patch gather and bias-gradient kernels (28 vs 36 with the interpreter's Triton ops, 35
# vs 36 without).
K = 1
KERNEL_BACKENDS = ("cuda", "triton")


@pytest.fixture(scope="module")
def reports() -> tuple[fusion.FusionReport, fusion.FusionReport]:
    """``(kernel mapping, baseline)`` reports of the depth-2 tiny MAE's fp32 training step."""
    mapping = fusion.kernel_mapping("cpu")
    if not any(backend in KERNEL_BACKENDS for backend in mapping.values()):
        pytest.skip(f"no kernel backend runs on this CPU (fastmae._C not built, no Triton interpreter): {mapping}")
    ours = fusion.measure(mapping, depth=DEPTH, decoder_depth=DECODER_DEPTH, vectorize=False)
    baseline = fusion.measure(fusion.baseline_mapping(), depth=DEPTH, decoder_depth=DECODER_DEPTH, vectorize=False)
    return ours, baseline


@pytest.mark.slow
def test_the_custom_ops_are_in_the_compiled_step(reports: tuple) -> None:
    ours, baseline = reports
    kernel_ops = {op for op, backend in ours.mapping.items() if backend in KERNEL_BACKENDS}
    expected = {"linear_gelu": "bias_gelu"}  # linear_gelu's kernel op
    externs = set(ours.forward.extern_calls) | set(ours.backward.extern_calls)
    for op in kernel_ops:
        assert f"fastmae.{expected.get(op, op)}" in externs, (op, sorted(externs))
    baseline_calls = baseline.forward.extern_calls + baseline.backward.extern_calls
    assert not any(call.startswith("fastmae.") for call in baseline_calls), baseline_calls


@pytest.mark.slow
def test_every_residual_add_is_fused_into_a_layer_norm(reports: tuple) -> None:
    """One kernel per LayerNorm; no forward kernel adds without normalising (a residual add, or a bias, left
    outside): each block's two residual adds land in the kernels of norm2 and of the next norm."""
    ours, _ = reports
    norms = ours.forward.with_ops("native_layer_norm")
    assert len(norms) == LAYER_NORMS, norms
    stray_adds = [k for k in ours.forward.with_ops("add") if "native_layer_norm" not in fusion.kernel_ops(k)]
    assert stray_adds == [], stray_adds
    assert len(ours.forward.with_ops("add", "native_layer_norm")) >= 2 * BLOCKS, norms


@pytest.mark.slow
def test_fc1_gelu_is_one_kernel_and_its_backward_takes_the_bias_gradient(reports: tuple) -> None:
    """fc1 is a GEMM with its bias (addmm) and one GELU kernel per block; in the backward every GELU' kernel
    also reduces a bias gradient (no separate pass over the hidden activations)."""
    ours, _ = reports
    gelus = ours.forward.with_ops("gelu")
    assert len(gelus) == BLOCKS, gelus
    assert all(set(fusion.kernel_ops(k)) <= {"gelu", "view", "_unsafe_view", "_to_copy"} for k in gelus), gelus
    backward = ours.backward.with_ops("gelu_backward")
    assert len(backward) >= BLOCKS and backward == ours.backward.with_ops("gelu_backward", "sum"), backward


@pytest.mark.slow
def test_no_copy_kernel_beside_a_custom_op(reports: tuple) -> None:
    """No kernel only copies or casts (a layout or dtype an op's registration demands); a kernel Inductor made
    for an op's argument is fused with the computation that produces it."""
    ours, _ = reports
    for graph in (ours.forward, ours.backward):
        assert graph.copies() == (), graph.copies()
        for kernel in graph.for_custom_ops():
            assert set(fusion.kernel_ops(kernel)) - fusion.COPY_OPS - fusion.fastmae_op_names(), kernel


@pytest.mark.slow
def test_kernel_count_at_most_the_baseline_plus_k(reports: tuple) -> None:
    ours, baseline = reports
    assert ours.kernels <= baseline.kernels + K, fusion.format_difference(ours, baseline)


# ---------------------------------------------------------------------------- reading the generated code

GENERATED = '''
cpp_fused_add_native_layer_norm_view_0 = async_compile.cpp_pybinding(['float*'], r"""
extern "C" void kernel(float* out_ptr0) {}
""")
triton_per_fused__to_copy_gelu_view_1 = async_compile.triton('triton_per_fused__to_copy_gelu_view_1', """
def triton_per_fused__to_copy_gelu_view_1(in_ptr0):
    pass
""")
class Runner:
    def call(self, args):
        primals_1, primals_2 = args
        buf0 = torch.ops.fastmae.unshuffle.default(primals_1, primals_2, 'cuda')
        assert_tensor_metadata(buf0, (3, 25, 32), (800, 32, 1), torch.float32, 'torch.ops.fastmae.unshuffle.default')
        # cpp_fused_add_native_layer_norm_view_0(commented out)
        cpp_fused_add_native_layer_norm_view_0(buf0)
        extern_kernels.addmm(primals_1, buf0, primals_2, alpha=1, beta=1, out=buf1)
        buf2 = torch.ops.inductor._alloc_from_pool(buf1, 0, torch.float32, (1,), (1,))
        triton_per_fused__to_copy_gelu_view_1.run(buf1, stream=stream0)
        cpp_fused_add_native_layer_norm_view_0(buf1)
        return (buf1,)
    def recursively_apply_fns(self, fns):
        cpp_fused_add_native_layer_norm_view_0(None)
'''


def test_parse_code_lists_launches_and_extern_calls_in_order() -> None:
    graph = fusion.parse_code(GENERATED)
    assert graph.kernels == ("cpp_fused_add_native_layer_norm_view_0", "triton_per_fused__to_copy_gelu_view_1",
                             "cpp_fused_add_native_layer_norm_view_0")
    assert graph.extern_calls == ("fastmae.unshuffle", "addmm")
    assert graph.count == 3 and graph.extern_counts() == {"fastmae.unshuffle": 1, "addmm": 1}
    assert graph.with_ops("gelu") == ("triton_per_fused__to_copy_gelu_view_1",)
    assert graph.copies() == () and graph.for_custom_ops() == ()


PARTITIONED = '''
triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', """
def triton_poi_fused_add_0(in_ptr0):
    pass
""")
def partition_0(args):
    buf0, = args
    triton_poi_fused_add_0.run(buf0, stream=stream0)
    return (buf0,)
class Runner:
    def call(self, args):
        buf1 = torch.ops.fastmae.attention.default(args[0], 4, 'triton')
        partition0_args = [buf1]
        (buf2,) = self.partitions[0](partition0_args)
        extern_kernels.mm(buf2, buf2, out=buf3)
        return (buf3,)
'''


def test_parse_code_follows_graph_partitions() -> None:
    graph = fusion.parse_code(PARTITIONED)
    assert graph.kernels == ("triton_poi_fused_add_0",)
    assert graph.extern_calls == ("fastmae.attention", "mm")


def test_parse_code_refuses_a_module_without_call() -> None:
    with pytest.raises(ValueError, match="no call function"):
        fusion.parse_code("x = 1\n")
    with pytest.raises(ValueError, match="does not define it"):
        fusion.parse_code(PARTITIONED.replace("def partition_0", "def partition_9"))


def test_kernel_ops_reads_the_fused_ops_from_a_name() -> None:
    name = "cpp_fused__unsafe_view_add_native_layer_norm_backward_sum_unshuffle_backward_view_8"
    assert fusion.kernel_ops(name) == ("_unsafe_view", "add", "native_layer_norm_backward", "sum",
                                       "unshuffle_backward", "view")
    assert fusion.kernel_ops("triton_poi_fused__to_copy_patch_embed_visible_0") == ("_to_copy", "patch_embed_visible")
    assert fusion.kernel_ops("extern_kernels") == ()
    copy = fusion.GraphKernels(("cpp_fused__to_copy_patch_embed_visible_0", "cpp_fused_add_slice_backward_1"), ())
    assert copy.copies() == ("cpp_fused__to_copy_patch_embed_visible_0",)
    assert copy.for_custom_ops() == ("cpp_fused__to_copy_patch_embed_visible_0",)


def test_bad_mappings_and_arguments_are_refused_before_compiling() -> None:
    with pytest.raises(ValueError, match="no backend 'xformers'") as error:
        fusion.check_mapping({"unshuffle": "xformers", "nope": "torch"}, "cpu")
    assert "nope: not an op of the MAE step" in str(error.value)
    with pytest.raises(TypeError, match="dict of op name"):
        fusion.check_mapping(["attention"], "cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="autocast must be one of"):
        fusion.measure(fusion.baseline_mapping(), autocast="int8")
    with pytest.raises(ValueError, match="depth must be a positive int"):
        fusion.measure(fusion.baseline_mapping(), depth=0)
    with pytest.raises(ValueError, match="mapping must be one of"):
        fusion.mapping_named("fastest")
