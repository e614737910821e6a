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


# ---- kernel backends (triton: the interpreter here; cuda: fastmae._C's CPU implementation here) ----
# tests/ops/test_backends.py checks every backend against the reference on the op's cases (fp32 on CPU,
# bf16/fp16 on a GPU), determinism, the fake and opcheck; these test what those cases do not reach.

from fastmae.ops._kernels import KERNEL_BACKENDS  # noqa: E402
from fastmae.ops.dispatch import BackendUnavailableError  # noqa: E402
from fastmae.ops.masked_mse import masked_mse_op  # noqa: E402

OP = ops.OPS["masked_mse"]
KERNELS = [b.name for b in OP.backends if b.name in KERNEL_BACKENDS]


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


def _assert_matches_reference(backend: str, args: tuple, reference_args: tuple | None = None,
                              tol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``backend``'s loss and gradient on ``args`` against the reference's on ``reference_args`` (default: the
    same); returns the backend's."""
    loss, grad = _loss_and_grad(backend, *args)
    want_loss, want_grad = _loss_and_grad("reference", *(reference_args or args))
    assert_rel_close(loss, want_loss, tol, f"{backend} loss")
    assert_rel_close(grad, want_grad, tol, f"{backend} grad")
    return loss, grad


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("norm_pix", [False, True])
def test_general_mask_weights_and_strided_inputs(backend: str, norm_pix: bool) -> None:
    """Float weights give sum(per_patch * mask) / sum(mask); non-contiguous pred, channels-last imgs, a mask with
    stride 1 along N; the gradient is exactly 0 on the kept (weight 0) patches."""
    pred, imgs, mask = _case(3, 16, 64, 96, seed=7)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)) * 2 * mask  # 0 on kept
    pred_t = pred.transpose(1, 2).contiguous().transpose(1, 2)  # (N, L, P) with stride 1 along L
    imgs_cl = imgs.contiguous(memory_format=torch.channels_last)
    weights_t = weights.t().contiguous().t()  # (N, L) with stride 1 along N
    _, grad = _assert_matches_reference(backend, (pred_t, imgs_cl, weights_t, 16, norm_pix),
                                        (pred, imgs, weights, 16, norm_pix))
    assert torch.all(grad[weights == 0] == 0)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("p,channels", [(8, 3), (32, 3), (16, 1), (2, 1)])  # P = 192, 3072, 256, 4
def test_other_patch_sizes_and_masks(backend: str, p: int, channels: int) -> None:
    """Patch lengths the op's cases do not have, and a mask removing a random ~60% (not a fixed count)."""
    g = torch.Generator().manual_seed(p)
    imgs = torch.randn(3, channels, 4 * p, 2 * p, generator=g)
    pred = torch.randn(3, 8, p * p * channels, generator=g)
    mask = (torch.rand(3, 8, generator=g) < 0.6).float()
    mask[0, 0] = 1.0
    for norm_pix in (False, True):
        _assert_matches_reference(backend, (pred, imgs, mask, p, norm_pix))


