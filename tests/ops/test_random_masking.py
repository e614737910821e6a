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


def _assert_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    """The same masks: equal dtypes and values (wherever each lies)."""
    for name, g, w in zip(("ids_keep", "ids_restore", "mask"), got, want):
        assert g.dtype == w.dtype, name
        assert torch.equal(g.cpu(), w.cpu()), name


@pytest.mark.parametrize("n,num_patches,len_keep", [(1, 196, 49), (3, 256, 64), (5, 49, 1), (2, 16, 16), (7, 24, 12),
                                                    (2, 16, 0)])
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
    ids_keep, _, mask = ops.random_masking(noise, 0)  # K = 0 (mask ratio 1.0): every patch removed
    assert ids_keep.shape == (3, 0) and torch.equal(mask, torch.ones(3, 196))
    with pytest.raises(ValueError, match=r"len_keep must be an int in \[0, L=196\], got -1"):
        ops.random_masking(noise, -1)
    with pytest.raises(ValueError, match="len_keep"):
        ops.random_masking(noise, 197)


# --- Philox mode: the reference ----------------------------------------------------------------------------


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
        return random_masking_philox(3, 196, 49, seed, step, "cpu")

    first = masks(42, 100)
    _assert_same(masks(42, 100), first)  # a resumed run at step 100 draws the same masks
    for other in (masks(42, 101), masks(43, 100)):  # another step, another seed
        assert all(not torch.equal(a, b) for a, b in zip(other[1], first[1]))  # every sample differs
    assert not torch.equal(first[1][0], first[1][1])  # samples of one batch differ


def test_philox_noise_is_pinned_across_versions() -> None:
    """Masks must survive upgrades (a resumed run re-draws them): the stream's values are fixed here,
    and the Triton kernel equals this reference bit for bit (tests above)."""
    from fastmae.ops.random_masking import philox_noise_reference

    noise = philox_noise_reference(2, 196, 1234, 7, "cpu")
    want = [float.fromhex(h) for h in ("0x1.e456fep-2", "0x1.5da66ap-1", "0x1.68aaaap-1", "0x1.bb4d0ep-1")]
    assert noise[1, :4].tolist() == want


def test_philox_public_validates_and_defaults_to_reference_on_cpu() -> None:
    got = random_masking_philox(2, 24, 6, 3, 4, "cpu")
    _assert_same(got, random_masking_philox_reference(2, 24, 6, 3, 4, torch.device("cpu")))
    bad = {
        "num_samples must be a positive int": (0, 24, 6, 3, 4),
        "num_patches must be a positive int": (2, 0, 6, 3, 4),
        r"len_keep must be an int in \[0, L=24\]": (2, 24, 25, 3, 4),
        r"seed must be an int in \[0, 2\*\*63\)": (2, 24, 6, -1, 4),
        r"step must be an int in \[0, 2\*\*31\)": (2, 24, 6, 3, 2**31),
        r"num_samples \* num_patches must be <= 2\*\*32": (2**23 + 1, 512, 6, 3, 4),
    }
    for message, args in bad.items():
        with pytest.raises(ValueError, match=message):
            random_masking_philox(*args, "cpu")




# --- kernel backends (triton: the interpreter here; cuda: fastmae._C's CPU implementation here) --------------
# tests/ops/test_backends.py checks every backend against the reference on the op's cases (fp32 on CPU,
# bf16/fp16 on a GPU), determinism, the fake and opcheck; these test what those cases do not reach. Every output
# is a permutation or a 0/1 mask, exactly what torch computes: the tolerance is 0 in every dtype.

from fastmae.ops._kernels import KERNEL_BACKENDS  # noqa: E402
from fastmae.ops.random_masking import MAX_CUDA_PATCHES, random_masking_philox_op  # noqa: E402

OP = ops.OPS["random_masking"]
PHILOX = ops.OPS["random_masking_philox"]
KERNELS = [b.name for b in OP.backends if b.name in KERNEL_BACKENDS]
LOW_PRECISION = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, *LOW_PRECISION]
CPU = torch.device("cpu")
NAN, INF = float("nan"), float("inf")
# ties, NaN of either sign, infinities and signed zeros: the last entry is a negative NaN
SPECIAL = [[NAN, 1.0, -0.0, 0.0, NAN, INF, -INF, 0.0, -0.0, 1.0, 1.0, 0.5, -INF, INF, 2.0, -NAN]]


