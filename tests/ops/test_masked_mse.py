import pytest
import torch

from fastmae import ops
from fastmae.ops.masked_mse import masked_mse_reference
from numerics import assert_rel_close


def _loop_loss(pred, imgs, mask, p, norm_pix, eps=1e-6):  # noqa: ANN001, ANN202
    """Patch by patch, the slow obvious way."""
    n, c, hh, ww = imgs.shape
    w = ww // p
    total, count = torch.zeros((), dtype=torch.float64), 0.0
    for i in range(n):
        for k in range(mask.shape[1]):
            if mask[i, k] == 0:
                continue
            r, col = divmod(k, w)
            patch = imgs[i, :, r * p:(r + 1) * p, col * p:(col + 1) * p].permute(1, 2, 0).reshape(-1).double()
            if norm_pix:
                patch = (patch - patch.mean()) / (patch.var(unbiased=True) + eps).sqrt()
            total = total + ((pred[i, k].double() - patch) ** 2).mean()
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("n,p,hh,ww", [(1, 16, 64, 64), (3, 14, 56, 84), (2, 16, 48, 32)])
def test_reference_against_patch_loop(norm_pix: bool, n: int, p: int, hh: int, ww: int) -> None:
    g = torch.Generator().manual_seed(hh + n)
    num_patches = (hh // p) * (ww // p)
    imgs = torch.randn(n, 3, hh, ww, generator=g)
    pred = torch.randn(n, num_patches, p * p * 3, generator=g)
    _, _, mask = ops.random_masking(torch.rand(n, num_patches, generator=g), max(1, num_patches // 4))
    got = masked_mse_reference(pred, imgs, mask, p, norm_pix)
    assert_rel_close(got, _loop_loss(pred, imgs, mask, p, norm_pix), 1e-6, "loss")


def test_gradient_only_on_removed_patches() -> None:
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 4, 768, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    (grad,) = torch.autograd.grad(ops.masked_mse(pred, imgs, mask, 16, True), pred)
    assert torch.all(grad[mask == 0] == 0) and torch.all(grad[mask == 1].abs().sum(-1) > 0)


def test_public_validates() -> None:
    imgs, pred, mask = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 768), torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"pred must have shape \(2, 4, 768\)"):
        ops.masked_mse(torch.randn(2, 4, 767), imgs, mask, 16, False)
    with pytest.raises(ValueError, match="patch_size must be a positive int dividing H=32"):
        ops.masked_mse(pred, imgs, mask, 5, False)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 4\)"):
        ops.masked_mse(pred, imgs, torch.ones(2, 5), 16, False)


# ---- triton backend (interpreter here, TRITON_INTERPRET=1 from conftest; CUDA in the gpu tests) ----

from fastmae.ops.dispatch import BackendUnavailableError  # noqa: E402
from numerics import rel_err  # noqa: E402

# (batch, patch, H, W): 196 and 256 patches at 224 px (p=16, p=14), 256 at p=16, non-square 4x6 grids
MAE_SHAPES = [(3, 16, 224, 224), (1, 14, 224, 224), (1, 16, 256, 256), (3, 16, 64, 96), (1, 14, 56, 84)]


