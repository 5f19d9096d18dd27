"""The command-line converter, end to end on temporary files, and converted checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from limits import CHILD_TIMEOUT
from safetensors.torch import save_file
from torch_reference import random_images, relative_error, to_nchw, torch_model

import resnext_flax
from resnext_flax.models.variants import VARIANTS
from resnext_flax.weights.conversion import convert_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTER = os.path.join(REPO, "convert", "convert_torchvision.py")


def run_converter(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CONVERTER, *map(str, args)],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_converter_end_to_end(tmp_path, suffix):
    reference = torch_model("resnext50_32x4d", seed=11, num_classes=10)
    source = tmp_path / f"resnext50_32x4d-0123abcd{suffix}"
    state_dict = {f"module.{k}": v for k, v in reference.state_dict().items()}
    if suffix == ".pth":
        torch.save(state_dict, source)
    else:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, source)
    output = tmp_path / "out" / "resnext50.safetensors"
    output.parent.mkdir()  # an output's folder is never created for it

    result = run_converter(source, "--output", output, "--probe-size", "64")
    assert result.returncode == 0, result.stderr
    assert "verified against torchvision: max-abs error" in result.stdout
    rel = float(result.stdout.split("relative error ")[1].split(",")[0])
    assert rel <= 1e-5
    assert sorted(os.listdir(output.parent)) == ["resnext50.safetensors"]

    model = resnext_flax.load_checkpoint(output)
    assert model.num_classes == 10 and model.spec == VARIANTS["resnext50_32x4d"]
    images = random_images(2, 65, 77, seed=5)
    with torch.no_grad():
        expected = reference(to_nchw(images)).numpy()
    actual = np.asarray(jax.jit(lambda x: model(x))(images))
    assert relative_error(actual, expected) <= 1e-5


def test_a_bfloat16_safetensors_source_converts_and_verifies(tmp_path):
    reference = torch_model("resnet18", seed=12).to(torch.bfloat16)
    source = tmp_path / "resnet18-bf16.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, source)
    output = tmp_path / "resnet18.safetensors"
    report = convert_checkpoint(source, output, probe_shape=(1, 64, 64))
    assert report.relative_error <= 1e-5
    assert resnext_flax.load_checkpoint(output).spec == VARIANTS["resnet18"]


def test_converter_rejects_the_wrong_model_and_writes_nothing(tmp_path):
    source = tmp_path / "r18.pth"
    torch.save(torch_model("resnet18").state_dict(), source)
    output = tmp_path / "out.safetensors"
    result = run_converter(source, "--output", output, "--model", "resnet34", "--no-verify")
    assert result.returncode == 1
    assert f"does not fit resnet34 (from {str(source)!r}): it looks like resnet18" in result.stderr
    assert result.stderr.rstrip().endswith("fix: the file holds resnet18: ask for that model "
                                           "(name='resnet18', --model resnet18)")
    assert "missing key(s): " in result.stderr
    assert "layer1.2.conv1.weight" in result.stderr and "layer3.5.bn2.running_var" in result.stderr
    assert os.listdir(tmp_path) == ["r18.pth"]


def test_converter_bounds_the_class_count_without_aborting(tmp_path):
    """A typo'd class count is a one-line error (exit 1), not an XLA abort (exit 134)."""
    source = tmp_path / "r18.pth"
    torch.save(torch_model("resnet18").state_dict(), source)
    result = run_converter(source, "--output", tmp_path / "out.safetensors", "--no-verify",
                           "--num-classes", "100000000000")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "num_classes must be an int from 0 (headless) to 1,000,000" in result.stderr
    assert os.listdir(tmp_path) == ["r18.pth"]


def test_converter_never_writes_over_the_files_a_folder_is_read_through(tmp_path):
    """The guard compares the files read, not only the folder given: a Hugging Face folder's
    model.safetensors and config.json are refused as outputs, before anything is read."""
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in torch_model("resnet18").state_dict().items()},
              folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "resnet"}')
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    for name in ("model.safetensors", "config.json"):
        result = run_converter(folder, "--output", folder / name, "--no-verify")
        assert result.returncode == 1, result.stderr
        assert f"is the input file {str(folder / name)!r}" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        with pytest.raises(resnext_flax.ResnextFlaxError, match="the input would be"):
            convert_checkpoint(folder, folder / name, verify=False)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before


def test_converter_names_a_missing_output_folder_and_creates_nothing(tmp_path):
    source = tmp_path / "r18.pth"
    torch.save(torch_model("resnet18").state_dict(), source)
    result = run_converter(source, "--output", tmp_path / "new" / "r18.safetensors",
                           "--no-verify")
    assert result.returncode == 1
    assert f"the folder {str(tmp_path / 'new')!r} does not exist" in result.stderr
    assert os.listdir(tmp_path) == ["r18.pth"]


def test_converter_reports_an_unreadable_file(tmp_path):
    source = tmp_path / "truncated.pth"
    torch.save(torch_model("resnet18").state_dict(), source)
    source.write_bytes(source.read_bytes()[:1000])
    result = run_converter(source, "--output", tmp_path / "out.safetensors", "--no-verify")
    assert result.returncode == 1 and "could not read" in result.stderr
    assert os.listdir(tmp_path) == ["truncated.pth"]


def test_loading_a_converted_checkpoint_needs_no_torch(tmp_path):
    model = resnext_flax.resnet18(num_classes=5)
    path = tmp_path / "r18.safetensors"
    resnext_flax.save_checkpoint(model, path)
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "import numpy as np, resnext_flax\n"
        f"m = resnext_flax.load_checkpoint({str(path)!r})\n"
        "print(m(np.ones((1, 32, 32, 3), np.float32)).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 5)"


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    model = resnext_flax.resnet18(num_classes=5)
    path = tmp_path / "r18.safetensors"
    resnext_flax.save_checkpoint(model, path)
    loaded = resnext_flax.load_checkpoint(path)
    for key, value in resnext_flax.to_torch_state_dict(model).items():
        np.testing.assert_array_equal(resnext_flax.to_torch_state_dict(loaded)[key], value)

    not_ours = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, not_ours)
    with pytest.raises(ValueError, match="not a resnext_flax checkpoint"):
        resnext_flax.load_checkpoint(not_ours)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        resnext_flax.load_checkpoint(garbage)
