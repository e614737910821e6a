import pytest
import torch

from fastmae import ops
from fastmae.ops.random_masking import (
    philox4x32_10,
    philox_noise_reference,
    random_masking_philox,
    random_masking_philox_reference,
    random_masking_reference,
)


@pytest.mark.parametrize("n,num_patches,len_keep", [(1, 196, 49), (3, 256, 64), (5, 49, 1), (2, 16, 16), (7, 24, 12)])
def test_reference_keeps_smallest_noise(n: int, num_patches: int, len_keep: int) -> None:
    noise = torch.rand(n, num_patches, generator=torch.Generator().manual_seed(n))
    ids_keep, ids_restore, mask = random_masking_reference(noise, len_keep)
    assert ids_keep.shape == (n, len_keep) and ids_restore.shape == (n, num_patches) and mask.shape == (n, num_patches)
    assert ids_keep.dtype == ids_restore.dtype == torch.int64 and mask.dtype == torch.float32
    want = torch.argsort(noise, dim=1)[:, :len_keep]
    assert torch.equal(ids_keep, want)  # same set, same (ascending-noise) order as the official code
    assert torch.equal(mask.sum(1), torch.full((n,), float(num_patches - len_keep)))
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(n, len_keep))
    # ids_restore undoes the shuffle: shuffled order gathered by ids_restore is patch order
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(num_patches).expand(n, -1))


def test_public_matches_reference_and_validates() -> None:
    noise = torch.rand(3, 196)
    for got, want in zip(ops.random_masking(noise, 49), random_masking_reference(noise, 49)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="noise must have 2 dimensions"):
        ops.random_masking(torch.rand(3, 14, 14), 49)
    with pytest.raises(TypeError, match="floating-point"):
        ops.random_masking(torch.ones(3, 196, dtype=torch.int64), 49)
    with pytest.raises(ValueError, match=r"len_keep must be an int in \[1, L=196\]"):
        ops.random_masking(noise, 0)
    with pytest.raises(ValueError, match="len_keep"):
        ops.random_masking(noise, 197)


# --- triton backend (interpreter on CPU here; the gpu-marked tests run on CUDA) -------------------------------

# The op is a permutation: every backend must give exactly the reference's integers, in any dtype.
SHAPES = [(3, 196, 49), (1, 256, 64), (3, 16, 16), (2, 24, 12), (1, 49, 1), (1, 1024, 256)]
LOW_PRECISION = [torch.bfloat16, torch.float16]


def _assert_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for name, g, w in zip(("ids_keep", "ids_restore", "mask"), got, want):
        assert g.dtype == w.dtype and g.device == w.device, name
        assert torch.equal(g, w), name


@pytest.mark.parametrize("n,num_patches,len_keep", SHAPES)
def test_triton_equals_reference(n: int, num_patches: int, len_keep: int) -> None:
    noise = torch.rand(n, num_patches, generator=torch.Generator().manual_seed(num_patches + n))
    _assert_same(ops.random_masking(noise, len_keep, backend="triton"), random_masking_reference(noise, len_keep))


def test_triton_ties_nan_inf_signed_zero_as_stable_argsort() -> None:
    """Counting ranks ties by index and NaN last, as ``argsort(stable=True)``; -0.0 ties with 0.0."""
    coarse = torch.randint(0, 5, (3, 196), generator=torch.Generator().manual_seed(0)).float()  # many ties
    _assert_same(ops.random_masking(coarse, 49, backend="triton"), random_masking_reference(coarse, 49))
    nan, inf = float("nan"), float("inf")
    special = torch.tensor([[nan, 1.0, -0.0, 0.0, nan, inf, -inf, 0.0, -0.0, 1.0, 1.0, 0.5, -inf, inf, 2.0, nan]])
    for len_keep in (1, 5, 11, 16):
        _assert_same(ops.random_masking(special, len_keep, backend="triton"), random_masking_reference(special, len_keep))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("num_patches,len_keep", [(196, 49), (256, 64)])