def _case(n: int, p: int, hh: int, ww: int, seed: int = 0, dtype: torch.dtype = torch.float32,
          device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pred (N, L, P), imgs (N, 3, H, W) with a non-zero mean, MAE mask (N, L) at ratio 0.75."""
    g = torch.Generator().manual_seed(seed)
    num_patches = (hh // p) * (ww // p)
    imgs = torch.randn(n, 3, hh, ww, generator=g) * 1.5 + 0.4
    pred = torch.randn(n, num_patches, p * p * 3, generator=g)
    _, _, mask = ops.random_masking(torch.rand(n, num_patches, generator=g), num_patches - int(num_patches * 0.75))
    return pred.to(device, dtype), imgs.to(device, dtype), mask.to(device)


def _loss_and_grad(backend: str, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, p: int,
                   norm_pix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pred = pred.detach().requires_grad_(True)
    loss = ops.masked_mse(pred, imgs, mask, p, norm_pix, backend=backend)
    (grad,) = torch.autograd.grad(loss, pred)
    return loss.detach(), grad


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("n,p,hh,ww", MAE_SHAPES)
def test_triton_matches_reference(norm_pix: bool, n: int, p: int, hh: int, ww: int) -> None:
    pred, imgs, mask = _case(n, p, hh, ww, seed=n + p + hh)
    loss, grad = _loss_and_grad("triton", pred, imgs, mask, p, norm_pix)
    want_loss, want_grad = _loss_and_grad("reference", pred, imgs, mask, p, norm_pix)
    assert loss.dtype == want_loss.dtype and grad.dtype == pred.dtype and loss.shape == ()
    assert_rel_close(loss, want_loss, 1e-5, "loss")
    assert_rel_close(grad, want_grad, 1e-5, "grad")
    assert torch.all(grad[mask == 0] == 0)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_triton_general_mask_weights_and_strided_inputs(norm_pix: bool) -> None:
    """Float weights give sum(per_patch * mask) / sum(mask); non-contiguous pred and channels-last imgs."""
    pred, imgs, mask = _case(3, 16, 64, 96, seed=7)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)) * 2 * mask  # 0 on kept
    pred_t = pred.transpose(1, 2).contiguous().transpose(1, 2)  # (N, L, P) with stride 1 along L
    imgs_cl = imgs.contiguous(memory_format=torch.channels_last)
    weights_t = weights.t().contiguous().t()  # (N, L) with stride 1 along N
    loss, grad = _loss_and_grad("triton", pred_t, imgs_cl, weights_t, 16, norm_pix)
    want_loss, want_grad = _loss_and_grad("reference", pred, imgs, weights, 16, norm_pix)
    assert_rel_close(loss, want_loss, 1e-5, "loss")
    assert_rel_close(grad, want_grad, 1e-5, "grad")


def test_triton_gpu_tiling_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter runs larger tiles (fewer programs); this runs the GPU's (4 patches a program)."""
    import fastmae.kernels.masked_mse as kernel

    monkeypatch.setattr(kernel, "INTERPRETER_TILE", kernel.GPU_TILE)
    pred, imgs, mask = _case(1, 14, 224, 224, seed=3)
    loss, grad = _loss_and_grad("triton", pred, imgs, mask, 14, True)
    want_loss, want_grad = _loss_and_grad("reference", pred, imgs, mask, 14, True)
    assert_rel_close(loss, want_loss, 1e-5, "loss")
    assert_rel_close(grad, want_grad, 1e-5, "grad")


@pytest.mark.parametrize("norm_pix", [False, True])
def test_triton_bit_identical_across_runs(norm_pix: bool) -> None:
    pred, imgs, mask = _case(3, 16, 224, 224, seed=11)
    first = _loss_and_grad("triton", pred, imgs, mask, 16, norm_pix)
    second = _loss_and_grad("triton", pred, imgs, mask, 16, norm_pix)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.filterwarnings("ignore::RuntimeWarning", r"ignore:var\(\)")  # 0/0 on purpose
def test_triton_no_removed_patch_and_empty_batch_as_reference() -> None:
    """sum(mask) == 0: NaN loss and NaN gradient, as the reference's 0/0; an empty batch gives NaN."""
    pred, imgs, mask = _case(2, 16, 32, 48)
    loss, grad = _loss_and_grad("triton", pred, imgs, torch.zeros_like(mask), 16, True)
    want_loss, want_grad = _loss_and_grad("reference", pred, imgs, torch.zeros_like(mask), 16, True)
    assert loss.isnan() and want_loss.isnan() and grad.isnan().all() and want_grad.isnan().all()
    loss, grad = _loss_and_grad("triton", pred[:0], imgs[:0], mask[:0], 16, False)
    assert loss.isnan() and grad.shape == (0, 6, 768)


# bf16/fp16 inputs through the interpreter, against the fp32 reference on the same (rounded) values:
# the kernel computes in fp32 from exactly those values, so the only errors are the final roundings
# of the loss and of each gradient element to the low-precision dtype: relative 2^-9 (bf16) or 2^-12
# (fp16) per value; the bounds allow twice that.
LOW_TOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_triton_low_precision_inputs(dtype: torch.dtype, norm_pix: bool) -> None:
    pred, imgs, mask = _case(3, 16, 64, 96, seed=5, dtype=dtype)
    loss, grad = _loss_and_grad("triton", pred, imgs, mask.to(dtype), 16, norm_pix)
    want_loss, want_grad = _loss_and_grad("reference", pred.float(), imgs.float(), mask, 16, norm_pix)
    assert loss.dtype == dtype and grad.dtype == dtype  # the reference's dtype for all-low-precision inputs
    assert_rel_close(loss, want_loss, LOW_TOL[dtype], "loss")
    assert_rel_close(grad, want_grad, LOW_TOL[dtype], "grad")


@pytest.mark.parametrize("pred_dtype,imgs_dtype,mask_dtype", [
    (torch.bfloat16, torch.float32, torch.float32),  # autocast's pred, fp32 images
    (torch.bfloat16, torch.bfloat16, torch.float32),  # an fp32 mask promotes the loss to fp32
    (torch.float16, torch.bfloat16, torch.float16),  # fp16 with bf16 promotes to fp32
])
def test_triton_mixed_dtypes_give_the_reference_dtype(pred_dtype: torch.dtype, imgs_dtype: torch.dtype,
                                                      mask_dtype: torch.dtype) -> None:
    pred, imgs, mask = _case(1, 16, 64, 96, seed=9)
    pred, imgs, mask = pred.to(pred_dtype), imgs.to(imgs_dtype), mask.to(mask_dtype)
    loss, grad = _loss_and_grad("triton", pred, imgs, mask, 16, True)
    want_loss, _ = _loss_and_grad("reference", pred, imgs, mask, 16, True)
    fp32_loss, fp32_grad = _loss_and_grad("reference", pred.float(), imgs.float(), mask.float(), 16, True)
    assert loss.dtype == want_loss.dtype and grad.dtype == pred_dtype
    assert_rel_close(loss, fp32_loss, 2.0**-8, "loss")  # see LOW_TOL
    assert_rel_close(grad, fp32_grad, 2.0**-8, "grad")


def test_triton_supports_refuses() -> None:
    pred, imgs, mask = _case(1, 16, 32, 48)
    backend = ops.OPS["masked_mse"].backend("triton")
    assert backend.why_not((pred, imgs, mask, 16, True, 1e-6)) is None
    refused = {
        "imgs requires grad": (pred, imgs.clone().requires_grad_(True), mask),
        "mask requires grad": (pred, imgs, mask.clone().requires_grad_(True)),
        "integer mask": (pred, imgs, mask.long()),
        "fp64 pred": (pred.double(), imgs, mask),
    }
    for what, (pr, im, ma) in refused.items():
        assert backend.why_not((pr, im, ma, 16, True, 1e-6)), what
        with pytest.raises(BackendUnavailableError, match="triton"):
            ops.masked_mse(pr, im, ma, 16, True, backend="triton")
    big = (torch.empty(1, 1, 64 * 64 * 3), torch.empty(1, 3, 64, 64), torch.ones(1, 1), 64, True, 1e-6)
    assert "P = 12288" in backend.why_not(big)
    with torch.no_grad():  # no gradient asked for: images that require grad are fine
        assert backend.why_not((pred, imgs.clone().requires_grad_(True), mask, 16, True, 1e-6)) is None


# ---- GPU (skipped without CUDA) ----


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("n,p,hh,ww", [(64, 16, 224, 224), (32, 14, 224, 224), (3, 16, 64, 96)])
def test_triton_low_precision_on_gpu(dtype: torch.dtype, norm_pix: bool, n: int, p: int, hh: int, ww: int) -> None:
    """Error vs the fp32 reference at most twice PyTorch's own (the reference in dtype), plus a floor."""
    pred, imgs, mask = _case(n, p, hh, ww, seed=n + p, device="cuda")
    want_loss, want_grad = _loss_and_grad("reference", pred, imgs, mask, p, norm_pix)
    low = (pred.to(dtype), imgs.to(dtype), mask.to(dtype))
    torch_loss, torch_grad = _loss_and_grad("reference", *low, p, norm_pix)
    loss, grad = _loss_and_grad("triton", *low, p, norm_pix)
    assert loss.dtype == torch_loss.dtype and grad.dtype == dtype
    floor = 2.0**-10
    assert rel_err(loss, want_loss) <= 2 * rel_err(torch_loss, want_loss) + floor
    assert rel_err(grad, want_grad) <= 2 * rel_err(torch_grad, want_grad) + floor


@pytest.mark.gpu
def test_triton_on_gpu_fp32_autocast_and_determinism() -> None:
    pred, imgs, mask = _case(64, 16, 224, 224, seed=2, device="cuda")
    loss, grad = _loss_and_grad("triton", pred, imgs, mask, 16, True)
    want_loss, want_grad = _loss_and_grad("reference", pred, imgs, mask, 16, True)
    assert_rel_close(loss, want_loss, 1e-5, "loss")
    assert_rel_close(grad, want_grad, 1e-5, "grad")
    again = _loss_and_grad("triton", pred, imgs, mask, 16, True)
    assert torch.equal(loss, again[0]) and torch.equal(grad, again[1])
    with torch.autocast("cuda", dtype=torch.bfloat16):  # bf16 pred, fp32 images: fp32 loss, as the reference
        low = pred.bfloat16()
        got, _ = _loss_and_grad("triton", low, imgs, mask, 16, True)
        want, _ = _loss_and_grad("reference", low, imgs, mask, 16, True)
    assert got.dtype == want.dtype == torch.float32
    assert_rel_close(got, want, 1e-5, "autocast loss")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_opcheck_on_gpu(dtype: torch.dtype) -> None:
    import fastmae.kernels.masked_mse  # noqa: F401  (registers the ops)

    pred, imgs, mask = _case(2, 16, 64, 96, seed=4, dtype=dtype, device="cuda")
    pred.requires_grad_(True)
    torch.library.opcheck(torch.ops.fastmae_triton.masked_mse.default, (pred, imgs, mask, 16, True, 1e-6, dtype))
    mask_sum = mask.sum().float()
    grad_loss = torch.ones((), device="cuda", dtype=dtype)
    torch.library.opcheck(torch.ops.fastmae_triton.masked_mse_backward.default,
                          (grad_loss, mask_sum, pred.detach(), imgs, mask, 16, True, 1e-6))


# ---- cuda backend: fastmae._C (its C++ CPU implementation here; the CUDA kernels in the gpu tests) ----

from fastmae.extension import extension_status  # noqa: E402

_EXT_LOADED, _EXT_DETAIL = extension_status()
needs_ext = pytest.mark.skipif(not _EXT_LOADED, reason=f"fastmae._C is not built here: {_EXT_DETAIL}")


@pytest.fixture
def ext() -> None:
    """fastmae._C loaded and its fake and autograd registered (what the cuda backend's availability does)."""
    assert ops.OPS["masked_mse"].backend("cuda").available() is None


@needs_ext
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("n,p,hh,ww", MAE_SHAPES)
def test_cuda_cpu_matches_reference(ext: None, norm_pix: bool, n: int, p: int, hh: int, ww: int) -> None:
    pred, imgs, mask = _case(n, p, hh, ww, seed=n + p + hh)
    loss, grad = _loss_and_grad("cuda", pred, imgs, mask, p, norm_pix)
    want_loss, want_grad = _loss_and_grad("reference", pred, imgs, mask, p, norm_pix)
    assert loss.dtype == want_loss.dtype and grad.dtype == pred.dtype and loss.shape == ()
    assert_rel_close(loss, want_loss, 1e-5, "loss")
    assert_rel_close(grad, want_grad, 1e-5, "grad")
    assert torch.all(grad[mask == 0] == 0)


@needs_ext
@pytest.mark.parametrize("norm_pix", [False, True])
def test_cuda_cpu_general_mask_weights_and_strided_inputs(ext: None, norm_pix: bool) -> None:
    """Float weights give sum(per_patch * mask) / sum(mask); non-contiguous pred, channels-last imgs."""
    pred, imgs, mask = _case(3, 16, 64, 96, seed=7)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)) * 2 * mask  # 0 on kept
    pred_t = pred.transpose(1, 2).contiguous().transpose(1, 2)  # (N, L, P) with stride 1 along L
    imgs_cl = imgs.contiguous(memory_format=torch.channels_last)
    weights_t = weights.t().contiguous().t()  # (N, L) with stride 1 along N
    loss, grad = _loss_and_grad("cuda", pred_t, imgs_cl, weights_t, 16, norm_pix)
    want_loss, want_grad = _loss_and_grad("reference", pred, imgs, weights, 16, norm_pix)
    assert_rel_close(loss, want_loss, 1e-5, "loss")
    assert_rel_close(grad, want_grad, 1e-5, "grad")