# (N, L, K): K = 1 and K = L, a non-square 12x16 grid, L past each CUDA tile (256 -> 128x4, 512 -> 256x4)
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,num_patches,len_keep", [(5, 49, 1), (2, 16, 16), (3, 192, 48), (2, 300, 75),
                                                    (1, 513, 128)])
def test_shapes_and_low_precision_exactly_as_reference(backend: str, dtype: torch.dtype, n: int, num_patches: int,
                                                       len_keep: int) -> None:
    """Tolerance 0 in every dtype: bf16/fp16 -> fp32 is exact and order-preserving, so the ranks are those of the
    reference on the same (rounded, tie-rich) noise, whether it sorts it in its own dtype or in fp32."""
    noise = torch.rand(n, num_patches, generator=torch.Generator().manual_seed(num_patches + n)).to(dtype)
    got = ops.random_masking(noise, len_keep, backend=backend)
    _assert_same(got, random_masking_reference(noise, len_keep))
    _assert_same(got, random_masking_reference(noise.float(), len_keep))


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_ties_nan_inf_signed_zero_as_stable_argsort(backend: str) -> None:
    """Ties by index, every NaN (either sign) last and by index, -0.0 tied with 0.0: torch.argsort(stable=True)."""
    coarse = torch.randint(0, 5, (3, 196), generator=torch.Generator().manual_seed(0)).float()  # many ties
    _assert_same(ops.random_masking(coarse, 49, backend=backend), random_masking_reference(coarse, 49))
    constant = torch.full((2, 196), 0.25)
    _assert_same(ops.random_masking(constant, 49, backend=backend), random_masking_reference(constant, 49))
    special = torch.tensor(SPECIAL)
    assert special[0, 15].isnan() and special[0, 15].signbit()
    for len_keep in (0, 1, 5, 11, 16):
        got = ops.random_masking(special, len_keep, backend=backend)
        _assert_same(got, random_masking_reference(special, len_keep))
    for dtype in LOW_PRECISION:
        _assert_same(ops.random_masking(special.to(dtype), 11, backend=backend), random_masking_reference(special, 11))


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_non_contiguous_requires_grad_and_empty_noise(backend: str) -> None:
    noise = torch.rand(196, 3, generator=torch.Generator().manual_seed(2)).t()  # (3, 196), stride (1, 3)
    _assert_same(ops.random_masking(noise, 49, backend=backend), random_masking_reference(noise, 49))
    noise = noise.clone().requires_grad_()  # the outputs carry no gradient, as the reference's
    got = ops.random_masking(noise, 49, backend=backend)
    assert not any(t.requires_grad for t in got)
    _assert_same(got, random_masking_reference(noise.detach(), 49))
    empty = torch.rand(0, 196)
    _assert_same(ops.random_masking(empty, 49, backend=backend), random_masking_reference(empty, 49))


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_supports_refuses(backend: str, without_interpreter: object) -> None:
    rules, philox_rules = OP.backend(backend), PHILOX.backend(backend)
    noise = torch.rand(2, 196)
    assert rules.why_not((noise, 49), OP.arg_names) is None
    assert philox_rules.why_not((2, 196, 49, 0, 0, CPU), PHILOX.arg_names) is None
    assert OP.select((noise, 49)).name == "reference"  # on CPU tensors the kernels run only when named
    assert PHILOX.select((2, 196, 49, 0, 0, CPU)).name == "reference"
    limit = f"L={MAX_CUDA_PATCHES + 1} patches > {MAX_CUDA_PATCHES}"  # the triton kernel's limit is the same
    refused = {limit: (torch.rand(1, MAX_CUDA_PATCHES + 1), 256),
               f"{backend} takes fp32/bf16/fp16, got noise torch.float64": (noise.double(), 49)}
    for reason, args in refused.items():
        assert reason in (rules.why_not(args, OP.arg_names) or ""), reason
        with pytest.raises(ops.BackendUnavailableError, match=reason):
            ops.random_masking(*args, backend=backend)
    assert limit in philox_rules.why_not((1, MAX_CUDA_PATCHES + 1, 256, 0, 0, CPU), PHILOX.arg_names)
    with pytest.raises(ops.BackendUnavailableError, match=limit):
        random_masking_philox(1, MAX_CUDA_PATCHES + 1, 256, 0, 0, "cpu", backend=backend)
    if backend == "triton":  # without the interpreter, CPU tensors are refused with a reason naming it
        assert "interpreter" in without_interpreter(rules).why_not((noise, 49), OP.arg_names)
        assert "interpreter" in without_interpreter(philox_rules).why_not((2, 196, 49, 0, 0, CPU), PHILOX.arg_names)


