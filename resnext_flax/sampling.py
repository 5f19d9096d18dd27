"""Repeated augmentation: torchvision's reference ``RASampler``, without torch.

Each epoch shuffles the dataset, repeats every index ``repetitions`` times in a row and deals
the result out to the replicas round-robin, so the copies of one image land on different
replicas (each augmented differently there). Every replica then keeps only
``floor(len // 256 * 256 / num_replicas)`` indices, so an epoch has as many steps as without
repetition but sees about ``1 / repetitions`` of the distinct images.

The order is the reference's own for the same seed and epoch: its shuffle is
``torch.randperm`` with a ``torch.Generator`` seeded ``seed + epoch``, and :func:`torch_randperm`
computes that permutation with numpy (the same Mersenne Twister, seeded the same way, and the
same Fisher-Yates walk), so a run and its torchvision counterpart visit the same images in the
same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import numpy as np

#: torch's CPU ``randperm`` takes a different algorithm (64-bit draws) from this length on.
TORCH_RANDPERM_LIMIT = (2**32 - 1) // 20


def torch_randperm(n: int, seed: int) -> np.ndarray:
    """``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` on the CPU.

    torch seeds its MT19937 with the low 32 bits of the seed (as numpy's legacy seeding does)
    and swaps position ``i`` with ``i + random() % (n - i)`` for ``i = 0 .. n - 2``.
    """
    n, seed = _whole(n, "n"), _whole(seed, "seed")
    if n < 0 or seed < 0:
        raise ValueError(f"n and seed must be >= 0, got n={n}, seed={seed}")
    if n >= TORCH_RANDPERM_LIMIT:
        raise ValueError(f"torch draws permutations of {TORCH_RANDPERM_LIMIT} or more items "
                         f"differently; n={n} is not supported")
    bits = np.random.MT19937()
    bits.state = np.random.RandomState(seed % 2**32).get_state(legacy=False)
    raw = bits.random_raw(max(n - 1, 0)).astype(np.int64)
    offsets = (raw % np.arange(n, 1, -1, dtype=np.int64)).tolist()
    order = list(range(n))
    for i, offset in enumerate(offsets):  # sequential swaps: not vectorizable
        j = i + offset
        order[i], order[j] = order[j], order[i]
    return np.asarray(order, dtype=np.int64)


class RASampler:
    """The indices one replica reads in an epoch, as torchvision's reference ``RASampler``.

    ``RASampler(dataset_or_length, num_replicas=W, rank=r, shuffle=True, seed=s,
    repetitions=3)``; call :meth:`set_epoch` before each epoch (as the reference's training
    loop does) or pass the epoch to :meth:`indices`. With ``num_replicas`` = the number of
    data-parallel workers the reference had (GPUs), replica ``r``'s list is that GPU's.
    """

    def __init__(self, dataset: Sized | int, *, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0, repetitions: int = 3) -> None:
        length = _whole(dataset if isinstance(dataset, int | np.integer) else len(dataset),
                        "the dataset's length")
        self.num_replicas = _whole(num_replicas, "num_replicas")
        self.rank = _whole(rank, "rank")
        self.repetitions = _whole(repetitions, "repetitions")
        self.seed = _whole(seed, "seed")
        if length < 1:
            raise ValueError("the dataset is empty")
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got "
                             f"num_replicas={num_replicas}, rank={rank}")
        if self.repetitions < 1:
            raise ValueError(f"repetitions must be at least 1, got {repetitions}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.length = length
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.num_samples = math.ceil(length * float(self.repetitions) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.num_selected_samples = math.floor(length // 256 * 256 / self.num_replicas)
        if self.num_selected_samples == 0:
            raise ValueError(f"a dataset of {length} items gives each of {self.num_replicas} "
                             "replicas no samples: the sampler keeps len // 256 * 256 of them")

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order :meth:`__iter__` gives (the shuffle's seed is seed + epoch)."""
        self.epoch = _whole(epoch, "epoch")

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This replica's dataset indices for `epoch` (default: the one set last)."""
        epoch = self.epoch if epoch is None else _whole(epoch, "epoch")
        order = (torch_randperm(self.length, self.seed + epoch) if self.shuffle
                 else np.arange(self.length, dtype=np.int64))
        repeated = np.repeat(order, self.repetitions)
        # Padded from its own start to a multiple of num_replicas, as the reference does.
        repeated = np.concatenate([repeated, repeated[:self.total_size - repeated.size]])
        return repeated[self.rank:self.total_size:self.num_replicas][:self.num_selected_samples]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_selected_samples


def _whole(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)