@needs_ext
@pytest.mark.parametrize("p,channels", [(8, 3), (32, 3), (16, 1), (2, 1)])  # P = 192, 3072, 256, 4
def test_cuda_cpu_other_patch_sizes(ext: None, p: int, channels: int) -> None:
    g = torch.Generator().manual_seed(p)
    imgs = torch.randn(3, channels, 4 * p, 2 * p, generator=g)
    pred = torch.randn(3, 8, p * p * channels, generator=g)
    mask = (torch.rand(3, 8, generator=g) < 0.6).float()
    mask[0, 0] = 1.0
    for norm_pix in (False, True):
        loss, grad = _loss_and_grad("cuda", pred, imgs, mask, p, norm_pix)
        want_loss, want_grad = _loss_and_grad("reference", pred, imgs, mask, p, norm_pix)
        assert_rel_close(loss, want_loss, 1e-5, "loss")
        assert_rel_close(grad, want_grad, 1e-5, "grad")


@needs_ext
@pytest.mark.parametrize("norm_pix", [False, True])
def test_cuda_cpu_bit_identical_across_runs_and_threads(ext: None, norm_pix: bool) -> None:
    """Per-patch partials added in patch order: the same bits whatever the number of threads."""
    pred, imgs, mask = _case(3, 16, 224, 224, seed=11)
    first = _loss_and_grad("cuda", pred, imgs, mask, 16, norm_pix)
    second = _loss_and_grad("cuda", pred, imgs, mask, 16, norm_pix)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _loss_and_grad("cuda", pred, imgs, mask, 16, norm_pix)
    finally:
        torch.set_num_threads(threads)
    for other in (second, single):
        assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])


