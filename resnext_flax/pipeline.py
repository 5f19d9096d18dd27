"""The input pipeline: an :class:`~resnext_flax.datasets.ImageDataset` -> batches of
preprocessed images, decoded on worker processes with Grain.

Why Grain: it is the JAX ecosystem's data loader, and its ``MapDataset`` is index-based. A
batch is a pure function of its position (the shuffle is a seeded permutation per epoch, the
augmentation's random generator is seeded by the element's position), so

- the batches do not depend on how many worker processes decode them;
- the iterator's state is a position (``get_state`` / ``set_state``, saved with Orbax), so an
  interrupted run resumes on exactly the batch it would have seen;
- each process of a multi-process run reads its own slice of every global batch.

Decoding and preprocessing are the library's torchvision-identical functions
(``preprocess_image``, ``augment.augment_image``). An unreadable file never stops an epoch: the
element is marked ``bad`` and the caller reports it (:class:`SkipReport`). In evaluation the
element is masked out (``valid`` False); in training its slot is filled by the next readable
file of the dataset, so every batch stays full (BatchNorm sees real images only).

Every batch is a dict of numpy arrays: ``image`` float32 (B, crop, crop, 3), ``label`` int32,
``index`` int32 (the dataset index of the record asked for; -1 for padding), ``valid`` bool (a
real, readable image), ``bad`` bool (the record asked for could not be read).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import os
import sys
import warnings
from typing import Any

import numpy as np

from resnext_flax.augment import Augmentation, augment_image, check_augmentation
from resnext_flax.datasets import DatasetError, ImageDataset
from resnext_flax.metadata import Preprocessing
from resnext_flax.preprocess import load_image, preprocess_image
from resnext_flax.sampling import RASampler

Batch = dict[str, np.ndarray]

#: Memory a decoding worker process holds besides its batches: an interpreter with NumPy,
#: Pillow, Grain and this package imported.
WORKER_BASE_BYTES = 256 * 2**20
#: The share of the machine's available memory that decoding workers may take; the rest is
#: left to the model, its compiled programs and the training state.
WORKER_MEMORY_SHARE = 0.5

#: How many consecutive unreadable files a training slot may skip before the run stops with
#: an error (a storage failure, not a few bad files).
MAX_CONSECUTIVE_BAD = 64


def _grain() -> Any:
    try:
        import grain
        from absl import flags
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the input pipeline needs Grain: pip install 'resnext-flax[data]'"
                          ) from err
    # Grain reads an absl flag (worker profiling) when JAX is loaded; outside an absl app the
    # flags are unparsed and that read raises. Their defaults are what such a program means.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """How batches are produced.

    - `num_workers`: Grain worker processes decoding batches (0: in the calling process).
    - `num_threads`: threads per process reading batches in parallel (Pillow releases the GIL
      while decoding and resizing, so threads help even without workers).
    - `prefetch`: batches buffered per process (at least `num_threads`). Every buffered
      batch is ``batch x crop x crop x 3`` float32 (256 x 224 x 224: 154 MB), in shared
      memory when it comes from a worker.
    """

    num_workers: int = 0
    num_threads: int = 2
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.num_workers < 0 or self.num_threads < 0 or self.prefetch < 1:
            raise ValueError(f"invalid loader options {self}")


class WorkerCapWarning(UserWarning):
    """More decoding workers were asked for than the machine can run or hold."""


def _cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _available_memory() -> int | None:
    """Bytes that can still be allocated without swapping (Linux's ``MemAvailable``,
    within a cgroup's limit), or None where unknown."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            found += [int(line.split()[1]) * 1024 for line in f
                      if line.startswith("MemAvailable:")]
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            if limit != "max":
                found.append(max(int(limit) - int(f.read()), 0))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def fit_workers(options: LoaderOptions, batch_shape: tuple[int, ...]) -> LoaderOptions:
    """`options` with ``num_workers`` capped by what the machine can run and hold: one worker
    per CPU (decoding is CPU-bound), and workers that each hold ``prefetch`` batches of
    float32 `batch_shape` in shared memory, plus the one they are filling and
    :data:`WORKER_BASE_BYTES`, within :data:`WORKER_MEMORY_SHARE` of the available memory.
    A cap is reported with a :class:`WorkerCapWarning` that says why."""
    if not options.num_workers:
        return options
    batch_bytes = 4 * math.prod(batch_shape)
    per_worker = WORKER_BASE_BYTES + (options.prefetch + 1) * batch_bytes
    cpus, memory = _cpu_count(), _available_memory()
    by_memory = (options.num_workers if memory is None
                 else int(WORKER_MEMORY_SHARE * memory // per_worker))
    cap = min(cpus, by_memory)
    if options.num_workers <= cap:
        return options
    shape = "x".join(map(str, batch_shape))
    room = "" if memory is None else (
        f", and {WORKER_MEMORY_SHARE:.0%} of its {memory / 2**30:.1f} GiB of available "
        f"memory holds {by_memory} workers of {per_worker / 2**20:.0f} MiB each "
        f"({options.prefetch + 1} float32 batches of {shape} and "
        f"{WORKER_BASE_BYTES // 2**20} MiB)")
    warnings.warn(f"using {cap} decoding workers, not the {options.num_workers} asked for: "
                  f"this machine has {cpus} CPUs{room}", WorkerCapWarning, stacklevel=3)
    return dataclasses.replace(options, num_workers=cap)


def _decode(path: str) -> Any:
    """The RGB PIL image, or None if the file cannot be read as an image (any decoder error:
    Pillow raises OSError, SyntaxError, ValueError and others on corrupt files). A file that
    no longer exists is no bad image but a dataset gone stale: an error."""
    try:
        return load_image(path)
    except FileNotFoundError as err:
        raise DatasetError(f"{path!r} was listed in the dataset but no longer exists (deleted, "
                           "or its storage is gone)") from err
    except Exception:  # every decoder failure means "unreadable"
        return None


def _element(image: np.ndarray, label: int, index: int, valid: bool, bad: bool) -> Batch:
    return {"image": image, "label": np.int32(label), "index": np.int32(index),
            "valid": np.bool_(valid), "bad": np.bool_(bad)}


class _EvalRecord:
    """Position -> preprocessed element (center crop); positions past the end are padding."""

    def __init__(self, dataset: ImageDataset, config: Preprocessing):
        self.paths, self.labels, self.config = dataset.paths, dataset.labels, config

    def __call__(self, position: int) -> Batch:
        size = self.config.crop_size
        if position >= len(self.paths):
            return _element(np.zeros((size, size, 3), np.float32), 0, -1, False, False)
        image = _decode(self.paths[position])
        if image is None:
            return _element(np.zeros((size, size, 3), np.float32), int(self.labels[position]),
                            position, False, True)
        return _element(preprocess_image(image, self.config), int(self.labels[position]),
                        position, True, False)


class _TrainRecord:
    """Dataset index (already shuffled) -> augmented element (:func:`augment_image`: crop,
    flip, auto-augment, normalization, erasing); an unreadable file is replaced by the next
    readable one (its own label), and marked ``bad``."""

    def __init__(self, dataset: ImageDataset, config: Preprocessing,
                 augmentation: Augmentation):
        check_augmentation(config, augmentation)  # here, not in a worker
        self.paths, self.labels = dataset.paths, dataset.labels
        self.config, self.augmentation = config, augmentation

    def __call__(self, index: int, rng: np.random.Generator) -> Batch:
        index = int(index)
        tried = min(MAX_CONSECUTIVE_BAD, len(self.paths))
        for offset in range(tried):
            record = (index + offset) % len(self.paths)
            image = _decode(self.paths[record])
            if image is not None:
                pixels = augment_image(image, self.config, rng, self.augmentation)
                return _element(pixels, int(self.labels[record]), index, True, offset > 0)
        if tried == len(self.paths):
            raise DatasetError(f"none of the dataset's {tried} files can be read as an image "
                               f"(first: {self.paths[index]!r})")
        raise DatasetError(
            f"{tried} consecutive files from {self.paths[index]!r} on exist but none can be "
            "read as an image; is the storage healthy?")


class BatchLoader:
    """An iterator over a position-indexed Grain dataset of batches.

    Its state is the position alone (``{"position": k}``): batch ``k`` is a function of ``k``,
    so :meth:`set_state` reopens the Grain pipeline at batch ``k`` — with any number of
    workers, which Grain's own multi-process iterator state does not allow. ``len()`` is the
    number of batches; ``steps_per_epoch`` the batches per epoch.
    """

    def __init__(self, batches: Any, steps_per_epoch: int, options: LoaderOptions):
        self._batches, self.steps_per_epoch, self.options = batches, steps_per_epoch, options
        self.position = 0
        self._iterator: Any = None

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> Batch:
        if self.position >= len(self._batches):
            self.close()
            raise StopIteration
        if self._iterator is None:
            self._iterator = iter(self._open(self.position))
        batch = next(self._iterator)
        self.position += 1
        if self.options.num_workers:
            # Out of the workers' shared memory, which then goes back at once: a batch the
            # caller still holds at exit would otherwise outlive Grain's cleanup.
            batch = {key: np.array(value) for key, value in batch.items()}
        return batch

    def _open(self, position: int) -> Any:
        grain = _grain()
        # Grain uses at most prefetch_buffer_size threads.
        buffer = max(self.options.prefetch, self.options.num_threads)
        iter_dataset = self._batches[position:].to_iter_dataset(grain.ReadOptions(
            num_threads=self.options.num_threads, prefetch_buffer_size=buffer))
        if self.options.num_workers:
            _check_main_guard()
            iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.options.num_workers,
                per_worker_buffer_size=self.options.prefetch))
        return iter_dataset

    def get_state(self) -> dict[str, int]:
        """``{"position": k}``: the next batch is batch ``k``."""
        return {"position": self.position}

    def set_state(self, state: dict[str, int]) -> None:
        """Continue at batch ``state["position"]``."""
        position = int(state["position"])
        if not 0 <= position <= len(self._batches):
            raise ValueError(f"position {position} is outside the {len(self._batches)} batches")
        self.close()
        self.position = position

    def close(self) -> None:
        """Stop Grain's worker processes and threads (reopened on the next batch), and free
        the shared memory of the batches they had prefetched before returning."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()
            del iterator
            _release_shared_memory()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_main_guard() -> None:
    """A one-line RuntimeError when worker processes are started from a script's top level
    outside ``if __name__ == "__main__":``.

    Grain starts workers with multiprocessing's ``spawn``, which runs the script again in each
    worker; unguarded, every worker would start workers in turn, multiprocessing stops it
    ("An attempt has been made to start a new process before the current process has finished
    its bootstrapping phase") and the caller sees only "Worker process was terminated
    unexpectedly". Whether the script's current top-level line lies inside an ``if`` on
    ``__name__`` decides; anything else (a notebook, ``python -c``, a thread) is let through.
    """
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    spec_name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    if spec_name.endswith(".__main__"):  # `python -m package`: spawn does not run it again
        return
    frame = inspect.currentframe()
    while frame is not None and not (frame.f_code.co_name == "<module>"
                                     and frame.f_globals.get("__name__") == "__main__"):
        frame = frame.f_back
    if frame is None or not script or (os.path.abspath(frame.f_code.co_filename)
                                       != os.path.abspath(script)):
        return
    line = frame.f_lineno
    try:
        with open(script, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return
    for node in ast.walk(tree):  # the guard may sit inside a top-level try or with
        if (isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)
                and node.lineno <= line <= (node.end_lineno or node.lineno)):
            return
    raise RuntimeError(
        f"{os.path.basename(script)}:{line} starts loader worker processes (num_workers > 0) "
        "from the script's top level: put the script's code under 'if __name__ == "
        "\"__main__\":' (each worker runs the script again), or use num_workers=0")


def _release_shared_memory() -> None:
    """Free now the shared memory of batches dropped by a closed Grain iterator.

    Grain unlinks a batch's shared memory when the array is garbage-collected, on a
    background thread. Left to chance, an exit soon after (Ctrl-C, SIGTERM) finds arrays
    still alive while the interpreter tears down (``Exception ignored in ... __del__``) and
    segments never unlinked (the resource tracker's "leaked shared_memory objects").
    """
    import gc

    gc.collect()
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:  # pragma: no cover - another Grain layout: nothing to wait for
        return
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:  # one thread, first in first out: done once a no-op has run
        pool.apply_async(int).wait()


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    return process_index, process_count


def _local_batch(batch_size: int, count: int) -> int:
    if batch_size < 1 or batch_size % count:
        raise ValueError(f"the batch size ({batch_size}) must be a positive multiple of the "
                         f"process count ({count})")
    return batch_size // count


def eval_loader(
    dataset: ImageDataset,
    config: Preprocessing,
    batch_size: int,
    options: LoaderOptions | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchLoader:
    """Evaluation batches (resize, center crop), in dataset order.

    `batch_size` is the global batch; each of `process_count` processes (JAX's by default)
    gets every ``process_count``-th element of it. The end is padded (``valid`` False,
    ``index`` -1) to whole batches, so every batch has one shape and every process runs the
    same number of steps.
    """
    grain = _grain()
    index, count = _process(process_index, process_count)
    local = _local_batch(batch_size, count)
    steps = math.ceil(len(dataset) / batch_size)
    source = grain.MapDataset.range(steps * batch_size)[index::count]
    batches = source.map(_EvalRecord(dataset, config)).batch(local)
    shape = (local, config.crop_size, config.crop_size, 3)
    return BatchLoader(batches, steps, fit_workers(options or LoaderOptions(), shape))


def train_loader(
    dataset: ImageDataset,
    config: Preprocessing,
    batch_size: int,
    *,
    epochs: int,
    seed: int,
    augmentation: Augmentation | None = None,
    options: LoaderOptions | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    repetitions: int = 1,
    replicas: int = 1,
) -> BatchLoader:
    """Training batches for all `epochs` (random resized crop, flip, and the auto-augment
    policy and random erasing that `augmentation` asks for).

    Each epoch is a new seeded permutation of the dataset, cut to whole global batches (the
    remainder is dropped, as ``drop_last``); each image is augmented with its own generator,
    seeded by (`seed`, position). Batch ``k`` is therefore a function of (`seed`, ``k``) only.

    `repetitions` > 1 is repeated augmentation as torchvision's reference samples it
    (``RASampler(num_replicas=replicas, rank=r, repetitions=...)``, the same seed;
    :mod:`resnext_flax.sampling`): each image `repetitions` times, its copies dealt to
    different replicas, an epoch of as many images as the dataset rounded down to a multiple
    of 256. `replicas` is the number of devices the global batch is split over (contiguous
    equal parts, in order): device ``r``'s part of each batch is replica ``r``'s next images,
    as GPU ``r`` reads them in the reference, so MixUp and CutMix pair distinct images there.

    In a run of several processes each reads a contiguous part of every global batch, in
    process order: the global batch is the one a single process reads.
    """
    grain = _grain()
    index, count = _process(process_index, process_count)
    local = _local_batch(batch_size, count)
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if repetitions == 1:
        steps = len(dataset) // batch_size
        order = grain.MapDataset.range(len(dataset)).shuffle(seed=seed)[:steps * batch_size]
        order = order.repeat(epochs)
    else:
        repeated = RepeatedOrder(len(dataset), seed, repetitions, batch_size, replicas, epochs,
                                 dataset.root)
        steps = repeated.steps
        order = grain.MapDataset.source(repeated)
    if steps == 0:
        raise DatasetError(f"{dataset.root}: {len(dataset)} training images are fewer than one "
                           f"batch of {batch_size}")
    records = order.random_map(
        _TrainRecord(dataset, config, augmentation or Augmentation()), seed=seed)
    shape = (local, config.crop_size, config.crop_size, 3)
    return BatchLoader(records.batch(local)[index::count], steps,
                       fit_workers(options or LoaderOptions(), shape))


class RepeatedOrder:
    """Dataset indices of all epochs under repeated augmentation, computed an epoch at a time
    (the whole run's would not fit in memory for a long run on a large dataset): each global
    batch is the concatenation of every replica's next ``batch_size // replicas`` indices."""

    def __init__(self, length: int, seed: int, repetitions: int, batch_size: int,
                 replicas: int, epochs: int, root: str):
        if length < 256:
            raise DatasetError(f"{root}: repeated augmentation (as torchvision's RASampler) "
                               f"keeps len // 256 * 256 images an epoch; {length} images give "
                               "none: use repetitions=1 or more images")
        if replicas < 1 or batch_size % replicas:
            raise ValueError(f"the batch of {batch_size} must split evenly over the {replicas} "
                             "replicas of repeated augmentation")
        self.samplers = [RASampler(length, num_replicas=replicas, rank=r, seed=seed,
                                   repetitions=repetitions) for r in range(replicas)]
        self.part = batch_size // replicas
        self.steps = self.samplers[0].num_selected_samples // self.part
        self.per_epoch, self.epochs = self.steps * batch_size, epochs

    def __len__(self) -> int:
        return self.per_epoch * self.epochs

    def __getitem__(self, position: int) -> int:
        epoch, within = divmod(int(position), self.per_epoch)
        return int(self._epoch(epoch)[within])

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one loader, the epoch being read
    def _epoch(self, epoch: int) -> np.ndarray:
        used = self.steps * self.part
        parts = np.stack([s.indices(epoch)[:used] for s in self.samplers])  # (replica, n)
        parts = parts.reshape(len(self.samplers), self.steps, self.part)
        return parts.transpose(1, 0, 2).reshape(-1)  # step-major, then replica


@dataclasses.dataclass
class SkipReport:
    """Unreadable files seen by a loop over batches: how many, and the first few paths."""

    dataset: ImageDataset
    keep: int = 5
    count: int = 0
    paths: list[str] = dataclasses.field(default_factory=list)

    def add(self, batch: Batch) -> None:
        """Record the batch's ``bad`` elements."""
        for index in batch["index"][batch["bad"]]:
            self.count += 1
            if len(self.paths) < self.keep:
                self.paths.append(self.dataset.paths[int(index)])

    def message(self, what: str = "skipped") -> str:
        """``"2 unreadable images skipped: a.jpg, b.png"`` (empty when there were none)."""
        if not self.count:
            return ""
        more = ", ..." if self.count > len(self.paths) else ""
        plural = "image" if self.count == 1 else "images"
        return f"{self.count} unreadable {plural} {what}: {', '.join(self.paths)}{more}"
