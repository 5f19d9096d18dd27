"""Careless and hostile input: every case ends in a clear error (or a loud NaN), nothing is lost
or half-written, nothing runs forever."""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from limits import CHILD_TIMEOUT
from PIL import Image
from pretrained_helpers import save_torchvision_file
from torch_reference import torch_model

import resnext_flax
from resnext_flax import cli, training
from resnext_flax.preprocess import load_image
from resnext_flax.weights import files
from resnext_flax.weights.cache import CACHE_ENV, ChecksumError, WeightsUnavailableError
from resnext_flax.weights.catalog import get_weight_set
from resnext_flax.weights.checkpoint import CheckpointError
from resnext_flax.weights.pretrained import download_pretrained
from resnext_flax.weights.torch_port import NonFiniteWeightsWarning, StateDictMismatchError

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def torch_resnet18() -> torch.nn.Module:
    return torch_model("resnet18", seed=4)


@pytest.fixture(scope="module")
def pth(torch_resnet18, tmp_path_factory) -> pathlib.Path:
    return save_torchvision_file(torch_resnet18, tmp_path_factory.mktemp("w"), "resnet18")


@pytest.fixture(scope="module")
def converted(pth, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("c") / "resnet18.safetensors"
    resnext_flax.save_checkpoint(resnext_flax.load_model(pth), path)
    return path


# ---- 1. training labels ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_state():
    model = resnext_flax.resnet18(num_classes=4)
    return training.create_train_state(model, training.sgd(0.1))


def _batch(labels):
    images = np.random.default_rng(0).standard_normal((len(labels), 16, 16, 3))
    return jnp.asarray(images, jnp.float32), jnp.asarray(labels)


@pytest.mark.parametrize("labels", [[0, 1, 4, 2], [-1, 0, 1, 2], [1, 2, 3, 4]])
def test_out_of_range_labels_skip_the_step_and_report_nan(small_state, labels):
    """torch raises for these; a one_hot zero row would train on a wrong, finite loss."""
    new, metrics = training.train_step(small_state, *_batch(labels))
    assert math.isnan(float(metrics["loss"])) and int(metrics["invalid_labels"]) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(small_state.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    evaluated = training.eval_step(small_state, *_batch(labels))
    assert int(evaluated["invalid_labels"]) == 1
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        training.validate_labels(np.asarray(labels), 4)
    _, metrics = training.train_step(small_state, *_batch([0, 1, 2, 3]))
    assert np.isfinite(float(metrics["loss"])) and int(metrics["invalid_labels"]) == 0


@pytest.mark.parametrize(("labels", "message"), [
    (np.array([0, 1, 2.5, 3], np.float32), "integer class indices"),
    (np.array([[0], [1], [2], [3]]), r"shape \(N,\) = \(4,\)"),
    (np.array([0, 1, 2]), r"shape \(N,\) = \(4,\)"),
])
def test_float_or_misshaped_labels_are_rejected(small_state, labels, message):
    images = _batch([0, 1, 2, 3])[0]
    for step in (training.train_step, training.eval_step):
        with pytest.raises(ValueError, match=message):
            step(small_state, images, jnp.asarray(labels))


@pytest.mark.parametrize("lr", [float("nan"), -0.1, float("inf")])
def test_bad_learning_rates_are_rejected(lr):
    with pytest.raises(ValueError, match="learning_rate must be a finite number >= 0"):
        training.sgd(lr)


# ---- 2. the converter and its own input ------------------------------------------------------


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "convert" / "convert_torchvision.py"),
                           *args], capture_output=True, text=True, timeout=CHILD_TIMEOUT)


def test_converter_refuses_to_overwrite_its_input(tmp_path, pth):
    for source in (pth, tmp_path / "state.safetensors"):
        if source.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(torch_model("resnet18", seed=4).state_dict(), str(source))
        before = source.read_bytes()
        link = tmp_path / f"link{source.suffix}"
        link.unlink(missing_ok=True)
        link.symlink_to(source)
        for output in (source, link):
            result = _convert(str(source), "--output", str(output), "--no-verify")
            assert result.returncode == 1, result.stderr
            assert "is the input file" in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
        assert source.read_bytes() == before


@pytest.mark.parametrize(("option", "message"), [
    (["--probe-size", "0"], "probe"), (["--probe-batch", "0"], "probe"),
    (["--tolerance", "-1"], "tolerance"), (["--tolerance", "nan"], "tolerance"),
])
def test_converter_options_are_validated(tmp_path, pth, option, message):
    result = _convert(str(pth), "--output", str(tmp_path / "out.safetensors"), *option)
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


# ---- 3. a failed strict load writes nothing ---------------------------------------------------