@needs_ext
@pytest.mark.filterwarnings("ignore::RuntimeWarning", r"ignore:var\(\)")  # 0/0 on purpose
def test_cuda_cpu_no_removed_patch_and_empty_batch_as_reference(ext: None) -> None:
    """sum(mask) == 0: NaN loss and NaN gradient, as the reference's 0/0; an empty batch gives NaN."""
    pred, imgs, mask = _case(2, 16, 32, 48)
    loss, grad = _loss_and_grad("cuda", pred, imgs, torch.zeros_like(mask), 16, True)
    assert loss.isnan() and grad.isnan().all()
    loss, grad = _loss_and_grad("cuda", pred[:0], imgs[:0], mask[:0], 16, False)
    assert loss.isnan() and grad.shape == (0, 6, 768)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_cuda_cpu_low_precision_inputs(ext: None, dtype: torch.dtype, norm_pix: bool) -> None:
    """Against the fp32 reference on the same rounded values: see LOW_TOL (fp32 or better accumulation
    from exactly those values, so only the final roundings of the loss and of each gradient element)."""
    pred, imgs, mask = _case(3, 16, 64, 96, seed=5, dtype=dtype)
    loss, grad = _loss_and_grad("cuda", pred, imgs, mask.to(dtype), 16, norm_pix)
    want_loss, want_grad = _loss_and_grad("reference", pred.float(), imgs.float(), mask, 16, norm_pix)
    assert loss.dtype == dtype and grad.dtype == dtype  # the reference's dtype for all-low-precision inputs
    assert_rel_close(loss, want_loss, LOW_TOL[dtype], "loss")
    assert_rel_close(grad, want_grad, LOW_TOL[dtype], "grad")