def test_triton_gpu_tiling_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter runs larger tiles (fewer programs); this runs the GPU's (4 patches a program)."""
    import fastmae.kernels.masked_mse as kernel

    monkeypatch.setattr(kernel, "INTERPRETER_TILE", kernel.GPU_TILE)
    _assert_matches_reference("triton", (*_case(1, 14, 224, 224, seed=3), 14, True))


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_same_bits_whatever_the_thread_count(backend: str) -> None:
    """Per-patch partials added in patch order: the same bits with one CPU thread as with all of them."""
    args = (*_case(3, 16, 64, 96, seed=11), 16, True)
    many = _loss_and_grad(backend, *args)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _loss_and_grad(backend, *args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(many[0], one[0]) and torch.equal(many[1], one[1])


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.filterwarnings("ignore::RuntimeWarning", r"ignore:var\(\)")  # 0/0 on purpose
def test_no_removed_patch_and_empty_batch_as_reference(backend: str) -> None:
    """sum(mask) == 0: NaN loss and NaN gradient, as the reference's 0/0; an empty batch gives NaN."""
    pred, imgs, mask = _case(2, 16, 32, 48)
    loss, grad = _loss_and_grad(backend, pred, imgs, torch.zeros_like(mask), 16, True)
    want_loss, want_grad = _loss_and_grad("reference", pred, imgs, torch.zeros_like(mask), 16, True)
    assert loss.isnan() and want_loss.isnan() and grad.isnan().all() and want_grad.isnan().all()
    loss, grad = _loss_and_grad(backend, pred[:0], imgs[:0], mask[:0], 16, False)
    assert loss.isnan() and grad.shape == (0, 6, 768)


# bf16/fp16 inputs on CPU, against the fp32 reference on the same (rounded) values: the kernels compute in fp32
# (or better) from exactly those values, so the only errors are the final roundings of the loss and of each
# gradient element to the low-precision dtype: relative 2^-9 (bf16) or 2^-12 (fp16) per value (the interpreter
# may truncate bf16: < 2^-8); the bounds allow twice that.
LOW_TOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_low_precision_inputs_on_cpu(backend: str, dtype: torch.dtype, norm_pix: bool) -> None:
    pred, imgs, mask = _case(3, 16, 64, 96, seed=5, dtype=dtype)
    loss, grad = _assert_matches_reference(backend, (pred, imgs, mask.to(dtype), 16, norm_pix),
                                           (pred.float(), imgs.float(), mask, 16, norm_pix), LOW_TOL[dtype])
    assert loss.dtype == dtype and grad.dtype == dtype  # the reference's dtype for all-low-precision inputs


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("pred_dtype,imgs_dtype,mask_dtype", [
    (torch.bfloat16, torch.float32, torch.float32),  # autocast's pred, fp32 images
    (torch.bfloat16, torch.bfloat16, torch.float32),  # an fp32 mask promotes the loss to fp32
    (torch.float16, torch.bfloat16, torch.float16),  # fp16 with bf16 promotes to fp32
])
def test_mixed_dtypes_give_the_reference_dtype(backend: str, pred_dtype: torch.dtype, imgs_dtype: torch.dtype,
                                               mask_dtype: torch.dtype) -> None:
    """The loss in the reference's dtype (the fake's too, on meta tensors), the gradient in pred's."""
    pred, imgs, mask = _case(1, 16, 64, 96, seed=9)
    pred, imgs, mask = pred.to(pred_dtype), imgs.to(imgs_dtype), mask.to(mask_dtype)
    loss, grad = _assert_matches_reference(backend, (pred, imgs, mask, 16, True),
                                           (pred.float(), imgs.float(), mask.float(), 16, True), 2.0**-8)
    want_loss, _ = _loss_and_grad("reference", pred, imgs, mask, 16, True)
    assert loss.dtype == want_loss.dtype and grad.dtype == pred_dtype
    fake_loss, fake_sum = masked_mse_op(pred.to("meta"), imgs.to("meta"), mask.to("meta"), 16, True, 1e-6, backend)
    assert (fake_loss.shape, fake_loss.dtype, fake_sum.dtype) == ((), want_loss.dtype, torch.float32)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("what", ["imgs requires grad", "mask requires grad", "fp64 pred", "integer mask"])
def test_supports_refuses(backend: str, what: str) -> None:
    pred, imgs, mask = _case(1, 16, 32, 48)
    rules = OP.backend(backend)
    assert rules.why_not((pred, imgs, mask, 16, True, 1e-6), OP.arg_names) is None
    pr, im, ma, needle = {
        "imgs requires grad": (pred, imgs.clone().requires_grad_(True), mask, "gives no gradient for imgs"),
        "mask requires grad": (pred, imgs, mask.clone().requires_grad_(True), "gives no gradient for mask"),
        "fp64 pred": (pred.double(), imgs, mask, "takes fp32/bf16/fp16, got pred torch.float64"),
        "integer mask": (pred, imgs, mask.long(), "floating-point mask"),
    }[what]
    assert needle in (rules.why_not((pr, im, ma, 16, True, 1e-6), OP.arg_names) or "")
    with pytest.raises(BackendUnavailableError, match=f"backend '{backend}'.*{needle}"):
        ops.masked_mse(pr, im, ma, 16, True, backend=backend)
    with torch.no_grad():  # no gradient asked for: images and masks that require grad are fine
        assert rules.why_not((pred, imgs.clone().requires_grad_(True), mask, 16, True, 1e-6), OP.arg_names) is None


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_patch_limit_and_devices(backend: str, without_interpreter: object) -> None:
    """P = 12288 is refused where the kernels hold a patch in registers (triton everywhere; cuda on CUDA, its
    CPU implementation has no limit); several devices are refused; CPU tensors go to the reference by
    priority (the kernels run there only when named)."""
    rules = OP.backend(backend)
    big = (torch.empty(1, 1, 64 * 64 * 3), torch.empty(1, 3, 64, 64), torch.ones(1, 1), 64, True, 1e-6)
    on_meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in big)
    assert "P = 12288 > 4096" in rules.why_not(on_meta, OP.arg_names)
    cpu_reason = rules.why_not(big, OP.arg_names)
    assert cpu_reason is None if backend == "cuda" else "P = 12288 > 4096" in cpu_reason
    pred, imgs, mask = _case(1, 16, 32, 48)
    assert "several devices" in rules.why_not((pred, imgs.to("meta"), mask, 16, True, 1e-6), OP.arg_names)
    assert OP.select((pred, imgs, mask, 16, True, 1e-6)).name == "reference"
    if backend == "triton":  # without the interpreter, CPU tensors are refused with a reason naming it
        reason = without_interpreter(rules).why_not((pred, imgs, mask, 16, True, 1e-6), OP.arg_names)
        assert "triton takes cuda/meta tensors (cpu ones only under the Triton interpreter" in reason


