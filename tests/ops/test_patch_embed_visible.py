import pytest
import torch
import torch.nn.functional as F

from fastmae import ops
from fastmae.ops.patch_embed_visible import patch_embed_visible_reference
from numerics import assert_rel_close


def _conv_then_gather(imgs, ids_keep, weight, bias, pos_embed):  # noqa: ANN001, ANN202
    """The official order: embed every patch with the conv, add pos, then keep the visible ones."""
    x = F.conv2d(imgs, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)  # (N, L, D)
    x = x + pos_embed[:, 1:]
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@pytest.mark.parametrize("n,p,hh,ww,d", [(1, 16, 224, 224, 64), (3, 14, 224, 224, 48), (5, 16, 64, 96, 32), (2, 14, 56, 84, 40)])
def test_reference_equals_conv_then_gather_with_grads(n: int, p: int, hh: int, ww: int, d: int) -> None:
    g = torch.Generator().manual_seed(p + n)
    num_patches = (hh // p) * (ww // p)
    imgs = torch.randn(n, 3, hh, ww, generator=g)
    ids_keep = torch.argsort(torch.rand(n, num_patches, generator=g), dim=1)[:, : num_patches // 4]
    weight = torch.randn(d, 3, p, p, generator=g, requires_grad=True)
    bias = torch.randn(d, generator=g, requires_grad=True)
    pos = torch.randn(1, num_patches + 1, d, generator=g)
    got = patch_embed_visible_reference(imgs, ids_keep, weight, bias, pos)
    want = _conv_then_gather(imgs, ids_keep, weight, bias, pos)
    assert got.shape == (n, num_patches // 4, d)
    assert_rel_close(got, want, 1e-6, "forward")
    upstream = torch.randn_like(want)
    grads = torch.autograd.grad(got, (weight, bias), upstream)
    want_grads = torch.autograd.grad(want, (weight, bias), upstream)
    for a, b, name in zip(grads, want_grads, ("weight", "bias")):
        assert_rel_close(a, b, 1e-6, name)


def test_public_validates() -> None:
    imgs, w, b, pos = torch.randn(2, 3, 32, 32), torch.randn(8, 3, 16, 16), torch.randn(8), torch.randn(1, 5, 8)
    ids = torch.zeros(2, 1, dtype=torch.int64)
    assert ops.patch_embed_visible(imgs, ids, w, b, pos).shape == (2, 1, 8)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        ops.patch_embed_visible(torch.randn(2, 3, 30, 32), ids, w, b, pos)
    with pytest.raises(ValueError, match="C=3"):
        ops.patch_embed_visible(torch.randn(2, 1, 32, 32), ids, w, b, pos)
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(1, 5, 8\)"):
        ops.patch_embed_visible(imgs, ids, w, b, torch.randn(1, 4, 8))
    with pytest.raises(TypeError, match="ids_keep must be int32 or int64"):
        ops.patch_embed_visible(imgs, ids.float(), w, b, pos)


# ---------------------------------------------------------------------------------------------------
# Kernel backends (triton: the interpreter here). tests/ops/test_backends.py checks every backend against the
# reference on the op's cases (fp32 on CPU, bf16/fp16 on a GPU), determinism, the fake and opcheck; these test
# what those cases do not reach.

from fastmae.ops._kernels import KERNEL_BACKENDS  # noqa: E402
from fastmae.ops.dispatch import BackendUnavailableError  # noqa: E402

OP = ops.OPS["patch_embed_visible"]
KERNELS = [b.name for b in OP.backends if b.name in KERNEL_BACKENDS]


def _inputs(n: int, p: int, hh: int, ww: int, d: int, keep: int, seed: int = 0, dtype: torch.dtype = torch.float32,
            pos_dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple:
    """MAE-like inputs: images ~ N(0, 1), a random kept set, weight ~ xavier scale, bias and pos ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    num_patches = (hh // p) * (ww // p)
    imgs = torch.randn(n, 3, hh, ww, generator=g)
    ids_keep = torch.argsort(torch.rand(n, num_patches, generator=g), dim=1)[:, :keep]
    weight = torch.randn(d, 3, p, p, generator=g) * (2 / (d + 3 * p * p)) ** 0.5
    bias = torch.randn(d, generator=g)
    pos = torch.randn(1, num_patches + 1, d, generator=g)
    return (imgs.to(device, dtype), ids_keep.to(device), weight.to(device, dtype).requires_grad_(),
            bias.to(device, dtype).requires_grad_(), pos.to(device, pos_dtype))


def _forward_backward(args: tuple, backend: str, upstream: torch.Tensor | None = None) -> tuple:
    """(out, grad_weight, grad_bias) with ``upstream`` (default: a fixed random one) as the output's gradient."""
    out = ops.patch_embed_visible(*args, backend=backend)
    if upstream is None:
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grad_weight, grad_bias = torch.autograd.grad(out, (args[2], args[3]), upstream)
    return out, grad_weight, grad_bias


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("n,p,hh,ww,d,keep", [
    (3, 14, 224, 224, 64, 128),  # M = 384 rows: the backward splits the rows in two, reduced in a fixed order
    (1, 16, 224, 224, 768, 49),  # ViT-B width: several column tiles
])
def test_shapes_the_cases_lack_and_bitwise_determinism(backend: str, n: int, p: int, hh: int, ww: int, d: int,
                                                       keep: int) -> None:
    args = _inputs(n, p, hh, ww, d, keep, seed=n + p + d)
    got = _forward_backward(args, backend)
    want = _forward_backward(args, "reference")
    assert got[0].shape == (n, keep, d) and got[0].dtype == want[0].dtype
    for a, b, name in zip(got, want, ("forward", "grad weight", "grad bias")):
        assert_rel_close(a, b, 1e-5, name)
    assert all(torch.equal(a, b) for a, b in zip(got, _forward_backward(args, backend)))


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_strided_inputs_and_expanded_grad(backend: str) -> None:
    """A cropped view of a larger image (strides kept), channels-last images (copied), a transposed int32
    ids_keep, a pos table sliced from a wider one, a strided bias, and the expanded gradient of ``.sum()``."""
    imgs, ids_keep, weight, bias, pos = _inputs(3, 14, 224, 224, 64, 49, seed=5)
    big = torch.zeros(3, 3, 240, 232)
    big[:, :, 8:232, 4:228] = imgs
    wide_pos = torch.zeros(1, pos.shape[1], 80)
    wide_pos[..., :64] = pos
    ids_t = ids_keep.to(torch.int32).t().contiguous().t()  # (N, K) with strides (1, N)
    variants = [(big[:, :, 8:232, 4:228], ids_keep, wide_pos[..., :64], torch.stack([bias, bias], 1)[:, 0]),
                (imgs.contiguous(memory_format=torch.channels_last), ids_t, pos, bias)]
    want = patch_embed_visible_reference(imgs, ids_keep, weight, bias, pos)
    want_grads = torch.autograd.grad(want.sum(), (weight, bias))
    for x, ids, table, b in variants:
        got = ops.patch_embed_visible(x, ids, weight, b, table, backend=backend)
        assert_rel_close(got, want, 1e-5, "forward")
        for a, want_grad, name in zip(torch.autograd.grad(got.sum(), (weight, bias)), want_grads, ("weight", "bias")):
            assert_rel_close(a, want_grad, 1e-5, name)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_no_kept_patches(backend: str) -> None:
    args = _inputs(2, 16, 64, 96, 32, 0)
    out, grad_weight, grad_bias = _forward_backward(args, backend)
    assert out.shape == (2, 0, 32)
    assert not grad_weight.any() and not grad_bias.any()


# Low precision through the interpreter, against the fp32 reference on the same (already rounded) inputs,
# so only the op's own rounding counts: the tokens (acc + bias) are rounded to the input dtype before pos is
# added, as F.linear does, and the weight gradient sees grad_out rounded to that dtype and is itself stored
# in it. The interpreter rounds fp32 -> bf16 by truncation (relative error < 2^-7 per element, ~2^-8 on
# average); fp32 -> fp16 to nearest (< 2^-11). Measured: <= 4.6e-3 (bf16; torch's own bf16 reference: <= 2.4e-3,
# it rounds to nearest) and <= 2.9e-4 (fp16, equal to torch's own) relative error.
LOW_PRECISION_TOL = {torch.bfloat16: 1e-2, torch.float16: 1.5e-3}


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("same_pos_dtype", [False, True])
def test_low_precision_on_cpu(backend: str, dtype: torch.dtype, same_pos_dtype: bool) -> None:
    args = _inputs(3, 16, 64, 96, 64, 12, seed=3, dtype=dtype, pos_dtype=dtype if same_pos_dtype else torch.float32)
    out_dtype = patch_embed_visible_reference(*args).dtype  # bf16 + fp32 pos -> fp32, as in torch
    upstream = torch.randn(3, 12, 64, generator=torch.Generator().manual_seed(1)).to(out_dtype)
    got = _forward_backward(args, backend, upstream)
    assert got[0].dtype == out_dtype and got[1].dtype == got[2].dtype == dtype
    exact = tuple(a.detach().float().requires_grad_(a.requires_grad) for a in args[:1] + args[2:])
    want = _forward_backward((exact[0], args[1], *exact[1:]), "reference", upstream.float())
    for a, b, name in zip(got, want, ("forward", "grad weight", "grad bias")):
        assert_rel_close(a, b, LOW_PRECISION_TOL[dtype], f"{dtype} {name}")


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_under_cpu_autocast_matches_reference(backend: str) -> None:
    """Under autocast, imgs/weight/bias are cast like F.linear's inputs; pos stays fp32, so the result is fp32."""
    args = _inputs(3, 14, 56, 84, 64, 9, seed=11)
    results = {}
    for name in (backend, "reference"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ops.patch_embed_visible(*args, backend=name)
        results[name] = (out, *torch.autograd.grad(out, (args[2], args[3]), torch.ones_like(out)))
    for a, b, name in zip(results[backend], results["reference"], ("forward", "grad weight", "grad bias")):
        assert a.dtype == b.dtype, name
        assert_rel_close(a, b, LOW_PRECISION_TOL[torch.bfloat16], name)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_supports_refuses_what_it_cannot_do(backend: str) -> None:
    rules = OP.backend(backend)
    imgs, ids_keep, weight, bias, pos = _inputs(1, 16, 64, 96, 32, 6)
    refused = {
        f"{backend} gives no gradient for imgs": (imgs.clone().requires_grad_(), ids_keep, weight, bias, pos),
        f"{backend} gives no gradient for pos_embed": (imgs, ids_keep, weight, bias, pos.clone().requires_grad_()),
        "share a dtype": (imgs.bfloat16(), ids_keep, weight, bias, pos),
        f"{backend} takes fp32/bf16/fp16, got imgs torch.float64": (imgs.double(), ids_keep, weight.double(),
                                                                    bias.double(), pos),
    }
    for needle, args in refused.items():
        reason = rules.why_not(args, OP.arg_names)
        assert reason is not None and needle in reason, (needle, reason)
        with pytest.raises(BackendUnavailableError, match=f"backend '{backend}'"):
            ops.patch_embed_visible(*args, backend=backend)
    with torch.no_grad():  # no gradient is asked for: nothing to refuse
        assert rules.why_not(refused[f"{backend} gives no gradient for imgs"], OP.arg_names) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts imgs/weight/bias to one dtype
        assert rules.why_not(refused["share a dtype"], OP.arg_names) is None
    # CPU tensors: the priority list never picks the kernels on its own.
    assert OP.select((imgs, ids_keep, weight, bias, pos)).name == "reference"


# ---------------------------------------------------------------------------------------------------
# On a GPU (skipped elsewhere): fp32 at MAE widths and batches (the low-precision rule: test_backends.py).

GPU_CASES = [(8, 16, 224, 224, 768, 49), (8, 16, 224, 224, 1024, 49), (5, 14, 224, 224, 1280, 64),
             (3, 16, 64, 96, 48, 6), (64, 16, 224, 224, 768, 49)]  # the last: several backward row splits


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("n,p,hh,ww,d,keep", GPU_CASES)
def test_gpu_fp32_matches_reference(backend: str, n: int, p: int, hh: int, ww: int, d: int, keep: int) -> None:
    args = _inputs(n, p, hh, ww, d, keep, device="cuda")
    got = _forward_backward(args, backend)
    for a, b, name in zip(got, _forward_backward(args, "reference"), ("forward", "grad weight", "grad bias")):
        assert_rel_close(a, b, 1e-5, name)
    assert all(torch.equal(a, b) for a, b in zip(got, _forward_backward(args, backend)))  # bit-identical