@needs_ext
@pytest.mark.parametrize("pred_dtype,imgs_dtype,mask_dtype", [
    (torch.bfloat16, torch.float32, torch.float32),  # autocast's pred, fp32 images
    (torch.bfloat16, torch.bfloat16, torch.float32),  # an fp32 mask promotes the loss to fp32
    (torch.float16, torch.bfloat16, torch.float16),  # fp16 with bf16 promotes to fp32
])
def test_cuda_cpu_mixed_dtypes_give_the_reference_dtype(ext: None, pred_dtype: torch.dtype, imgs_dtype: torch.dtype,
                                                        mask_dtype: torch.dtype) -> None:
    pred, imgs, mask = _case(1, 16, 64, 96, seed=9)
    pred, imgs, mask = pred.to(pred_dtype), imgs.to(imgs_dtype), mask.to(mask_dtype)
    loss, grad = _loss_and_grad("cuda", pred, imgs, mask, 16, True)
    want_loss, _ = _loss_and_grad("reference", pred, imgs, mask, 16, True)
    fp32_loss, fp32_grad = _loss_and_grad("reference", pred.float(), imgs.float(), mask.float(), 16, True)
    assert loss.dtype == want_loss.dtype and grad.dtype == pred_dtype
    assert_rel_close(loss, fp32_loss, 2.0**-8, "loss")  # see LOW_TOL
    assert_rel_close(grad, fp32_grad, 2.0**-8, "grad")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_opcheck_on_cpu(ext: None, dtype: torch.dtype) -> None:
    pred, imgs, mask = _case(2, 16, 64, 96, seed=4, dtype=dtype)
    pred.requires_grad_(True)
    torch.library.opcheck(torch.ops.fastmae.masked_mse.default, (pred, imgs, mask, 16, True, 1e-6))
    grad_loss = torch.ones((), dtype=torch.float32 if dtype == torch.float32 else dtype)
    torch.library.opcheck(torch.ops.fastmae.masked_mse_backward.default,
                          (grad_loss, mask.sum(), pred.detach(), imgs, mask, 16, True, 1e-6))


