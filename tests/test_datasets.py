"""Reading image folders and list files: the same samples, order and labels as torchvision's
ImageFolder (with its documented exceptions); clear errors before any work; the ImageNet
WordNet-id order; the pipeline's data errors; docs/data.md's imports and worker example."""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torchvision
from folder_helpers import corrupt_files, mixed_folder, photo_crop, write_image
from limits import CHILD_TIMEOUT

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


def _two_images(tmp_path):
    rng = np.random.default_rng(5)
    write_image(tmp_path / "imgs" / "a.png", photo_crop(0, rng))
    write_image(tmp_path / "imgs" / "b.png", photo_crop(1, rng))
    return tmp_path / "list.txt"


def test_list_file_label_is_bounded_before_building_names(tmp_path):
    """A typo'd label of 10^9 would build 10^9 class names: refused, naming file, line and
    label, against the largest head a model can have."""
    from resnext_flax.models.resnet import MAX_CLASSES

    listing = _two_images(tmp_path)
    # The limit itself first: on code without the bound this fails cheaply, before 10^9.
    listing.write_text(f"imgs/a.png\t0\nimgs/b.png\t{MAX_CLASSES}\n")
    with pytest.raises(datasets.DatasetError, match=r"list\.txt:2: label 1000000 is beyond"):
        datasets.read_list_file(listing)
    listing.write_text(f"imgs/a.png\t0\nimgs/b.png\t{MAX_CLASSES - 1}\n")
    assert datasets.read_list_file(listing).num_classes == MAX_CLASSES
    listing.write_text("imgs/a.png\t0\nimgs/b.png\t1000000000\n")
    with pytest.raises(datasets.DatasetError,
                       match=r"list\.txt:2: label 1000000000 is beyond .*\(999,999"):
        datasets.read_list_file(listing)
    listing.write_text(f"imgs/a.png\t0\nimgs/b.png\t{'9' * 5000}\n")  # int() refuses this
    with pytest.raises(datasets.DatasetError, match=r"list\.txt:2: label 999999999999\.\.\. "
                                                    r"\(5000 digits\)"):
        datasets.read_list_file(listing)


def test_list_file_names_are_bounded_too(tmp_path, monkeypatch):
    from resnext_flax.models import resnet

    listing = _two_images(tmp_path)
    listing.write_text("imgs/a.png\tcat\nimgs/b.png\tdog\nimgs/a.png\temu\n")
    monkeypatch.setattr(resnet, "MAX_CLASSES", 2)
    with pytest.raises(datasets.DatasetError, match=r"list\.txt: 3 distinct class names, more "
                                                    r"than a model can have \(2: "):
        datasets.read_list_file(listing)
    listing.write_text("imgs/a.png\t0\nimgs/b.png\t2\n")
    with pytest.raises(datasets.DatasetError, match=r"list\.txt:2: label 2 is beyond .*\(1: "):
        datasets.read_list_file(listing)


def test_list_file_numbers_that_are_no_index_are_errors(tmp_path):
    """One '-1' or '1.0' among indices used to turn every label into a name, silently."""
    listing = _two_images(tmp_path)
    for bad in ("-1", "1.0", "+1", "2e1", ".5"):
        listing.write_text(f"imgs/a.png\t0\nimgs/b.png\t{bad}\n")
        with pytest.raises(datasets.DatasetError,
                           match=rf"list\.txt:2: label '{re.escape(bad)}' reads as a number"):
            datasets.read_list_file(listing)
    listing.write_text("imgs/a.png\t0\nimgs/b.png\tcat\n")
    with pytest.raises(datasets.DatasetError, match=r"list\.txt:2: label 'cat' mixes class "
                                                    r"indices and names \(line 1 has a class"):
        datasets.read_list_file(listing)
    listing.write_text("imgs/a.png\tcat\n# note\nimgs/b.png\t3\n")
    with pytest.raises(datasets.DatasetError, match=r"list\.txt:3: label '3' mixes"):
        datasets.read_list_file(listing)
    listing.write_text("imgs/a.png\t²\nimgs/b.png\tn01440764\n")  # not ASCII digits: names
    assert datasets.read_list_file(listing).classes == ("n01440764", "²")


