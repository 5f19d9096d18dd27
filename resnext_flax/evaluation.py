"""Accuracy on an image folder: top-1 / top-5, mean loss and throughput, on every device.

:func:`evaluate` runs a model over an :class:`~resnext_flax.datasets.ImageDataset` with the
Grain pipeline (``resnext_flax.pipeline``): each global batch is sharded over a 1-D mesh
(``parallel.data_mesh``) and each device runs the model on its shard (``shard_map``), so
there is no all-gather. The last batch is padded to the full batch size (one compiled program)
and padding and unreadable files are masked out of every count. :func:`evaluate_pretrained`
is the command's library side: a model by name and weight set, a folder, and the label order
the weights were trained with (ImageNet's WordNet ids, or the class names a fine-tuned
checkpoint carries).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from resnext_flax import parallel
from resnext_flax.datasets import (
    DatasetError,
    ImageDataset,
    is_imagenet_layout,
    load_dataset,
    to_imagenet_labels,
)
from resnext_flax.metadata import Preprocessing, pretrained_cfg
from resnext_flax.models import functional
from resnext_flax.models.folding import with_prepared_kernels
from resnext_flax.models.functional import CompiledModel
from resnext_flax.pipeline import LoaderOptions, SkipReport, eval_loader
from resnext_flax.preprocess import preprocessing_config
from resnext_flax.weights.catalog import WeightSet
from resnext_flax.weights.pretrained import from_pretrained, split_weights

TOP_K = 5


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate` measured.

    - `top1`, `top5`: accuracy (fractions) over the readable images; `top5` is top-min(5, C).
    - `loss`: mean cross-entropy (float32 softmax) over the same images.
    - `num_images`: images evaluated; `num_skipped` / `skipped_paths`: unreadable files
      (their count and the first few paths), left out of every number.
    - `seconds`: wall time of the whole loop; `images_per_second`: images over the time after
      the first batch (which includes compilation).
    - `predictions`: (len(dataset), k) top-k class indices per image, best first (-1 for
      skipped images and, in multi-process runs, for images of other processes).
    - `published`: the weight set's published (acc@1, acc@5) in %, when the labels are its
      ImageNet classes; `classes`: the label space.
    - `source`, `weights`: what the evaluated model records (its ``pretrained_cfg``): the file
      or URL its weights were read from, and the published weight set it is, where known, so
      that a report names the weights actually measured.
    """

    top1: float
    top5: float
    loss: float
    num_images: int
    num_skipped: int
    skipped_paths: tuple[str, ...]
    seconds: float
    images_per_second: float
    predictions: np.ndarray
    classes: tuple[str, ...]
    published: tuple[float, float] | None = None
    source: str | None = None
    weights: str | None = None

    def summary(self) -> dict[str, Any]:
        """The numbers as JSON-ready values (no per-image predictions)."""
        out = {"acc1": 100 * float(self.top1), "acc5": 100 * float(self.top5),
               "loss": float(self.loss), "images": self.num_images,
               "skipped": self.num_skipped, "skipped_paths": list(self.skipped_paths),
               "seconds": float(self.seconds),
               "images_per_second": float(self.images_per_second),
               "classes": len(self.classes)}
        if self.published is not None:
            out["published_acc1"], out["published_acc5"] = self.published
        return out

    def table(self) -> str:
        """Measured (and published) accuracy side by side, as the command prints it."""
        rows = [("", "acc@1", "acc@5", "loss"),
                ("measured", f"{100 * self.top1:.3f}", f"{100 * self.top5:.3f}",
                 f"{self.loss:.4f}")]
        if self.published is not None:
            rows.append(("published", f"{self.published[0]:.3f}", f"{self.published[1]:.3f}",
                         ""))
        return "\n".join(f"{r[0]:<10}{r[1]:>9}{r[2]:>9}{r[3]:>9}".rstrip() for r in rows)