@needs_ext
def test_cuda_meta_shapes_and_clear_errors(ext: None) -> None:
    """The fake gives the output dtypes; mixed devices and bad arguments fail with a message naming them."""
    pred, imgs, mask = _case(2, 16, 32, 48)
    loss, mask_sum = torch.ops.fastmae.masked_mse(pred.bfloat16().to("meta"), imgs.to("meta"), mask.to("meta"), 16,
                                                  True, 1e-6)
    assert loss.shape == () and loss.dtype == torch.float32 and mask_sum.dtype == torch.float32
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        torch.ops.fastmae.masked_mse(pred, imgs.to("meta"), mask, 16, True, 1e-6)
    with pytest.raises(RuntimeError, match=r"mask must have shape \(2, 6\) = \(N, L\)"):
        torch.ops.fastmae.masked_mse(pred, imgs, mask[:, :5], 16, True, 1e-6)
    with pytest.raises(RuntimeError, match=r"pred must have shape \(2, 24, 192\) = \(N, L, p\*p\*C\)"):
        torch.ops.fastmae.masked_mse(pred, imgs, mask, 8, True, 1e-6)
    with pytest.raises(RuntimeError, match="pred must be float32, bfloat16 or float16, got Double"):
        torch.ops.fastmae.masked_mse(pred.double(), imgs, mask, 16, True, 1e-6)
    with pytest.raises(RuntimeError, match="grad_loss must be a 0-dim"):
        torch.ops.fastmae.masked_mse_backward(torch.ones(1), mask.sum(), pred, imgs, mask, 16, True, 1e-6)
    with pytest.raises(RuntimeError, match="mask_sum must be a 0-dim float32"):
        torch.ops.fastmae.masked_mse_backward(torch.ones(()), mask.sum().half(), pred, imgs, mask, 16, True, 1e-6)
    # called directly (past the supports rule), imgs that require grad fail loudly instead of getting none
    loss, _ = torch.ops.fastmae.masked_mse(pred.requires_grad_(True), imgs.requires_grad_(True), mask, 16, True, 1e-6)
    with pytest.raises(RuntimeError, match="no gradient for imgs or mask"):
        loss.backward()