def test_cuda_cpu_has_no_patch_limit_and_checks_its_arguments() -> None:
    """The patch limit is the CUDA kernel's: fastmae._C's CPU implementation, called directly, sorts any L. Its
    own checks name what was expected and what was given (RuntimeError)."""
    if OP.backend("cuda").available() is not None:
        pytest.skip(f"fastmae._C cannot run here: {OP.backend('cuda').available()}")
    fastmae_c = torch.ops.fastmae_C
    long_noise = torch.rand(2, 1500)
    _assert_same(fastmae_c.random_masking(long_noise, 375), random_masking_reference(long_noise, 375))
    noise = torch.rand(2, 24)
    _assert_same(fastmae_c.random_masking(noise, 0), random_masking_reference(noise, 0))
    bad = {
        r"noise must be \(N, L\), got 3 dimensions": lambda: fastmae_c.random_masking(torch.rand(2, 4, 6), 6),
        r"len_keep must be in \[0, L=24\], got 25": lambda: fastmae_c.random_masking(noise, 25),
        r"len_keep must be in \[0, L=24\], got -1": lambda: fastmae_c.random_masking(noise, -1),
        "noise must be float32, bfloat16 or float16, got Double": lambda: fastmae_c.random_masking(noise.double(), 6),
        r"seed_step must be an int64 tensor \[seed, step\] of shape \(2,\), got Int":
            lambda: fastmae_c.random_masking_philox(torch.tensor([1, 2], dtype=torch.int32), 2, 24, 6),
        r"seed_step must be an int64 tensor \[seed, step\] of shape \(2,\), got Long \[3\]":
            lambda: fastmae_c.random_masking_philox(torch.tensor([1, 2, 3]), 2, 24, 6),
        r"num_samples \* num_patches must be <= 2\^32":
            lambda: fastmae_c.random_masking_philox(torch.tensor([1, 2]), 2**23 + 1, 512, 6),
    }
    for message, call in bad.items():
        with pytest.raises(RuntimeError, match=message):
            call()


# The Philox mode's op has no case in test_backends.py's opcheck and fake tests: they are here.

@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("n,num_patches,len_keep,seed,step", [
    (3, 196, 49, 0, 0), (3, 196, 49, 1, 1), (2, 256, 64, 2**63 - 1, 5),  # the largest seed: key word 1 = 2^31 - 1
    (1, 1024, 256, 1234, 7), (2, 300, 75, 2**40 + 17, 2**31 - 1), (2, 16, 0, 5, 3),
])
def test_philox_equals_reference(backend: str, n: int, num_patches: int, len_keep: int, seed: int, step: int) -> None:
    got = random_masking_philox(n, num_patches, len_keep, seed, step, "cpu", backend=backend)
    _assert_same(got, random_masking_philox_reference(n, num_patches, len_keep, seed, step, CPU))


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("num_patches,len_keep", [(196, 49), (256, 64)])
def test_philox_kept_set_is_argsort_of_reference_noise(backend: str, num_patches: int, len_keep: int) -> None:
    noise = philox_noise_reference(3, num_patches, 9, 5, "cpu")
    ids_keep, ids_restore, mask = random_masking_philox(3, num_patches, len_keep, 9, 5, "cpu", backend=backend)
    assert torch.equal(ids_keep, torch.argsort(noise, dim=1, stable=True)[:, :len_keep])
    assert torch.equal(ids_keep.sort(1).values, torch.argsort(noise, dim=1)[:, :len_keep].sort(1).values)
    assert torch.equal(mask, (ids_restore >= len_keep).float())


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_philox_op_reads_seed_step_tensor_opcheck_and_fake(backend: str) -> None:
    """The op takes ``seed_step = [seed, step]`` as a tensor: updating it in place draws the next step's masks;
    opcheck (schema, fake, autograd registration) and the fake's shapes on meta."""
    seed_step = torch.tensor([42, 100], dtype=torch.int64)
    first = random_masking_philox_op(seed_step, 3, 196, 49, backend)
    _assert_same(first, random_masking_philox_reference(3, 196, 49, 42, 100, CPU))
    seed_step[1] += 1
    _assert_same(random_masking_philox_op(seed_step, 3, 196, 49, backend),
                 random_masking_philox_reference(3, 196, 49, 42, 101, CPU))
    torch.library.opcheck(random_masking_philox_op, (torch.tensor([5, 7]), 2, 24, 6, backend))
    got = random_masking_philox(4, 256, 64, 1, 2, "meta", backend=backend)
    assert [t.shape for t in got] == [(4, 64), (4, 256), (4, 256)] and all(t.is_meta for t in got)
    assert [t.dtype for t in got] == [torch.int64, torch.int64, torch.float32]


