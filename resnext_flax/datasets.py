"""Labelled image files: torchvision's ``ImageFolder`` layout or a list file, as one
:class:`ImageDataset` (paths, integer labels, class names), checked before any work is done.

Only file names are read here (no image is opened); decoding happens in the input pipeline
(``resnext_flax.pipeline``), which skips and reports files that turn out to be unreadable.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import warnings
from collections.abc import Sequence

import numpy as np

from resnext_flax.errors import DatasetError
from resnext_flax.metadata import imagenet_wnids

#: The file extensions torchvision's ``ImageFolder`` accepts (compared case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_WNID = re.compile(r"n\d{8}")


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Image files with integer labels.

    - `paths`: the files, in torchvision's ``ImageFolder`` order for a folder (class by class,
      then ``os.walk`` order, names sorted) or in file order for a list file.
    - `labels`: int32 class indices, one per path.
    - `classes`: the class name of each index (``len(classes)`` is the label space).
    - `root`: the folder or list file the dataset was read from (for messages).
    """

    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    root: str

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, np.int32)
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)
        if labels.shape != (len(self.paths),):
            raise DatasetError(f"{len(self.paths)} paths but labels of shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DatasetError(f"labels must lie in [0, {len(self.classes)}), got "
                               f"[{labels.min()}, {labels.max()}]")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """The size of the label space (some classes may have no image here)."""
        return len(self.classes)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """The images at `indices` (same classes)."""
        indices = np.asarray(indices, np.int64)
        return ImageDataset(tuple(self.paths[i] for i in indices), self.labels[indices],
                            self.classes, self.root)

    def class_counts(self) -> np.ndarray:
        """Images per class index."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def relabel(self, classes: Sequence[str]) -> ImageDataset:
        """The same images labelled in another label space, matched by class name (e.g. a
        validation folder mapped onto a model's classes). Every class of this dataset that
        has images must exist in `classes`, once."""
        index = {name: i for i, name in enumerate(classes)}
        present = [self.classes[c] for c in np.unique(self.labels)]
        counts = collections.Counter(classes)
        repeated = [name for name in present if counts[name] > 1]
        if repeated:
            raise DatasetError(
                f"{self.root}: classes {_first(repeated)} name several of the model's "
                "outputs; matching by name is ambiguous")
        unknown = [name for name in present if name not in index]
        if unknown:
            raise DatasetError(
                f"{self.root}: classes {_first(unknown)} are not among the model's "
                f"{len(classes)} classes ({_first(list(classes))})")
        mapping = np.array([index.get(name, -1) for name in self.classes], np.int64)
        return ImageDataset(self.paths, mapping[self.labels], tuple(classes), self.root)


def _first(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def is_image_file(path: str) -> bool:
    """Whether torchvision's ``ImageFolder`` would take `path` (by its extension)."""
    return path.lower().endswith(IMG_EXTENSIONS)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _class_images(folder: str) -> list[str]:
    """The image files below `folder`, in torchvision's order (``sorted(os.walk(...))``, names
    sorted), following links but entering each real folder once and skipping hidden entries."""
    visited = {os.path.realpath(folder)}
    walked = []
    for parent, dirnames, files in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(dirnames):
            real = os.path.realpath(os.path.join(parent, name))
            if not _is_hidden(name) and real not in visited:
                visited.add(real)
                kept.append(name)
        dirnames[:] = kept  # prunes the walk: os.walk is top-down
        walked.append((parent, files))
    return [os.path.join(parent, f) for parent, files in sorted(walked)
            for f in sorted(files) if not _is_hidden(f) and is_image_file(f)]


def image_folder(root: str | os.PathLike) -> ImageDataset:
    """Read torchvision's ``ImageFolder`` layout: ``root/<class>/**/<image>``.

    Classes are the sub-folders, numbered in sorted order; images are the files with an
    :data:`IMG_EXTENSIONS` extension below each, found as torchvision finds them (``os.walk``
    following links, sorted), so index ``i`` is torchvision's sample ``i``. Two exceptions,
    where torchvision's result is never what a user means: hidden folders and files (names
    starting with ``.``: ``.ipynb_checkpoints``, macOS's ``._photo.jpg``) are skipped, and a
    folder reached again through a link (a link loop, or two links to one folder) is read once
    per class instead of again and again. A missing or empty folder, or a class folder without
    images, raises :class:`DatasetError` naming them.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"no folder at {root!r}")
    classes = sorted(entry.name for entry in os.scandir(root)
                     if entry.is_dir() and not _is_hidden(entry.name))
    if not classes:
        raise DatasetError(
            f"{root!r} has no class folders: expected one sub-folder per class, each holding "
            f"images ({', '.join(IMG_EXTENSIONS)})")
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for index, name in enumerate(classes):
        found = _class_images(os.path.join(root, name))
        if not found:
            empty.append(name)
        paths += found
        labels += [index] * len(found)
    if empty:
        raise DatasetError(
            f"{root!r}: class folders without any image file: {_first(empty)} (image files end "
            f"in {', '.join(IMG_EXTENSIONS)})")
    return ImageDataset(tuple(paths), np.array(labels, np.int32), tuple(classes), root)


def read_list_file(path: str | os.PathLike, *, root: str | os.PathLike | None = None
                   ) -> ImageDataset:
    """Read a list file: one ``<image path><TAB><label>`` per line (blank lines and lines
    starting with ``#`` are ignored).

    Relative paths are taken from `root` (default: the list file's folder). Labels are either
    all class indices (ASCII digits: ``0``, ``17``; names ``"class <i>"``, at most
    ``MAX_CLASSES - 1``) or all names (numbered in sorted order, as folders are). A label that
    reads as a number but is no index (``-1``, ``1.0``, ``1e3``), or a mix of indices and
    names, is an error naming the line, never a silent switch to names. Indices that start at
    1 warn that class 0 has no image. Malformed lines and missing files raise
    :class:`DatasetError` before any image is read.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"no list file at {path!r}")
    base = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path))
    entries: list[tuple[str, str, int]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0] or not parts[1].strip():
                raise DatasetError(f"{path}:{number}: expected '<image path><TAB><label>', got "
                                   f"{line!r}")
            entries.append((os.path.join(base, parts[0]), parts[1].strip(), number))
    if not entries:
        raise DatasetError(f"{path!r} lists no images")
    missing = [p for p, _, _ in entries if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{path}: {len(missing)} listed files do not exist: "
                           f"{_first(missing, 3)}")
    labels, classes = _list_labels(path, [(label, number) for _, label, number in entries])
    return ImageDataset(tuple(p for p, _, _ in entries), labels, classes, path)