@needs_ext
def test_cuda_supports_refuses(ext: None) -> None:
    pred, imgs, mask = _case(1, 16, 32, 48)
    backend = ops.OPS["masked_mse"].backend("cuda")
    assert backend.why_not((pred, imgs, mask, 16, True, 1e-6)) is None
    refused = {
        "imgs requires grad": (pred, imgs.clone().requires_grad_(True), mask),
        "mask requires grad": (pred, imgs, mask.clone().requires_grad_(True)),
        "integer mask": (pred, imgs, mask.long()),
        "fp64 pred": (pred.double(), imgs, mask),
    }
    for what, (pr, im, ma) in refused.items():
        assert backend.why_not((pr, im, ma, 16, True, 1e-6)), what
        with pytest.raises(BackendUnavailableError, match="cuda"):
            ops.masked_mse(pr, im, ma, 16, True, backend="cuda")
    with torch.no_grad():  # no gradient asked for: images that require grad are fine
        assert backend.why_not((pred, imgs.clone().requires_grad_(True), mask, 16, True, 1e-6)) is None
    big = (torch.empty(1, 1, 64 * 64 * 3), torch.empty(1, 3, 64, 64), torch.ones(1, 1), 64, True, 1e-6)
    assert backend.why_not(big) is None  # the CPU implementation has no patch-size limit
    assert "P = 12288" in backend.why_not(tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in big))
    assert "one device" in backend.why_not((pred, imgs.to("meta"), mask, 16, True, 1e-6))
    # on CPU tensors the priority list keeps the reference; the C++ implementation runs when named
    assert ops.OPS["masked_mse"].select((pred, imgs, mask, 16, True, 1e-6)).name == "reference"


# ---- cuda backend on a GPU (skipped without CUDA) ----

# (batch, patch, H, W): MAE shapes, the three kernel configurations (P = 192, 768, 588, 3072), odd batches
GPU_SHAPES = [(64, 16, 224, 224), (32, 14, 224, 224), (3, 16, 64, 96), (1, 14, 56, 84), (3, 8, 64, 96),
              (3, 32, 128, 64)]


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("n,p,hh,ww", GPU_SHAPES)
def test_cuda_matches_reference_and_triton_on_gpu(ext: None, norm_pix: bool, n: int, p: int, hh: int,
                                                   ww: int) -> None:
    pred, imgs, mask = _case(n, p, hh, ww, seed=n + p, device="cuda")
    loss, grad = _loss_and_grad("cuda", pred, imgs, mask, p, norm_pix)
    want_loss, want_grad = _loss_and_grad("reference", pred, imgs, mask, p, norm_pix)
    assert loss.dtype == want_loss.dtype and grad.dtype == pred.dtype
    assert_rel_close(loss, want_loss, 1e-5, "loss")
    assert_rel_close(grad, want_grad, 1e-5, "grad")
    assert torch.all(grad[mask == 0] == 0)
    if ops.OPS["masked_mse"].backend("triton").why_not((pred, imgs, mask, p, norm_pix, 1e-6)) is None:
        triton_loss, triton_grad = _loss_and_grad("triton", pred, imgs, mask, p, norm_pix)
        assert_rel_close(loss, triton_loss, 1e-5, "loss vs triton")
        assert_rel_close(grad, triton_grad, 1e-5, "grad vs triton")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("n,p,hh,ww", [(64, 16, 224, 224), (32, 14, 224, 224), (3, 16, 64, 96)])