# --- on a GPU (skipped without CUDA) -----------------------------------------------------------------------------

GPU_SHAPES = [(256, 196, 49), (64, 256, 64), (7, 300, 75), (5, 600, 150), (8, 1024, 256), (1, 16, 16), (4, 16, 0)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,num_patches,len_keep", GPU_SHAPES)
def test_gpu_exactly_as_cpu_reference(backend: str, dtype: torch.dtype, n: int, num_patches: int,
                                      len_keep: int) -> None:
    """Tolerance 0 in every dtype (ties abound in bf16): the reference on the same device and on CPU; bit-identical
    run to run."""
    noise = torch.rand(n, num_patches, device="cuda").to(dtype)
    got = ops.random_masking(noise, len_keep, backend=backend)
    _assert_same(got, random_masking_reference(noise.float(), len_keep))
    _assert_same(got, random_masking_reference(noise.float().cpu(), len_keep))
    _assert_same(ops.random_masking(noise, len_keep, backend=backend), got)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_gpu_ties_nan_inf_signed_zero(backend: str) -> None:
    """Against the CPU reference (torch's stable CUDA sort is not the spec for NaN and -0.0)."""
    special = torch.tensor(SPECIAL)
    coarse = torch.randint(0, 5, (64, 196), generator=torch.Generator().manual_seed(0)).float()
    for noise, len_keep in [(special, 1), (special, 5), (special, 11), (special, 16), (coarse, 49)]:
        for dtype in DTYPES:
            got = ops.random_masking(noise.to("cuda", dtype), len_keep, backend=backend)
            _assert_same(got, random_masking_reference(noise.to(dtype), len_keep))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("n,num_patches,len_keep", [(256, 196, 49), (64, 256, 64), (5, 600, 150), (8, 1024, 256)])
def test_gpu_philox_equals_cpu_reference(backend: str, n: int, num_patches: int, len_keep: int) -> None:
    """The same masks on any device."""
    for seed, step in [(0, 0), (1, 1), (1234, 7), (2**40 + 17, 2**31 - 1), (2**63 - 1, 5)]:
        got = random_masking_philox(n, num_patches, len_keep, seed, step, "cuda", backend=backend)
        _assert_same(got, random_masking_philox_reference(n, num_patches, len_keep, seed, step, torch.device("cuda")))
        _assert_same(got, random_masking_philox_reference(n, num_patches, len_keep, seed, step, CPU))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_gpu_philox_graph_replay_advances_step(backend: str) -> None:
    """Captured once; each replay after ``seed_step[1] = step`` draws that step's masks (seed_step is read on the
    device); opcheck of the op on CUDA tensors."""
    seed_step = torch.tensor([7, 0], dtype=torch.int64, device="cuda")
    random_masking_philox_op(seed_step, 64, 196, 49, backend)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = random_masking_philox_op(seed_step, 64, 196, 49, backend)
    for step in (0, 1, 2):
        seed_step[1].fill_(step)
        graph.replay()
        _assert_same(outs, random_masking_philox_reference(64, 196, 49, 7, step, CPU))
    torch.library.opcheck(random_masking_philox_op, (torch.tensor([5, 7], device="cuda"), 3, 196, 49, backend))


@pytest.mark.gpu
def test_cuda_gpu_errors_patch_limit() -> None:
    if OP.backend("cuda").available() is not None:
        pytest.skip(f"fastmae._C cannot run here: {OP.backend('cuda').available()}")
    with pytest.raises(RuntimeError, match=r"1 <= L <= 1024 patches .* got L=1025"):
        torch.ops.fastmae_C.random_masking(torch.rand(2, 1025, device="cuda"), 256)