@functools.cache
def _sharded_outputs(mesh: Mesh, top_k: int) -> Any:
    """jit(shard_map(...)): per-example float32 loss and top-k indices, sharded like the
    batch. Cached per (mesh, k); the model's structure is part of its pytree, so equal
    models share the compilation."""

    def per_device(model: CompiledModel, images: jax.Array, labels: jax.Array):
        logits = functional.apply(model.graphdef, model.state, images)
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return loss, jax.lax.top_k(logits, top_k)[1]

    axis = P(parallel.DATA_AXIS)
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), axis, axis),
                                 out_specs=(axis, axis)))


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in its local batch order."""
    if array.is_fully_addressable:
        return np.asarray(array)
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def _global_sum(values: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)


def evaluate(
    model: nnx.Module,
    dataset: ImageDataset,
    *,
    preprocessing: Preprocessing | WeightSet | None = None,
    batch_size: int = 64,
    loader: LoaderOptions | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    published: tuple[float, float] | None = None,
) -> EvaluationResult:
    """Top-1 / top-5 accuracy and mean loss of `model` (eval mode) on `dataset`.

    **Arguments:**
    - `dataset`: labels in the model's class space (see :func:`evaluate_pretrained`).
    - `preprocessing`: resize / crop / normalization; by default what the model's
      ``pretrained_cfg`` records, else ImageNet's default.
    - `batch_size`: the global batch, a multiple of the mesh's device count.
    - `loader`: worker processes and threads of the input pipeline.
    - `mesh`: a 1-D data mesh (``parallel.data_mesh()``, every device, by default).
    - `published`: reference (acc@1, acc@5) in % to report alongside.
    """
    mesh = mesh if mesh is not None else parallel.data_mesh()
    if batch_size % mesh.size:
        raise ValueError(f"the batch size ({batch_size}) must be a multiple of the "
                         f"{mesh.size} devices it is sharded over")
    num_classes = model.num_classes
    if num_classes < 1:
        raise ValueError("a headless model (num_classes=0) has no predictions to evaluate")
    if dataset.num_classes != num_classes:
        raise DatasetError(f"{dataset.root}: labels of {dataset.num_classes} classes, but the "
                           f"model has {num_classes} outputs")
    k = min(TOP_K, num_classes)
    step = _sharded_outputs(mesh, k)
    compiled = parallel.replicate(mesh, CompiledModel.from_module(with_prepared_kernels(model)))
    record = pretrained_cfg(model)
    if preprocessing is None:
        preprocessing = record
    batches = eval_loader(dataset, preprocessing_config(preprocessing), batch_size, loader)
    predictions = np.full((len(dataset), k), -1, np.int32)
    skipped = SkipReport(dataset)
    totals = np.zeros(5)  # correct@1, correct@k, loss sum, images, images of the first batch

    def account(batch: dict[str, np.ndarray], outputs: tuple[jax.Array, jax.Array]) -> None:
        loss, top = (_local_rows(x) for x in outputs)
        valid, labels = batch["valid"], batch["label"]
        hits = top == labels[:, None]
        totals[:4] += (np.sum(hits[valid, 0]), np.sum(hits[valid].any(axis=1)),
                       float(np.sum(loss[valid], dtype=np.float64)), np.sum(valid))
        predictions[batch["index"][valid]] = top[valid]
        skipped.add(batch)

    start = time.perf_counter()
    first_done = start
    pending = None
    with batches, tqdm(total=len(batches), desc="evaluate", unit="batch",
                       disable=not progress or jax.process_index() != 0) as bar:
        for i, batch in enumerate(batches):
            images, labels = parallel.shard_batch(mesh, batch["image"], batch["label"])
            outputs = step(compiled, images, labels)
            if pending is not None:  # read the previous batch while this one runs
                account(*pending)
            pending = (batch, outputs)
            if i == 0:  # the first batch includes compilation: timed apart
                jax.block_until_ready(outputs)
                first_done = time.perf_counter()
                totals[4] = np.sum(batch["valid"])
            bar.update(1)
            elapsed = time.perf_counter() - first_done
            if totals[3] > totals[4] and elapsed > 0:
                bar.set_postfix(acc1=f"{100 * totals[0] / max(totals[3], 1):.2f}",
                                img_s=f"{(totals[3] - totals[4]) / elapsed:.0f}")
        if pending is not None:
            account(*pending)
    end = time.perf_counter()
    correct1, correct5, loss_sum, count, first, num_skipped = _global_sum(
        np.array([*totals, skipped.count], np.float64))
    if count == 0:
        raise DatasetError(f"{dataset.root}: none of the {len(dataset)} images could be read "
                           f"({skipped.message()})")
    rate = (count - first) / (end - first_done) if len(batches) > 1 else count / (end - start)
    return EvaluationResult(
        top1=correct1 / count, top5=correct5 / count, loss=loss_sum / count,
        num_images=int(count), num_skipped=int(num_skipped),
        skipped_paths=tuple(skipped.paths), seconds=end - start, images_per_second=rate,
        predictions=predictions, classes=dataset.classes, published=published,
        source=record.source if record is not None else None,
        weights=record.weights if record is not None else None)


@dataclasses.dataclass(frozen=True)
class LabelSpace:
    """How a folder's classes map onto a model's outputs, and what to compare against."""

    dataset: ImageDataset
    note: str
    published: tuple[float, float] | None


def match_labels(dataset: ImageDataset, num_classes: int, *,
                 classes: tuple[str, ...] | None = None,
                 weight_set: WeightSet | None = None) -> LabelSpace:
    """Label `dataset` in the model's class order.

    - `classes` (a fine-tuned checkpoint's class names): matched by name;
    - a 1000-class ImageNet weight set and WordNet-id folders: ImageNet's order (sorted ids;
      a folder with only some classes is labelled right), with the published accuracy;
    - otherwise the folder's own order (sorted names), which must have `num_classes` classes.
    """
    if classes is not None:
        return LabelSpace(dataset.relabel(classes), "classes matched by name to the "
                          "checkpoint's", None)
    imagenet = weight_set is not None and num_classes == weight_set.num_classes == 1000
    if imagenet and is_imagenet_layout(dataset):
        labelled = to_imagenet_labels(dataset)
        present = int(np.count_nonzero(labelled.class_counts()))
        note = "ImageNet WordNet-id folders, torchvision's class order"
        if present < 1000:
            note += (f"; only {present} of the 1000 classes are present, so the published "
                     "figures (full validation set) are not comparable")
        return LabelSpace(labelled, note, weight_set.published)  # None where unpublished
    if dataset.num_classes != num_classes:
        hint = (" (ImageNet folders must be named by WordNet id, e.g. n01440764)"
                if imagenet else "")
        raise DatasetError(f"{dataset.root} has {dataset.num_classes} class folders but the "
                           f"model has {num_classes} outputs{hint}")
    return LabelSpace(dataset, "classes in sorted folder-name order", None)


def evaluate_pretrained(
    source: str | os.PathLike | ImageDataset,
    name: str,
    weights: str | os.PathLike | WeightSet = "DEFAULT",
    *,
    checkpoint: str | os.PathLike | None = None,
    batch_size: int = 64,
    loader: LoaderOptions | None = None,
    resize_size: int | None = None,
    crop_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    prefix: str | None = None,
    ema: bool = False,
    key: str | None = None,
    trust_pickle: bool = False,
) -> tuple[EvaluationResult, str]:
    """Evaluate `name` with `weights` (or a local `checkpoint`) on a folder or list file (or
    the :class:`~resnext_flax.datasets.ImageDataset` already read from one).

    Class names and preprocessing are what the model's ``pretrained_cfg`` records (a
    fine-tuned or converted checkpoint's own, else the weight set's); the published accuracy is
    `weights`', printed where the model's labels are its labels; `resize_size` /
    `crop_size` override its sizes. `prefix`, `ema`, `key`, `trust_pickle`: how to read
    `checkpoint` (see :func:`~resnext_flax.from_pretrained`). Returns the result and a note on
    how labels were matched. Errors in the folder are raised before the model is loaded.
    """
    dataset = source if isinstance(source, ImageDataset) else load_dataset(source)
    ws, checkpoint = split_weights(name, weights, checkpoint)
    model = from_pretrained(name, ws, checkpoint=checkpoint, cache_dir=cache_dir,
                            progress=progress, prefix=prefix, ema=ema, key=key,
                            trust_pickle=trust_pickle)
    cfg = pretrained_cfg(model)
    classes = cfg.class_names if cfg is not None else None
    by_name = classes is not None and (ws is None or classes != ws.categories)
    space = match_labels(dataset, model.num_classes, classes=classes if by_name else None,
                         weight_set=None if by_name else ws)
    sizes = {k: v for k, v in (("resize_size", resize_size), ("crop_size", crop_size))
             if v is not None}
    config = dataclasses.replace(preprocessing_config(cfg), **sizes)
    result = evaluate(model, space.dataset, preprocessing=config, batch_size=batch_size,
                      loader=loader, progress=progress, published=space.published)
    if space.published is not None and config != ws.preprocessing:
        return result, space.note + f"; preprocessing differs from {ws.name}'s"
    return result, space.note