def test_cuda_low_precision_on_gpu(ext: None, dtype: torch.dtype, norm_pix: bool, n: int, p: int, hh: int,
                                   ww: int) -> None:
    """Error vs the fp32 reference at most twice PyTorch's own (the reference in dtype), plus a floor."""
    pred, imgs, mask = _case(n, p, hh, ww, seed=n + p, device="cuda")
    want_loss, want_grad = _loss_and_grad("reference", pred, imgs, mask, p, norm_pix)
    low = (pred.to(dtype), imgs.to(dtype), mask.to(dtype))
    torch_loss, torch_grad = _loss_and_grad("reference", *low, p, norm_pix)
    loss, grad = _loss_and_grad("cuda", *low, p, norm_pix)
    assert loss.dtype == torch_loss.dtype and grad.dtype == dtype
    floor = 2.0**-10
    assert rel_err(loss, want_loss) <= 2 * rel_err(torch_loss, want_loss) + floor
    assert rel_err(grad, want_grad) <= 2 * rel_err(torch_grad, want_grad) + floor


@pytest.mark.gpu
@needs_ext
def test_cuda_on_gpu_strides_weights_autocast_and_determinism(ext: None) -> None:
    pred, imgs, mask = _case(64, 16, 224, 224, seed=2, device="cuda")
    loss, grad = _loss_and_grad("cuda", pred, imgs, mask, 16, True)
    again = _loss_and_grad("cuda", pred, imgs, mask, 16, True)
    assert torch.equal(loss, again[0]) and torch.equal(grad, again[1])
    weights = torch.rand(mask.shape, device="cuda") * 2 * mask
    pred_t = pred.transpose(1, 2).contiguous().transpose(1, 2)  # copied to contiguous rows by the op
    imgs_cl = imgs.contiguous(memory_format=torch.channels_last)
    got = _loss_and_grad("cuda", pred_t, imgs_cl, weights.t().contiguous().t(), 16, True)
    want = _loss_and_grad("reference", pred, imgs, weights, 16, True)
    assert_rel_close(got[0], want[0], 1e-5, "weighted loss")
    assert_rel_close(got[1], want[1], 1e-5, "weighted grad")
    with torch.autocast("cuda", dtype=torch.bfloat16):  # bf16 pred and mask: fp32 loss, as the reference
        low = pred.bfloat16()
        got, _ = _loss_and_grad("cuda", low, imgs.bfloat16(), mask.bfloat16(), 16, True)
        want, _ = _loss_and_grad("reference", low, imgs.bfloat16(), mask.bfloat16(), 16, True)
    assert got.dtype == want.dtype == torch.float32
    loss, grad = _loss_and_grad("cuda", pred, imgs, torch.zeros_like(mask), 16, True)
    assert loss.isnan() and grad.isnan().all()
    loss, grad = _loss_and_grad("cuda", pred[:0], imgs[:0], mask[:0], 16, True)
    assert loss.isnan() and grad.shape == (0, 196, 768)


@pytest.mark.gpu
@needs_ext
def test_cuda_errors_on_gpu(ext: None) -> None:
    pred, imgs, mask = _case(1, 16, 32, 48, device="cuda")
    with pytest.raises(RuntimeError, match="all tensors must be on one CUDA device"):
        torch.ops.fastmae.masked_mse(pred, imgs.cpu(), mask, 16, True, 1e-6)
    big = (torch.zeros(1, 1, 64 * 64 * 3, device="cuda"), torch.zeros(1, 3, 64, 64, device="cuda"),
           torch.ones(1, 1, device="cuda"), 64, True, 1e-6)
    with pytest.raises(RuntimeError, match="P = p\\*p\\*C must be <= 4096, got 12288"):
        torch.ops.fastmae.masked_mse(*big)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_opcheck_on_gpu(ext: None, dtype: torch.dtype) -> None:
    pred, imgs, mask = _case(2, 16, 64, 96, seed=4, dtype=dtype, device="cuda")
    pred.requires_grad_(True)
    torch.library.opcheck(torch.ops.fastmae.masked_mse.default, (pred, imgs, mask, 16, True, 1e-6))
    torch.library.opcheck(torch.ops.fastmae.masked_mse_backward.default,
                          (torch.ones((), device="cuda", dtype=dtype), mask.sum(), pred.detach(), imgs, mask, 16,
                           True, 1e-6))