def test_cuda_direct_call_errors() -> None:
    """fastmae._C's own checks (RuntimeError naming what was expected and what was given), for calls that reach
    it past the op's rules (which refuse tensors on several devices: test_patch_limit_and_devices)."""
    if OP.backend("cuda").available() is not None:
        pytest.skip(f"fastmae._C cannot run here: {OP.backend('cuda').available()}")
    fastmae_c = torch.ops.fastmae_C
    pred, imgs, mask = _case(2, 16, 32, 48)
    bad = {
        r"mask must have shape \(2, 6\) = \(N, L\)": lambda: fastmae_c.masked_mse(pred, imgs, mask[:, :5], 16,
                                                                                   True, 1e-6),
        r"pred must have shape \(2, 24, 192\) = \(N, L, p\*p\*C\)": lambda: fastmae_c.masked_mse(pred, imgs, mask, 8,
                                                                                              True, 1e-6),
        "pred must be float32, bfloat16 or float16, got Double": lambda: fastmae_c.masked_mse(pred.double(), imgs,
                                                                                              mask, 16, True, 1e-6),
        "grad_loss must be a 0-dim": lambda: fastmae_c.masked_mse_backward(torch.ones(1), mask.sum(), pred, imgs,
                                                                           mask, 16, True, 1e-6),
        "mask_sum must be a 0-dim float32": lambda: fastmae_c.masked_mse_backward(torch.ones(()), mask.sum().half(),
                                                                                  pred, imgs, mask, 16, True, 1e-6),
    }
    for message, call in bad.items():
        with pytest.raises(RuntimeError, match=message):
            call()


# ---- on a GPU (skipped without CUDA): the kernels' fp32, autocast, strides and edge cases at MAE batch sizes ----

# (batch, patch, H, W): MAE shapes, the cuda kernel's configurations (P = 192, 768, 588, 3072), odd batches
GPU_SHAPES = [(64, 16, 224, 224), (32, 14, 224, 224), (3, 16, 64, 96), (1, 14, 56, 84), (3, 8, 64, 96),
              (3, 32, 128, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("n,p,hh,ww", GPU_SHAPES)
def test_gpu_fp32_matches_reference(backend: str, norm_pix: bool, n: int, p: int, hh: int, ww: int) -> None:
    pred, imgs, mask = _case(n, p, hh, ww, seed=n + p, device="cuda")
    _, grad = _assert_matches_reference(backend, (pred, imgs, mask, p, norm_pix))
    assert torch.all(grad[mask == 0] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.filterwarnings("ignore::RuntimeWarning", r"ignore:var\(\)")  # 0/0 on purpose
def test_gpu_strides_weights_autocast_and_determinism(backend: str) -> None:
    pred, imgs, mask = _case(64, 16, 224, 224, seed=2, device="cuda")
    loss, grad = _loss_and_grad(backend, pred, imgs, mask, 16, True)
    again = _loss_and_grad(backend, pred, imgs, mask, 16, True)
    assert torch.equal(loss, again[0]) and torch.equal(grad, again[1])  # no atomics: bit-identical run to run
    weights = torch.rand(mask.shape, device="cuda") * 2 * mask
    pred_t = pred.transpose(1, 2).contiguous().transpose(1, 2)
    imgs_cl = imgs.contiguous(memory_format=torch.channels_last)
    _assert_matches_reference(backend, (pred_t, imgs_cl, weights.t().contiguous().t(), 16, True),
                              (pred, imgs, weights, 16, True))
    with torch.autocast("cuda", dtype=torch.bfloat16):  # bf16 pred, images and mask: fp32 loss, as the reference
        low = (pred.bfloat16(), imgs.bfloat16(), mask.bfloat16(), 16, True)
        got, _ = _loss_and_grad(backend, *low)
        want, _ = _loss_and_grad("reference", *low)
    assert got.dtype == want.dtype == torch.float32
    assert_rel_close(got, want, 1e-5, "autocast loss")
    loss, grad = _loss_and_grad(backend, pred, imgs, torch.zeros_like(mask), 16, True)
    assert loss.isnan() and grad.isnan().all()
    loss, grad = _loss_and_grad(backend, pred[:0], imgs[:0], mask[:0], 16, True)
    assert loss.isnan() and grad.shape == (0, 196, 768)


@pytest.mark.gpu
def test_cuda_errors_on_gpu() -> None:
    if OP.backend("cuda").available() is not None:
        pytest.skip(f"fastmae._C cannot run here: {OP.backend('cuda').available()}")
    pred, imgs, mask = _case(1, 16, 32, 48, device="cuda")
    with pytest.raises(RuntimeError, match="all tensors must be on one CUDA device"):
        torch.ops.fastmae_C.masked_mse(pred, imgs.cpu(), mask, 16, True, 1e-6)
    big = (torch.zeros(1, 1, 64 * 64 * 3, device="cuda"), torch.zeros(1, 3, 64, 64, device="cuda"),
           torch.ones(1, 1, device="cuda"), 64, True, 1e-6)
    with pytest.raises(RuntimeError, match="P = p\\*p\\*C must be <= 4096, got 12288"):
        torch.ops.fastmae_C.masked_mse(*big)