@pytest.mark.parametrize("bad", [torch.zeros(1000, dtype=torch.int64),
                                 np.array([object()] * 1000, dtype=object)])
def test_failed_load_leaves_the_model_unchanged(torch_resnet18, bad):
    model = resnext_flax.resnet18()
    before = np.asarray(model.conv1.kernel.get_value()).copy()
    state_dict = dict(torch_resnet18.state_dict())
    state_dict["fc.bias"] = bad  # the last key: everything before it fits
    with pytest.raises(StateDictMismatchError, match=r"fc\.bias"):
        resnext_flax.load_torch_state_dict(model, state_dict)
    np.testing.assert_array_equal(model.conv1.kernel.get_value(), before)


# ---- 4. file modes ---------------------------------------------------------------------------


def test_files_get_the_mode_of_a_plain_open(tmp_path, torch_resnet18):
    old = os.umask(0o022)
    try:
        path = tmp_path / "m.safetensors"
        resnext_flax.save_checkpoint(resnext_flax.resnet18(num_classes=2), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        resnext_flax.save_checkpoint(resnext_flax.resnet18(num_classes=2), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


# ---- 5. 16-bit images ------------------------------------------------------------------------


def _gradient_png(tmp_path, dtype=np.uint16) -> pathlib.Path:
    gradient = np.linspace(0, np.iinfo(dtype).max, 256 * 64).reshape(64, 256).astype(dtype)
    path = tmp_path / "gradient16.png"
    Image.fromarray(gradient).save(path)
    return path


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = _gradient_png(tmp_path)
    with Image.open(path) as raw:
        clipped = np.asarray(raw.convert("RGB"))  # Pillow's (and torchvision's) conversion
    assert clipped.mean() > 250  # the bug: nearly white
    ours = np.asarray(load_image(path))
    assert abs(ours.mean() - 127.5) < 0.5
    batch = resnext_flax.preprocess.preprocess([path])
    assert np.isfinite(batch).all() and batch.std() > 0.5


def test_float_images_are_refused(tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)).save(path)
    with pytest.raises(ValueError, match="floating-point pixels"):
        load_image(path)


# ---- 6. hostile converted-checkpoint headers ------------------------------------------------


def _with_header(source: pathlib.Path, dest: pathlib.Path, **changes) -> pathlib.Path:
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(source), framework="numpy") as f:
        meta = dict(f.metadata())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(load_file(str(source)), str(dest), metadata=meta)
    return dest


SPEC = {"block": "basic", "layers": [2, 2, 2, 2], "groups": 1, "width_per_group": 64}


@pytest.mark.parametrize(("changes", "field"), [
    ({"spec": json.dumps({**SPEC, "layers": [3000, 2, 2, 2]})}, "spec"),
    ({"spec": "{not json"}, "spec"),
    ({"spec": None}, "spec"),
    ({"spec": json.dumps({**SPEC, "layers": "2222"})}, "spec"),
    ({"spec": json.dumps({**SPEC, "groups": 0})}, "spec"),
    ({"spec": json.dumps({**SPEC, "depth": 18})}, "spec"),
    ({"spec": json.dumps([1, 2])}, "spec"),
    ({"num_classes": "ten"}, "num_classes"),
    ({"num_classes": "-5"}, "num_classes"),
])
def test_hostile_headers_fail_fast_with_one_error(tmp_path, converted, changes, field):
    path = _with_header(converted, tmp_path / "hostile.safetensors", **changes)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"field '{field}'") as info:
        resnext_flax.load_checkpoint(path)
    assert str(path) in str(info.value)
    assert time.perf_counter() - start < 10


# ---- 7. downloads have a size cap ------------------------------------------------------------


