import pytest
import torch

from fastmae import ops
from fastmae.ops.random_masking import random_masking_reference


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
