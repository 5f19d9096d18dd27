"""Reading image folders and list files: the same samples, order and labels as torchvision's
ImageFolder; clear errors before any work; the ImageNet WordNet-id order."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torchvision
from folder_helpers import corrupt_files, mixed_folder, photo_crop, write_image

from resnext_flax import datasets
from resnext_flax.metadata import imagenet_categories, imagenet_wnids


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    info = mixed_folder(root)
    return root, info


def test_image_folder_equals_torchvision(folder):
    root, _ = folder
    ours = datasets.image_folder(root)
    theirs = torchvision.datasets.ImageFolder(str(root))
    assert list(ours.classes) == theirs.classes
    assert list(ours.paths) == [p for p, _ in theirs.samples]  # corrupt files included
    np.testing.assert_array_equal(ours.labels, theirs.targets)
    assert any(p.endswith("nested/deeper.jpeg") for p in ours.paths)
    assert any(p.endswith(".JPG") for p in ours.paths)
    assert not any(p.endswith((".txt", ".bak")) for p in ours.paths)
    assert datasets.IMG_EXTENSIONS == torchvision.datasets.folder.IMG_EXTENSIONS


def test_folder_errors_before_any_work(tmp_path):
    with pytest.raises(datasets.DatasetError, match="no folder at"):
        datasets.image_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "loose.jpg").write_bytes(b"x")
    with pytest.raises(datasets.DatasetError, match="has no class folders"):
        datasets.image_folder(empty)
    root = tmp_path / "some_empty"
    write_image(root / "cats" / "a.png", photo_crop(0, np.random.default_rng(0)))
    (root / "dogs").mkdir()
    (root / "birds").mkdir()
    (root / "birds" / "readme.txt").write_text("no images here")
    with pytest.raises(datasets.DatasetError, match="without any image file: 'birds', 'dogs'"):
        datasets.image_folder(root)
    with pytest.raises(datasets.DatasetError, match="no folder or list file"):
        datasets.load_dataset(tmp_path / "nothing")


def test_list_file(tmp_path):
    rng = np.random.default_rng(1)
    a = write_image(tmp_path / "imgs" / "a.png", photo_crop(0, rng))
    b = write_image(tmp_path / "imgs" / "b.jpg", photo_crop(1, rng))
    listing = tmp_path / "train.txt"
    listing.write_text(f"# comment\nimgs/a.png\t3\n\n{b}\t0\n")
    ds = datasets.load_dataset(listing)
    assert ds.paths == (a, b) and ds.labels.tolist() == [3, 0]
    assert ds.classes == ("class 0", "class 1", "class 2", "class 3")
    listing.write_text("imgs/a.png\tdog\nimgs/b.jpg\tcat\n")
    ds = datasets.read_list_file(listing)
    assert ds.classes == ("cat", "dog") and ds.labels.tolist() == [1, 0]
    listing.write_text("imgs/a.png 3\n")
    with pytest.raises(datasets.DatasetError, match=r"train.txt:1: expected '<image path>"):
        datasets.read_list_file(listing)
    listing.write_text("imgs/a.png\t0\nimgs/gone.png\t1\n")
    with pytest.raises(datasets.DatasetError, match=r"1 listed files do not exist: .*gone\.png"):
        datasets.read_list_file(listing)
    listing.write_text("# nothing\n")
    with pytest.raises(datasets.DatasetError, match="lists no images"):
        datasets.read_list_file(listing)


def test_split_is_stratified_and_deterministic(folder):
    ds = datasets.image_folder(folder[0])
    train, val = datasets.split_dataset(ds, 0.34, seed=3)
    again = datasets.split_dataset(ds, 0.34, seed=3)
    assert train.paths == again[0].paths and val.paths == again[1].paths
    assert not set(train.paths) & set(val.paths)
    assert len(train) + len(val) == len(ds)
    assert (val.class_counts() >= 1).all() and (train.class_counts() >= 1).all()
    assert datasets.split_dataset(ds, 0.34, seed=4)[1].paths != val.paths
    with pytest.raises(datasets.DatasetError, match=r"must lie in \(0, 1\)"):
        datasets.split_dataset(ds, 1.0)


def test_relabel_by_name(folder):
    ds = datasets.image_folder(folder[0])
    space = ("one", "zero", "extra", "stem", "petals", "city", "bay")
    relabelled = ds.relabel(space)
    assert [space[i] for i in relabelled.labels] == [ds.classes[i] for i in ds.labels]
    with pytest.raises(datasets.DatasetError, match="classes 'bay' are not among"):
        ds.relabel(space[:-1])


def test_imagenet_wnids_package_data():
    wnids = imagenet_wnids()
    assert len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    # An independent witness: torchvision's Imagenette names ten ImageNet classes by WordNet id.
    categories = imagenet_categories()
    for wnid, names in torchvision.datasets.Imagenette._WNID_TO_CLASS.items():
        assert categories[wnids.index(wnid)] in names, wnid


def test_imagenet_folders_get_imagenet_indices(tmp_path):
    rng = np.random.default_rng(2)
    for wnid in ("n03028079", "n01440764", "n03888257"):  # church, tench, parachute
        write_image(tmp_path / wnid / "x.png", photo_crop(0, rng))
    ds = datasets.image_folder(tmp_path)
    assert datasets.is_imagenet_layout(ds)
    labelled = datasets.to_imagenet_labels(ds)
    assert labelled.num_classes == 1000
    assert [imagenet_categories()[i] for i in labelled.labels] == ["tench", "church",
                                                                   "parachute"]
    write_image(tmp_path / "n99999999" / "y.png", photo_crop(0, rng))
    assert not datasets.is_imagenet_layout(datasets.image_folder(tmp_path))


def test_corrupt_files_are_listed_not_opened(tmp_path):
    corrupt = corrupt_files(tmp_path / "a")
    assert sorted(datasets.image_folder(tmp_path).paths) == sorted(corrupt)
