"""The output guard every writer calls first: no output over an input (by path, symbolic or
hard link, or inside an input folder), no folder where a file goes, and a parent folder that
exists and can be written, named when it cannot."""

from __future__ import annotations

import os

import pytest

from resnext_flax.errors import OutputPathError, ResnextFlaxError
from resnext_flax.outputs import check_output_path, weight_source_files


@pytest.fixture
def hf_folder(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("card")
    return folder


def test_weight_source_files(hf_folder, tmp_path):
    assert weight_source_files(hf_folder) == [str(hf_folder / "model.safetensors"),
                                              str(hf_folder / "config.json")]
    assert weight_source_files(hf_folder / "model.safetensors") == [
        str(hf_folder / "model.safetensors"), str(hf_folder / "config.json")]
    (tmp_path / "plain.pth").write_bytes(b"x")
    assert weight_source_files(tmp_path / "plain.pth") == [str(tmp_path / "plain.pth")]


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_the_files_a_folder_is_read_through_are_refused(hf_folder, name):
    with pytest.raises(OutputPathError, match="the input would be overwritten"):
        check_output_path(hf_folder / name, weight_source_files(hf_folder))
    # Another file in the folder is not read: writing a new one there is fine.
    assert check_output_path(hf_folder / "flax.safetensors", weight_source_files(hf_folder)
                             ) == hf_folder / "flax.safetensors"


def test_links_to_an_input_are_refused(tmp_path):
    source = tmp_path / "in.pth"
    source.write_bytes(b"weights")
    soft, hard = tmp_path / "soft.pth", tmp_path / "hard.pth"
    soft.symlink_to(source)
    os.link(source, hard)
    for output in (source, soft, hard, tmp_path / "." / "in.pth"):
        with pytest.raises(OutputPathError) as info:
            check_output_path(output, [source], what="--json")
        assert f"--json {str(output)!r} is the input file {str(source)!r}" in str(info.value)
    with pytest.raises(OutputPathError, match="through a link"):
        check_output_path(hard, [source])
    # The input given through the link, the output by its real path: the same file.
    with pytest.raises(OutputPathError):
        check_output_path(source, [soft])
    assert isinstance(OutputPathError("x"), ResnextFlaxError | ValueError)


def test_existing_files_inside_an_input_folder_are_refused(tmp_path):
    data = tmp_path / "data" / "cats"
    data.mkdir(parents=True)
    image = data / "1.jpg"
    image.write_bytes(b"jpeg")
    with pytest.raises(OutputPathError, match="a file of the input"):
        check_output_path(image, [tmp_path / "data"])
    elsewhere = tmp_path / "elsewhere.jpg"
    os.link(image, elsewhere)  # a hard link outside the folder to a file inside it
    with pytest.raises(OutputPathError, match="a file of the input"):
        check_output_path(elsewhere, [tmp_path / "data"])
    assert check_output_path(data / "new.json", [tmp_path / "data"]) == data / "new.json"


def test_a_folder_is_not_a_file_output(tmp_path):
    with pytest.raises(OutputPathError, match="is a folder; name the file to write"):
        check_output_path(tmp_path, [])


def test_a_missing_parent_is_named_and_not_created(tmp_path):
    output = tmp_path / "missing" / "deeper" / "out.json"
    with pytest.raises(OutputPathError) as info:
        check_output_path(output, [], what="--json")
    assert f"the folder {str(output.parent)!r} does not exist" in str(info.value)
    assert "not created for you" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_a_parent_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match=r"'.*file' is not a folder"):
        check_output_path(tmp_path / "file" / "out.json", [])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the missing "
                                              "and not-a-folder parents cover the check")
def test_a_read_only_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(OutputPathError, match="is not writable"):
            check_output_path(locked / "out.json", [])
    finally:
        locked.chmod(0o700)


def test_folder_outputs(tmp_path):
    data = tmp_path / "train"
    (data / "cats").mkdir(parents=True)
    start = tmp_path / "run1" / "best.safetensors"
    start.parent.mkdir()
    start.write_bytes(b"weights")
    writes = ("best.safetensors", "history.json", "checkpoints")

    def check(output, inputs):
        return check_output_path(output, inputs, what="--output-dir", directory=True,
                                 writes=writes)

    for inside in (data, data / "run", data / "cats" / "run"):
        with pytest.raises(OutputPathError, match="inside the input folder"):
            check(inside, [data])
    with pytest.raises(OutputPathError, match=r"would receive best\.safetensors, which is the "
                                              "input"):
        check(tmp_path / "run1", [data, start])
    kept = tmp_path / "run2" / "checkpoints" / "7" / "state"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"x")
    with pytest.raises(OutputPathError, match="would receive checkpoints"):
        check(tmp_path / "run2", [kept])
    with pytest.raises(OutputPathError, match="is a file; name a folder"):
        check(start, [])
    with pytest.raises(OutputPathError, match="does not exist"):
        check(tmp_path / "no" / "run", [data])
    assert not (tmp_path / "no").exists()
    # A new folder beside the data, or the folder that holds it, is fine.
    assert check(tmp_path / "run3", [data, start]) == tmp_path / "run3"
    assert check(tmp_path, [data, start]) == tmp_path


def test_the_library_finetune_checks_its_folder_before_any_work(tmp_path, monkeypatch):
    """`finetune()` itself runs the guard (not only the command): a run folder inside the
    data, or over its start weights, is refused before the data set is even read."""
    from resnext_flax import finetuning
    from resnext_flax.finetuning import FinetuneConfig, finetune

    def no_work(*args, **kwargs):
        raise AssertionError("the data set was read before the output folder was checked")

    monkeypatch.setattr(finetuning, "_datasets", no_work)
    data = tmp_path / "train"
    (data / "cats").mkdir(parents=True)
    with pytest.raises(OutputPathError, match="inside the input folder"):
        finetune(data, FinetuneConfig(model="resnet18"), data / "run")
    start = tmp_path / "old" / "best.safetensors"
    start.parent.mkdir()
    start.write_bytes(b"weights")
    with pytest.raises(OutputPathError, match=r"would receive best\.safetensors"):
        finetune(data, FinetuneConfig(model="resnet18", weights=str(start)), start.parent)
    assert start.read_bytes() == b"weights"


def test_a_parent_is_checked_as_the_system_resolves_it(tmp_path):
    """``missing/../out`` normalizes to an existing folder as text, but no file can be made
    through a folder that does not exist; a run folder there would be created silently."""
    for directory in (False, True):
        with pytest.raises(OutputPathError, match="does not exist"):
            check_output_path(tmp_path / "missing" / ".." / "out", [], directory=directory)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "here").mkdir()
    assert check_output_path(tmp_path / "here" / ".." / "out", []) == tmp_path / "out"
    assert check_output_path(f"{tmp_path / 'run'}{os.sep}", [], directory=True) == \
        tmp_path / "run"