def test_list_file_counting_from_one_warns(tmp_path, recwarn):
    listing = _two_images(tmp_path)
    listing.write_text("imgs/a.png\t1\nimgs/b.png\t2\n")
    with pytest.warns(UserWarning, match=r"list\.txt: no image has class index 0 \(labels run "
                                         r"from 1 to 2\).*subtract 1"):
        ds = datasets.read_list_file(listing)
    assert ds.classes == ("class 0", "class 1", "class 2")  # still what the file says
    recwarn.clear()
    listing.write_text("imgs/a.png\t0\nimgs/b.png\t2\n")
    datasets.read_list_file(listing)
    assert not [w for w in recwarn if "class index 0" in str(w.message)]


def test_hidden_entries_are_skipped_unlike_torchvision(tmp_path):
    rng = np.random.default_rng(6)
    write_image(tmp_path / "cats" / "a.png", photo_crop(0, rng))
    write_image(tmp_path / "dogs" / "b.png", photo_crop(1, rng))
    write_image(tmp_path / ".ipynb_checkpoints" / "c.png", photo_crop(0, rng))
    write_image(tmp_path / "cats" / ".ipynb_checkpoints" / "a-checkpoint.png", photo_crop(0, rng))
    (tmp_path / "dogs" / "._b.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    ds = datasets.image_folder(tmp_path)
    assert ds.classes == ("cats", "dogs")
    assert [p.removeprefix(str(tmp_path)) for p in ds.paths] == ["/cats/a.png", "/dogs/b.png"]
    # The documented difference: torchvision makes a class of the notebook's folder and takes
    # hidden files as images.
    theirs = torchvision.datasets.ImageFolder(str(tmp_path))
    assert theirs.classes == [".ipynb_checkpoints", "cats", "dogs"]
    assert len(theirs.samples) == 5


def test_link_loops_are_walked_once(tmp_path):
    """A link to an ancestor made os.walk(followlinks=True) list the class again at every
    level (until the system's link limit); two links to one folder listed it twice."""
    rng = np.random.default_rng(7)
    write_image(tmp_path / "cats" / "a.png", photo_crop(0, rng))
    write_image(tmp_path / "cats" / "sub" / "b.png", photo_crop(0, rng))
    write_image(tmp_path / "dogs" / "c.png", photo_crop(1, rng))
    write_image(tmp_path / "elsewhere" / "d.png", photo_crop(1, rng))
    (tmp_path / "cats" / "sub" / "loop").symlink_to(tmp_path / "cats")  # an ancestor
    (tmp_path / "dogs" / "ext").symlink_to(tmp_path / "elsewhere")  # links are still followed
    (tmp_path / "dogs" / "more").symlink_to(tmp_path / "elsewhere")  # a second way in
    ds = datasets.image_folder(tmp_path)
    assert ds.classes == ("cats", "dogs", "elsewhere")
    relative = [p.removeprefix(str(tmp_path)) for p in ds.paths]
    assert relative == ["/cats/a.png", "/cats/sub/b.png", "/dogs/c.png", "/dogs/ext/d.png",
                        "/elsewhere/d.png"]
    # Read once per class: a folder linked into two classes belongs to both, as the links say.
    ds = datasets.image_folder(tmp_path / "dogs")
    assert ds.classes == ("ext", "more") and len(ds) == 2


# ---- the input pipeline's data errors (resnext_flax/pipeline.py) ------------------------------


def _tiny_train_loader(ds):
    from resnext_flax.metadata import Preprocessing
    from resnext_flax.pipeline import LoaderOptions, train_loader

    return train_loader(ds, Preprocessing(resize_size=16, crop_size=16), 1, epochs=1, seed=0,
                        options=LoaderOptions(num_threads=0, prefetch=1), process_index=0,
                        process_count=1)


def test_a_missing_file_is_not_an_unreadable_one(tmp_path):
    rng = np.random.default_rng(8)
    for name in ("a", "b"):
        write_image(tmp_path / name / "x.png", photo_crop(0, rng))
    ds = datasets.image_folder(tmp_path)
    os.remove(ds.paths[0])
    with pytest.raises(datasets.DatasetError, match=r"x\.png' was listed in the dataset but no "
                                                    r"longer exists"):
        list(_tiny_train_loader(ds))


def test_the_unreadable_count_is_of_files_that_exist(tmp_path):
    """Three corrupt files used to be reported as '64 consecutive files unreadable'."""
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").write_bytes(b"not a JPEG")
    with pytest.raises(datasets.DatasetError, match=r"none of the dataset's 3 files can be read"):
        list(_tiny_train_loader(datasets.image_folder(tmp_path)))


# ---- docs/data.md as written -------------------------------------------------------------------

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "data.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)


def test_every_import_in_data_docs_resolves():
    """Each ``import``/``from ... import`` line of docs/data.md's Python blocks, and each
    ``resnext_flax.module.name`` the prose points at, exists as written."""
    lines = [line.strip() for block in _python_blocks() for line in block.splitlines()
             if re.match(r"\s*(from \S+ )?import ", line)]
    assert any("split_dataset" in line for line in lines)
    for line in lines:
        exec(line, {})  # the docs' own import lines
    for dotted in set(re.findall(r"`(resnext_flax(?:\.\w+)+)", DOCS.read_text())):
        module, _, name = dotted.rpartition(".")
        try:
            importlib.import_module(dotted)
        except ImportError:
            assert hasattr(importlib.import_module(module), name), dotted


def test_the_multi_worker_example_is_guarded():
    workers = [block for block in _python_blocks() if "num_workers=" in block]
    assert workers
    for block in workers:
        guarded = re.search(r'^if __name__ == "__main__":\n((    .*)?\n)+', block, flags=re.M)
        assert guarded and "num_workers=" in guarded.group(0), block


_SCRIPT = """
from resnext_flax.datasets import image_folder
from resnext_flax.metadata import Preprocessing
from resnext_flax.pipeline import LoaderOptions, eval_loader

{guard}
{indent}loader = eval_loader(image_folder({root!r}), Preprocessing(resize_size=16, crop_size=16),
{indent}                     2, LoaderOptions(num_workers=1), process_index=0, process_count=1)
{indent}print(sum(int(batch["valid"].sum()) for batch in loader), "images")
"""


def test_workers_without_a_main_guard_say_to_add_one(tmp_path):
    """Unguarded, the spawned worker re-ran the script and died; the caller saw only Grain's
    'Worker process was terminated unexpectedly'."""
    rng = np.random.default_rng(9)
    for name in ("a", "b"):
        write_image(tmp_path / "data" / name / "x.png", photo_crop(0, rng))
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(datasets.__file__).parent.parent)}
    outcomes = []
    for guard, indent in (("", ""), ('if __name__ == "__main__":', "    ")):
        script = tmp_path / "script.py"
        script.write_text(_SCRIPT.format(guard=guard, indent=indent, root=str(tmp_path / "data")))
        outcomes.append(subprocess.run([sys.executable, str(script)], capture_output=True,
                                       text=True, env=env, cwd=tmp_path, timeout=CHILD_TIMEOUT))
    unguarded, guarded = outcomes
    assert unguarded.returncode == 1
    last = unguarded.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"RuntimeError: script\.py:9 starts loader worker processes .* under "
                        r"'if __name__ == \"__main__\":' .*", last), unguarded.stderr
    assert "terminated unexpectedly" not in unguarded.stderr
    assert guarded.returncode == 0 and "2 images" in guarded.stdout, guarded.stderr


def test_a_package_main_without_a_guard_starts_workers(tmp_path):
    """`python -m package` runs ``package/__main__.py``, which spawn never runs again (nor does
    the `resnext-flax` command's): no guard is needed there, so none is asked for."""
    rng = np.random.default_rng(9)
    for name in ("a", "b"):
        write_image(tmp_path / "data" / name / "x.png", photo_crop(0, rng))
    package = tmp_path / "tool"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        _SCRIPT.format(guard="", indent="", root=str(tmp_path / "data")))
    root = pathlib.Path(datasets.__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{tmp_path}"}
    done = subprocess.run([sys.executable, "-m", "tool"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=CHILD_TIMEOUT)
    assert done.returncode == 0 and "2 images" in done.stdout, done.stderr