_INDEX = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _list_labels(path: str, labels: list[tuple[str, int]]) -> tuple[np.ndarray, tuple[str, ...]]:
    """(int32 labels, class names) of a list file's (label, line number) pairs."""
    # Imported here, not at the top: the input pipeline's worker processes import this module,
    # and listing files needs no JAX. MAX_CLASSES is the largest head any model can have.
    from resnext_flax.models.resnet import MAX_CLASSES

    for label, number in labels:
        if _NUMBER.fullmatch(label) and not _INDEX.fullmatch(label):
            raise DatasetError(
                f"{path}:{number}: label {label!r} reads as a number but is not a class index "
                "(a non-negative integer such as 3); write indices as integers, or use names "
                "that do not read as numbers")
    kinds = [bool(_INDEX.fullmatch(label)) for label, _ in labels]
    if any(kinds) and not all(kinds):
        odd = next((label, number) for (label, number), kind in zip(labels, kinds, strict=True)
                   if kind != kinds[0])
        first = "a class index" if kinds[0] else "a name"
        raise DatasetError(
            f"{path}:{odd[1]}: label {odd[0]!r} mixes class indices and names (line "
            f"{labels[0][1]} has {first}, {labels[0][0]!r}); use one kind throughout")
    if not kinds[0]:
        classes = tuple(sorted({label for label, _ in labels}))
        if len(classes) > MAX_CLASSES:
            raise DatasetError(
                f"{path}: {len(classes):,} distinct class names, more than a model can have "
                f"({MAX_CLASSES:,}: resnext_flax.models.resnet.MAX_CLASSES)")
        index = {name: i for i, name in enumerate(classes)}
        return np.array([index[label] for label, _ in labels], np.int32), classes
    for label, number in labels:
        # Compared as text first: int() refuses strings of more than 4300 digits.
        if len(label.lstrip("0")) > len(str(MAX_CLASSES)) or int(label) >= MAX_CLASSES:
            shown = label if len(label) <= 20 else f"{label[:12]}... ({len(label)} digits)"
            raise DatasetError(
                f"{path}:{number}: label {shown} is beyond the largest class index a model "
                f"can have ({MAX_CLASSES - 1:,}: resnext_flax.models.resnet.MAX_CLASSES)")
    values = np.array([int(label) for label, _ in labels], np.int32)
    if values.min() == 1:
        warnings.warn(
            f"{path}: no image has class index 0 (labels run from 1 to {values.max()}); class "
            "indices count from 0, so class 0 stays empty. If the labels count from 1, subtract "
            "1 from each", UserWarning, stacklevel=3)
    return values, tuple(f"class {i}" for i in range(int(values.max()) + 1))


def load_dataset(source: str | os.PathLike) -> ImageDataset:
    """A folder (:func:`image_folder`) or a list file (:func:`read_list_file`)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        return image_folder(source)
    if os.path.isfile(source):
        return read_list_file(source)
    raise DatasetError(f"no folder or list file at {source!r}")


def is_imagenet_layout(dataset: ImageDataset) -> bool:
    """Whether every class is named by an ImageNet-1K WordNet id (``n01440764``...), as in
    ImageNet's validation folders."""
    wnids = set(imagenet_wnids())
    return all(_WNID.fullmatch(name) and name in wnids for name in dataset.classes)


def to_imagenet_labels(dataset: ImageDataset) -> ImageDataset:
    """Relabel a WordNet-id folder with ImageNet-1K's 1000 class indices (torchvision's order:
    sorted ids), so that a folder with only some of the classes is still labelled right."""
    if not is_imagenet_layout(dataset):
        raise DatasetError(f"{dataset.root}: not every class folder is an ImageNet-1K WordNet "
                           "id")
    return dataset.relabel(imagenet_wnids())


def split_dataset(dataset: ImageDataset, fraction: float, *, seed: int = 0
                  ) -> tuple[ImageDataset, ImageDataset]:
    """(train, validation): `fraction` of each class's images (rounded, at least one for a
    class with two or more) drawn for validation by a seeded permutation. Deterministic."""
    if not 0 < fraction < 1:
        raise DatasetError(f"the validation fraction must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for label in range(dataset.num_classes):
        members = np.flatnonzero(dataset.labels == label)
        if len(members) < 2:
            continue
        take = min(max(1, round(fraction * len(members))), len(members) - 1)
        val += rng.permutation(members)[:take].tolist()
    val_set = set(val)
    train = [i for i in range(len(dataset)) if i not in val_set]
    if not val:
        raise DatasetError(f"{dataset.root}: too few images to hold out {fraction:.0%} for "
                           "validation")
    return dataset.subset(train), dataset.subset(sorted(val))
