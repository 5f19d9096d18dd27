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


def image_folder(root: str | os.PathLike) -> ImageDataset:
    """Read torchvision's ``ImageFolder`` layout: ``root/<class>/**/<image>``.

    Classes are the sub-folders, numbered in sorted order; images are the files with an
    :data:`IMG_EXTENSIONS` extension below each, found as torchvision finds them (``os.walk``
    following links, sorted), so index ``i`` is torchvision's sample ``i``. A missing or empty
    folder, or a class folder without images, raises :class:`DatasetError` naming them.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"no folder at {root!r}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise DatasetError(
            f"{root!r} has no class folders: expected one sub-folder per class, each holding "
            f"images ({', '.join(IMG_EXTENSIONS)})")
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for index, name in enumerate(classes):
        found = [os.path.join(folder, f)
                 for folder, _, files in sorted(os.walk(os.path.join(root, name),
                                                        followlinks=True))
                 for f in sorted(files) if is_image_file(f)]
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
    all non-negative integers (class indices; names ``"class <i>"``) or all names (numbered
    in sorted order, as folders are). Malformed lines and missing files raise
    :class:`DatasetError` before any image is read.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"no list file at {path!r}")
    base = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path))
    entries: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0] or not parts[1].strip():
                raise DatasetError(f"{path}:{number}: expected '<image path><TAB><label>', got "
                                   f"{line!r}")
            entries.append((os.path.join(base, parts[0]), parts[1].strip()))
    if not entries:
        raise DatasetError(f"{path!r} lists no images")
    missing = [p for p, _ in entries if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{path}: {len(missing)} listed files do not exist: "
                           f"{_first(missing, 3)}")
    names = [label for _, label in entries]
    if all(name.isdigit() for name in names):
        labels = np.array([int(name) for name in names], np.int64)
        classes = tuple(f"class {i}" for i in range(int(labels.max()) + 1))
    else:
        classes = tuple(sorted(set(names)))
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index[name] for name in names], np.int64)
    return ImageDataset(tuple(p for p, _ in entries), labels.astype(np.int32), classes, path)


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