def test_endless_download_stops_at_the_expected_size(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    start = time.perf_counter()
    with pytest.raises(ChecksumError, match="sent more than"):
        download_pretrained("resnet18", url="file:///dev/zero", progress=False)
    assert time.perf_counter() - start < 60
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


# ---- 8. temporary files ----------------------------------------------------------------------


def test_stale_temporary_files_are_cleaned_and_fresh_ones_kept(tmp_path):
    target = tmp_path / "model.safetensors"
    stale = tmp_path / f".model.safetensors.{files.TEMP_MARK}old12345"
    fresh = tmp_path / f".model.safetensors.{files.TEMP_MARK}new12345"
    other = tmp_path / f".other.safetensors.{files.TEMP_MARK}old12345"
    for path in (stale, fresh, other):
        path.write_bytes(b"partial")
    old = time.time() - 2 * files.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    resnext_flax.save_checkpoint(resnext_flax.resnet18(num_classes=2), target)
    assert not stale.exists() and fresh.exists() and other.exists() and target.exists()


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    target = tmp_path / "out.bin"

    def write(tmp: str) -> None:
        pathlib.Path(tmp).write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives first

    with pytest.raises(KeyboardInterrupt), files.sigterm_as_interrupt():
        files.atomic_write(target, write)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ---- 9. the cache trusts only files with the right source hash -------------------------------


def test_cached_file_without_source_hash_is_not_trusted(tmp_path, monkeypatch, converted):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    ws = get_weight_set("resnet18")
    planted = tmp_path / (ws.filename.rsplit(".", 1)[0] + ".safetensors")
    planted.write_bytes(converted.read_bytes())  # random weights, no source_sha256
    with pytest.raises(ChecksumError, match="records no source hash"):
        resnext_flax.from_pretrained("resnet18")


# ---- errors that must be one clear line ------------------------------------------------------


def test_cli_reports_a_decompression_bomb_in_one_line(tmp_path, monkeypatch, capsys, pth):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    image = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(image)
    status = cli.main(["predict", str(image), "--model", "resnet18", "--checkpoint", str(pth),
                       "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1 and "bomb.png" in err and len(err.strip().splitlines()) == 1


def test_cli_reports_a_malformed_checkpoint_in_one_line(tmp_path, capsys, converted):
    bad = _with_header(converted, tmp_path / "bad.safetensors", spec="{")
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(image)
    status = cli.main(["predict", str(image), "--model", "resnet18", "--checkpoint", str(bad)])
    err = capsys.readouterr().err
    assert status == 1 and "field 'spec'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("content", "looks_like"), [
    (b"", "an empty file"), (b"not a checkpoint\n", "a text file"),
])
def test_junk_pth_files_say_what_they_look_like(tmp_path, content, looks_like):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(files.WeightFileError, match=looks_like) as info:
        resnext_flax.read_state_dict(path)
    assert "read_state_dict" in str(info.value) and str(path) in str(info.value)


def test_a_converted_file_passed_as_a_torchvision_file_names_the_right_function(converted):
    with pytest.raises(ValueError, match="load_checkpoint"):
        resnext_flax.read_state_dict(converted)


def test_cache_dir_that_is_a_file_is_named(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    with pytest.raises(WeightsUnavailableError, match=f"cache folder {blocker} is a file"):
        download_pretrained("resnet18", cache_dir=blocker, url="file:///nowhere")


def test_reserved_or_non_string_metadata_is_refused(tmp_path):
    model = resnext_flax.resnet18(num_classes=2)
    with pytest.raises(ValueError, match=r"\['spec'\] are reserved"):
        resnext_flax.save_checkpoint(model, tmp_path / "a.safetensors", metadata={"spec": "x"})
    with pytest.raises(ValueError, match="strings to strings"):
        resnext_flax.save_checkpoint(model, tmp_path / "a.safetensors", metadata={"epoch": 3})
    assert list(tmp_path.iterdir()) == []


def test_non_finite_weights_are_named_in_a_warning(torch_resnet18):
    state_dict = dict(torch_resnet18.state_dict())
    state_dict["layer2.0.bn1.running_var"] = torch.full((128,), float("nan"))
    with pytest.warns(NonFiniteWeightsWarning, match="layer2.0.bn1.running_var"):
        resnext_flax.load_torch_state_dict(
            nnx.eval_shape(lambda: resnext_flax.create_model("resnet18")), state_dict)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWeightsWarning)
        resnext_flax.load_torch_state_dict(  # finite weights: no warning
            nnx.eval_shape(lambda: resnext_flax.create_model("resnet18")),
            torch_resnet18.state_dict())


def test_nan_image_is_reported_not_classified():
    predictor = resnext_flax.Predictor.from_model(resnext_flax.resnet18(num_classes=3))
    images = np.zeros((2, 32, 32, 3), np.float32)
    images[1, 0, 0, 0] = np.nan
    result = predictor(images)
    assert list(result.finite) == [True, False]
    assert result.top(0)[0][0].startswith("class ")
    with pytest.raises(ValueError, match="image 1: non-finite logits"):
        result.top(1)


def test_constructors_and_inputs_reject_nonsense():
    with pytest.raises(ValueError, match="num_classes must be an int from 0"):
        resnext_flax.resnet18(num_classes=-5)
    model = resnext_flax.resnet18(num_classes=0)
    model.eval()
    with pytest.raises(ValueError, match="N, H and W must be at least 1"):
        model(jnp.zeros((0, 32, 32, 3)))
    with pytest.raises(ValueError, match="headless"):
        state = training.create_train_state(model, training.sgd(0.1))
        training.train_step(state, *_batch([0, 1]))


def test_image_bytes_that_are_no_image(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_bytes(io.BytesIO(b"GIF89a garbage").getvalue())
    with pytest.raises(ValueError, match=r"could not read .*fake\.jpg.* as an image"):
        load_image(path)
