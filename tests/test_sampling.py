"""The repeated-augmentation sampler against torchvision's reference ``RASampler``.

The reference (``references/classification/sampler.py``) is not an installed package, so its
``__iter__`` is written out below as the oracle, using torch's own ``randperm``."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch

from resnext_flax import sampling


def reference_ra_indices(length: int, *, num_replicas: int, rank: int, seed: int, epoch: int,
                         repetitions: int, shuffle: bool = True) -> list[int]:
    """torchvision's ``RASampler.__iter__``, line for line."""
    num_samples = int(math.ceil(length * float(repetitions) / num_replicas))  # noqa: RUF046
    total_size = num_samples * num_replicas
    num_selected_samples = int(math.floor(length // 256 * 256 / num_replicas))  # noqa: RUF046
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        indices = torch.randperm(length, generator=g).tolist()
    else:
        indices = list(range(length))
    indices = [ele for ele in indices for i in range(repetitions)]
    indices += indices[: (total_size - len(indices))]
    assert len(indices) == total_size
    indices = indices[rank:total_size:num_replicas]
    assert len(indices) == num_samples
    return indices[:num_selected_samples]


@pytest.mark.parametrize("n, seed", [(0, 0), (1, 3), (10, 0), (1000, 5), (12345, 2**32 + 7),
                                     (100, 2**40 + 3)])
def test_torch_randperm_is_torchs(n: int, seed: int):
    g = torch.Generator()
    g.manual_seed(seed)
    assert sampling.torch_randperm(n, seed).tolist() == torch.randperm(n, generator=g).tolist()


@pytest.mark.parametrize("length, replicas, reps", [(1000, 1, 3), (1000, 4, 3), (777, 8, 4),
                                                    (2049, 3, 2), (600, 2, 1)])
@pytest.mark.parametrize("epoch", [0, 3])
def test_every_rank_reads_the_references_indices(length, replicas, reps, epoch):
    for rank in range(replicas):
        sampler = sampling.RASampler(list(range(length)), num_replicas=replicas, rank=rank,
                                     seed=11, repetitions=reps)
        sampler.set_epoch(epoch)
        expected = reference_ra_indices(length, num_replicas=replicas, rank=rank, seed=11,
                                        epoch=epoch, repetitions=reps)
        assert list(sampler) == expected
        assert len(sampler) == len(expected) == length // 256 * 256 // replicas
        assert sampler.indices(epoch).tolist() == expected


def test_without_shuffle_the_order_is_the_references():
    sampler = sampling.RASampler(512, num_replicas=2, rank=1, shuffle=False, repetitions=3)
    assert list(sampler) == reference_ra_indices(512, num_replicas=2, rank=1, seed=0, epoch=0,
                                                 repetitions=3, shuffle=False)


def test_copies_of_an_image_go_to_different_replicas():
    """What repeated augmentation is for: with as many replicas as repetitions, the copies
    of one image are spread over all replicas, each copy once; epochs differ."""
    length, reps = 1024, 4
    per_rank = [sampling.RASampler(length, num_replicas=reps, rank=r, seed=0,
                                   repetitions=reps).indices(1) for r in range(reps)]
    for indices in per_rank:  # a replica reads no image twice
        assert len(set(indices.tolist())) == len(indices) == length // reps
    counts = collections.Counter(np.concatenate(per_rank).tolist())
    assert set(counts.values()) == {reps}  # each selected image: once on every replica
    assert len(counts) == length // reps
    sampler = sampling.RASampler(length, num_replicas=reps, rank=0, repetitions=reps)
    assert sampler.indices(0).tolist() != sampler.indices(1).tolist()


@pytest.mark.parametrize("kwargs, message", [
    ({"num_replicas": 0}, "num_replicas >= 1"),
    ({"num_replicas": 2, "rank": 2}, "0 <= rank < num_replicas"),
    ({"repetitions": 0}, "repetitions must be at least 1"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"seed": 1.5}, "seed must be an integer"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sampling.RASampler(1000, **kwargs)


def test_a_dataset_too_small_for_the_replicas_is_refused():
    with pytest.raises(ValueError, match="no samples"):
        sampling.RASampler(255)
    with pytest.raises(ValueError, match="empty"):
        sampling.RASampler([])
    with pytest.raises(ValueError, match="not supported"):
        sampling.torch_randperm(sampling.TORCH_RANDPERM_LIMIT, 0)