def test_triton_low_precision_equals_fp32_reference(dtype: torch.dtype, num_patches: int, len_keep: int) -> None:
    """Tolerance 0: bf16/fp16 -> fp32 is exact and order-preserving, so the kernel's fp32 ranks are those of the
    reference on the same (rounded, tie-rich) noise, whether it sorts it in its own dtype or in fp32."""
    noise = torch.rand(3, num_patches, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = ops.random_masking(noise, len_keep, backend="triton")
    _assert_same(got, random_masking_reference(noise.float(), len_keep))
    _assert_same(got, random_masking_reference(noise, len_keep))


def test_triton_non_contiguous_and_requires_grad_noise() -> None:
    noise = torch.rand(196, 3, generator=torch.Generator().manual_seed(2)).t()  # (3, 196), stride (1, 3)
    _assert_same(ops.random_masking(noise, 49, backend="triton"), random_masking_reference(noise, 49))
    noise = noise.clone().requires_grad_()  # irrelevant: the outputs carry no gradient
    got = ops.random_masking(noise, 49, backend="triton")
    assert not any(t.requires_grad for t in got)
    _assert_same(got, random_masking_reference(noise.detach(), 49))


def test_triton_ops_schema_and_autograd_registration() -> None:
    """opcheck's checks that run under the interpreter (fake-tensor and compile checks need a GPU)."""
    from fastmae.kernels.random_masking import random_masking_op, random_masking_philox_op

    checks = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(random_masking_op, (torch.rand(2, 24), 6), test_utils=checks)
    torch.library.opcheck(random_masking_philox_op, (2, 24, 6, 5, 7, torch.device("cpu")), test_utils=checks)


def test_triton_supports_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    triton_backend = ops.OPS["random_masking"].backend("triton")
    noise = torch.rand(2, 196)
    assert triton_backend.why_not((noise, 49)) is None
    assert ops.OPS["random_masking"].select((noise, 49)).name == "reference"  # CPU: not by priority
    refused = {
        "1025 patches > 1024": (torch.rand(1, 1025), 256),
        "fp32/bf16/fp16": (noise.double(), 49),
    }
    for reason, args in refused.items():
        assert reason in (triton_backend.why_not(args) or ""), reason
        with pytest.raises(ops.BackendUnavailableError, match=reason):
            ops.random_masking(*args, backend="triton")
    philox_backend = ops.OPS["random_masking_philox"].backend("triton")
    cpu = torch.device("cpu")
    assert philox_backend.why_not((2, 196, 49, 0, 0, cpu)) is None
    assert ops.OPS["random_masking_philox"].select((2, 196, 49, 0, 0, cpu)).name == "reference"
    assert "1025 patches > 1024" in philox_backend.why_not((1, 1025, 256, 0, 0, cpu))
    with pytest.raises(ops.BackendUnavailableError, match="1025 patches > 1024"):
        random_masking_philox(1, 1025, 256, 0, 0, "cpu", backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "interpreter" in triton_backend.why_not((noise, 49))
    assert "interpreter" in philox_backend.why_not((2, 196, 49, 0, 0, cpu))


# --- Philox mode ---------------------------------------------------------------------------------------------


def test_philox_reference_known_answers() -> None:
    """Philox4x32-10 known-answer vectors of Random123 (kat_vectors), the generator tl.rand runs."""
    vectors = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, want in vectors:
        got = philox4x32_10(tuple(torch.tensor([c]) for c in counter), key)
        assert tuple(w.item() for w in got) == want


def test_philox_noise_reference_is_uniform_float32() -> None:
    noise = philox_noise_reference(4, 256, seed=3, step=11, device="cpu")
    assert noise.shape == (4, 256) and noise.dtype == torch.float32
    assert 0.0 <= noise.min().item() and noise.max().item() < 1.0
    assert abs(noise.mean().item() - 0.5) < 0.03  # 1024 draws: std of the mean ~ 0.009
    assert not torch.equal(noise[0], noise[1])  # each sample its own stream


@pytest.mark.parametrize("n,num_patches,len_keep", SHAPES)
def test_triton_philox_equals_reference(n: int, num_patches: int, len_keep: int) -> None:
    cpu = torch.device("cpu")
    for seed, step in [(1234, 7), (0, 0), (1, 1), (2**40 + 17, 2**31 - 1)][: 1 if num_patches == 1024 else 4]:
        got = random_masking_philox(n, num_patches, len_keep, seed, step, "cpu", backend="triton")
        _assert_same(got, random_masking_philox_reference(n, num_patches, len_keep, seed, step, cpu))


def test_triton_philox_noise_is_tl_rand() -> None:
    """philox_noise_reference is, bit for bit, ``tl.rand(seed, step * 2**32 + n*L + l)``."""
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(out_ptr, seed, step, num_patches, BLOCK: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        offset = (step.to(tl.int64) << 32) + n * num_patches + cols
        tl.store(out_ptr + n * num_patches + cols, tl.rand(seed, offset), mask=cols < num_patches)

    for seed, step in [(0, 0), (5, 3), (2**32 + 5, 9), (2**63 - 1, 2**31 - 1)]:
        out = torch.empty(3, 196)
        rand_kernel[(3,)](out, seed, step, 196, BLOCK=256)
        assert torch.equal(out, philox_noise_reference(3, 196, seed, step, "cpu")), (seed, step)


def test_philox_masks_reproducible_and_keyed() -> None:
    def masks(seed: int, step: int) -> tuple[torch.Tensor, ...]:
        return random_masking_philox(3, 196, 49, seed, step, "cpu", backend="triton")

    first = masks(42, 100)
    _assert_same(masks(42, 100), first)  # a resumed run at step 100 draws the same masks
    for other in (masks(42, 101), masks(43, 100)):  # another step, another seed
        assert all(not torch.equal(a, b) for a, b in zip(other[1], first[1]))  # every sample differs
    assert not torch.equal(first[1][0], first[1][1])  # samples of one batch differ


@pytest.mark.parametrize("num_patches,len_keep", [(196, 49), (256, 64)])
def test_philox_kept_set_is_argsort_of_reference_noise(num_patches: int, len_keep: int) -> None:
    noise = philox_noise_reference(3, num_patches, 9, 5, "cpu")
    ids_keep, ids_restore, mask = random_masking_philox(3, num_patches, len_keep, 9, 5, "cpu", backend="triton")
    assert torch.equal(ids_keep, torch.argsort(noise, dim=1, stable=True)[:, :len_keep])
    assert torch.equal(ids_keep.sort(1).values, torch.argsort(noise, dim=1)[:, :len_keep].sort(1).values)
    assert torch.equal(mask, (ids_restore >= len_keep).float())


def test_philox_public_validates_and_defaults_to_reference_on_cpu() -> None:
    got = random_masking_philox(2, 24, 6, 3, 4, "cpu")
    _assert_same(got, random_masking_philox_reference(2, 24, 6, 3, 4, torch.device("cpu")))
    bad = {
        "num_samples must be a positive int": (0, 24, 6, 3, 4),
        "num_patches must be a positive int": (2, 0, 6, 3, 4),
        r"len_keep must be an int in \[1, L=24\]": (2, 24, 25, 3, 4),
        r"seed must be an int in \[0, 2\*\*63\)": (2, 24, 6, -1, 4),
        r"step must be an int in \[0, 2\*\*31\)": (2, 24, 6, 3, 2**31),
        r"num_samples \* num_patches must be <= 2\*\*32": (2**23 + 1, 512, 6, 3, 4),
    }
    for message, args in bad.items():
        with pytest.raises(ValueError, match=message):
            random_masking_philox(*args, "cpu")


# --- GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("n,num_patches,len_keep", [(256, 196, 49), (64, 256, 64), (8, 1024, 256)])
def test_triton_gpu_equals_fp32_reference(dtype: torch.dtype, n: int, num_patches: int, len_keep: int) -> None:
    """Tolerance 0 in every dtype (see test_triton_low_precision_equals_fp32_reference); ties abound in bf16."""
    noise = torch.rand(n, num_patches, device="cuda").to(dtype)
    got = ops.random_masking(noise, len_keep, backend="triton")
    _assert_same(got, random_masking_reference(noise.float(), len_keep))
    _assert_same(ops.random_masking(noise, len_keep, backend="triton"), got)  # bit-identical run to run


@pytest.mark.gpu
@pytest.mark.parametrize("n,num_patches,len_keep", [(256, 196, 49), (64, 256, 64), (8, 1024, 256)])
def test_triton_gpu_philox_equals_reference(n: int, num_patches: int, len_keep: int) -> None:
    for seed, step in [(0, 0), (1, 1), (1234, 7), (2**40 + 17, 2**31 - 1)]:
        got = random_masking_philox(n, num_patches, len_keep, seed, step, "cuda", backend="triton")
        _assert_same(got, random_masking_philox_reference(n, num_patches, len_keep, seed, step, torch.device("cuda")))
        cpu = random_masking_philox_reference(n, num_patches, len_keep, seed, step, torch.device("cpu"))
        assert all(torch.equal(g.cpu(), c) for g, c in zip(got, cpu))  # the same masks on any device


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_triton_gpu_opcheck(dtype: torch.dtype) -> None:
    from fastmae.kernels.random_masking import random_masking_op, random_masking_philox_op

    torch.library.opcheck(random_masking_op, (torch.rand(3, 196, device="cuda").to(dtype), 49))
    torch.library.opcheck(random_masking_philox_op, (3, 196, 49, 5, 7, torch.device("cuda")))


def test_philox_noise_is_pinned_across_versions() -> None:
    """Masks must survive upgrades (a resumed run re-draws them): the stream's values are fixed here,
    and the Triton kernel equals this reference bit for bit (tests above)."""
    from fastmae.ops.random_masking import philox_noise_reference

    noise = philox_noise_reference(2, 196, 1234, 7, "cpu")
    want = [float.fromhex(h) for h in ("0x1.e456fep-2", "0x1.5da66ap-1", "0x1.68aaaap-1", "0x1.bb4d0ep-1")]
    assert noise[1, :4].tolist() == want
