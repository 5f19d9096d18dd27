"""from_pretrained: local checkpoints, the download path (file:// URLs), the cache and its
failure modes — all offline, with random-weight torchvision files saved locally."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch_reference
from limits import CHILD_TIMEOUT
from pretrained_helpers import sample_image_paths, save_torchvision_file, sha256

import resnext_flax
from resnext_flax import from_pretrained
from resnext_flax.weights.cache import (
    BASE_URL_ENV,
    CACHE_ENV,
    OFFLINE_ENV,
    ChecksumError,
    WeightsUnavailableError,
    cached_checkpoint_path,
    default_cache_dir,
    torch_hub_checkpoint_dir,
    weights_url,
)
from resnext_flax.weights.catalog import WeightSet, get_weight_set
from resnext_flax.weights.checkpoint import read_checkpoint_metadata
from resnext_flax.weights.pretrained import split_weights
from resnext_flax.weights.torch_port import StateDictMismatchError


@pytest.fixture(scope="module")
def torch_resnet18() -> torch.nn.Module:
    return torch_reference.torch_model("resnet18", seed=3)


@pytest.fixture(scope="module")
def pth(torch_resnet18, tmp_path_factory) -> pathlib.Path:
    """resnet18-<its own sha256 prefix>.pth, torchvision's naming rule."""
    return save_torchvision_file(torch_resnet18, tmp_path_factory.mktemp("weights"), "resnet18")


pytestmark = pytest.mark.usefixtures("isolated_dirs")


def local_weight_set(path: pathlib.Path) -> WeightSet:
    """resnet18's table entry pointed at a local file (its name carries its sha256 prefix)."""
    return dataclasses.replace(get_weight_set("resnet18"), url=path.as_uri())


def assert_same_weights(model, torch_model):
    expected = {k: v.numpy() for k, v in torch_model.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    got = resnext_flax.to_torch_state_dict(model)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def files_under(directory: pathlib.Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def assert_eval_mode(model):
    assert model.bn1.use_running_average and model.layer4[1].bn2.use_running_average


# ---- checkpoint= : local files, no network -------------------------------------------------


def test_checkpoint_pth(pth, torch_resnet18):
    model = from_pretrained("resnet18", checkpoint=pth)
    assert_same_weights(model, torch_resnet18)
    assert_eval_mode(model)


def test_checkpoint_torchvision_safetensors(tmp_path, torch_resnet18):
    from safetensors.torch import save_file

    path = tmp_path / "resnet18.safetensors"
    save_file(torch_resnet18.state_dict(), str(path))
    assert_same_weights(from_pretrained("resnet18", checkpoint=path), torch_resnet18)


def test_checkpoint_converted(tmp_path, pth, torch_resnet18):
    converted = tmp_path / "converted.safetensors"
    resnext_flax.save_checkpoint(from_pretrained("resnet18", checkpoint=pth), converted)
    model = from_pretrained("resnet18", checkpoint=converted)
    assert_same_weights(model, torch_resnet18)
    assert_eval_mode(model)
    with pytest.raises(ValueError, match="holds a resnet18 checkpoint, not resnet34"):
        from_pretrained("resnet34", checkpoint=converted)


def test_checkpoint_errors(tmp_path, pth):
    with pytest.raises(StateDictMismatchError, match="it looks like resnet18"):
        from_pretrained("resnet34", checkpoint=pth)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        from_pretrained("resnet18", checkpoint=tmp_path / "missing.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"could not read .* as a PyTorch checkpoint"):
        from_pretrained("resnet18", checkpoint=truncated)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        from_pretrained("resnet18", checkpoint=broken)
    with pytest.raises(ValueError, match="for random weights use"):
        from_pretrained("resnet18", None)
    with pytest.raises(ValueError, match="is for resnet18, not resnet50"):
        from_pretrained("resnet50", get_weight_set("resnet18"), checkpoint=pth)
    with pytest.raises(ValueError, match="unknown model"):
        from_pretrained("resnet19", checkpoint=pth)


# ---- the download path and the cache -------------------------------------------------------


def test_download_converts_and_caches(tmp_path, pth, torch_resnet18, capsys, monkeypatch):
    ws = local_weight_set(pth)
    cache = tmp_path / "cache"
    model = from_pretrained("resnet18", ws, progress=True)
    assert_same_weights(model, torch_resnet18)
    assert_eval_mode(model)
    assert "resnet18-" in capsys.readouterr().err  # the tqdm progress bar
    cached = cache / f"{pth.stem}.safetensors"
    assert files_under(cache) == [cached.name]  # the converted file only: no .pth, no temp
    assert cached_checkpoint_path(ws) == cached
    meta = read_checkpoint_metadata(cached)
    assert meta["weights"] == "resnet18.IMAGENET1K_V1"
    assert meta["source_sha256"] == sha256(pth)
    assert meta["source_url"] == pth.as_uri()

    # Later loads read the cache: the URL may now be dead and downloads forbidden.
    gone = dataclasses.replace(ws, url=(tmp_path / "elsewhere" / pth.name).as_uri())
    monkeypatch.setenv(OFFLINE_ENV, "1")
    assert_same_weights(from_pretrained("resnet18", gone, progress=False), torch_resnet18)


def test_explicit_cache_dir_and_url(tmp_path, pth, torch_resnet18):
    ws = dataclasses.replace(get_weight_set("resnet18"), url=f"file:///nowhere/{pth.name}")
    model = from_pretrained("resnet18", ws, cache_dir=tmp_path / "mine", url=pth.as_uri(),
                            progress=False)
    assert_same_weights(model, torch_resnet18)
    assert files_under(tmp_path / "mine") == [f"{pth.stem}.safetensors"]
    assert files_under(tmp_path / "cache") == []


def test_mirror_base_url(monkeypatch, pth, torch_resnet18):
    ws = dataclasses.replace(get_weight_set("resnet18"), url=f"https://example.invalid/{pth.name}")
    monkeypatch.setenv(BASE_URL_ENV, pth.parent.as_uri() + "/")
    assert weights_url(ws) == pth.as_uri()
    assert_same_weights(from_pretrained("resnet18", ws, progress=False), torch_resnet18)


def test_wrong_hash_caches_nothing(tmp_path, pth):
    wrong = tmp_path / "src" / "resnet18-deadbeef.pth"
    wrong.parent.mkdir()
    wrong.write_bytes(pth.read_bytes())
    with pytest.raises(ChecksumError, match=r"must start with 'deadbeef'"):
        from_pretrained("resnet18", local_weight_set(wrong), progress=False)
    assert files_under(tmp_path / "cache") == []


def test_truncated_download_caches_nothing(tmp_path, pth):
    truncated = tmp_path / "src" / pth.name  # the full file's hash prefix, half its bytes
    truncated.parent.mkdir()
    truncated.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    with pytest.raises(ChecksumError, match="corrupt, truncated"):
        from_pretrained("resnet18", local_weight_set(truncated), progress=False)
    assert files_under(tmp_path / "cache") == []


def test_unreachable_url_names_url_and_path(tmp_path, pth):
    missing = (tmp_path / "offline" / pth.name).as_uri()
    ws = dataclasses.replace(get_weight_set("resnet18"), url=missing)
    with pytest.raises(WeightsUnavailableError) as info:
        from_pretrained("resnet18", ws, progress=False)
    hub_path = tmp_path / "torch_home" / "hub" / "checkpoints" / pth.name
    assert missing in str(info.value)
    assert str(hub_path) in str(info.value)
    assert files_under(tmp_path / "cache") == []


def test_offline_with_nothing_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(WeightsUnavailableError) as info:
        from_pretrained("resnet50", progress=False)
    message = str(info.value)
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in message
    assert files_under(tmp_path / "cache") == []


def test_torch_hub_copy_is_used(tmp_path, pth, torch_resnet18, monkeypatch):
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / pth.name).write_bytes(pth.read_bytes())
    ws = dataclasses.replace(get_weight_set("resnet18"), url=f"file:///nowhere/{pth.name}")
    monkeypatch.setenv(OFFLINE_ENV, "1")  # found locally: no download attempted
    assert_same_weights(from_pretrained("resnet18", ws), torch_resnet18)
    assert files_under(tmp_path / "cache") == [f"{pth.stem}.safetensors"]


def test_corrupt_torch_hub_copy(tmp_path, pth):
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / pth.name).write_bytes(pth.read_bytes()[:1000])
    with pytest.raises(ChecksumError, match="torch hub's copy; delete it"):
        from_pretrained("resnet18", local_weight_set(pth))
    assert files_under(tmp_path / "cache") == []


def test_unreadable_cache_file(tmp_path, pth):
    ws = local_weight_set(pth)
    cached = cached_checkpoint_path(ws)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable; delete it"):
        from_pretrained("resnet18", ws)


def test_cache_and_hub_locations(tmp_path, monkeypatch):
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "resnext_flax"
    # Without torch imported, the hub folder is computed exactly as torch.hub.get_dir() does.
    for torch_home in (str(tmp_path / "th"), None):
        if torch_home is None:
            monkeypatch.delenv("TORCH_HOME")
        else:
            monkeypatch.setenv("TORCH_HOME", torch_home)
        expected = pathlib.Path(torch.hub.get_dir(), "checkpoints")
        with monkeypatch.context() as m:
            m.delitem(sys.modules, "torch.hub")
            assert torch_hub_checkpoint_dir() == expected


def test_cached_load_and_predict_need_no_torch(tmp_path, pth, torch_resnet18):
    """After one conversion, loading and predicting work with torch unimportable."""
    from_pretrained("resnet18", local_weight_set(pth), progress=False)
    x = torch_reference.random_images(1, 64, 64, seed=1)
    with torch.no_grad():
        expected = torch_resnet18(torch_reference.to_nchw(x)).numpy()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(f"""
        import dataclasses, sys
        sys.modules["torch"] = None  # any `import torch` now fails
        import numpy as np
        import resnext_flax
        from resnext_flax.weights.catalog import get_weight_set
        ws = dataclasses.replace(get_weight_set("resnet18"),
                                 url="file:///nowhere/{pth.name}")
        model = resnext_flax.from_pretrained("resnet18", ws)
        out = resnext_flax.Predictor.from_model(model)(np.load({str(tmp_path / "x.npy")!r}))
        expected = np.load({str(tmp_path / "expected.npy")!r})
        err = np.linalg.norm(out.logits - expected) / np.linalg.norm(expected)
        assert err <= 1e-5, err
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print("ok", err)
    """)
    env = {**os.environ, OFFLINE_ENV: "1", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


# ---- one spelling of a local file: weights=PATH or checkpoint=PATH, at every entry point -----


def test_a_local_file_goes_in_weights_or_checkpoint_everywhere(pth, torch_resnet18):
    categories = get_weight_set("resnet18").categories
    for model in (resnext_flax.resnet18(weights=pth), resnext_flax.resnet18(weights=str(pth)),
                  resnext_flax.resnet18(checkpoint=pth),
                  resnext_flax.resnet18(weights="IMAGENET1K_V1", checkpoint=str(pth)),
                  resnext_flax.create_model("resnet18", weights=pth),
                  from_pretrained("resnet18", pth), from_pretrained("resnet18", str(pth)),
                  from_pretrained("resnet18", None, checkpoint=pth)):
        assert_same_weights(model, torch_resnet18)
        assert_eval_mode(model)
        assert model.pretrained_cfg.class_names == categories  # filled from the weight set
    assert resnext_flax.resnet18(checkpoint=pth, num_classes=7).num_classes == 7  # as the file
    assert split_weights("resnet18", "IMAGENET1K_V1") == (get_weight_set("resnet18"), None)


def test_a_local_file_spelling_errors(tmp_path, pth):
    with pytest.raises(ValueError, match="both name a local file; pass one"):
        resnext_flax.resnet18(weights=pth, checkpoint=pth)
    with pytest.raises(ValueError, match="both name a local file; pass one"):
        from_pretrained("resnet18", str(pth), checkpoint=pth)
    with pytest.raises(ValueError, match="checkpoint= files only"):
        resnext_flax.resnet18(prefix="module.")
    with pytest.raises(ValueError, match=r"has no weight set 'IMAGENET1K_V9'.*no file"):
        resnext_flax.resnet18(weights="IMAGENET1K_V9")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        resnext_flax.resnet18(weights=str(tmp_path / "missing.pth"))


def test_a_constructor_takes_the_options_its_errors_name(tmp_path, torch_resnet18):
    two = tmp_path / "two.pth"
    torch.save({"student": torch_resnet18.state_dict(), "teacher": torch_resnet18.state_dict()},
               two)
    with pytest.raises(ValueError, match="key='student'"):
        resnext_flax.resnet18(checkpoint=two)
    assert_same_weights(resnext_flax.resnet18(checkpoint=two, key="student"), torch_resnet18)


def test_evaluate_takes_a_file_as_weights(tmp_path, pth, monkeypatch):
    from PIL import Image

    from resnext_flax import evaluation

    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "a" / "x.png")
    calls = []

    def record(name, weights, **options):
        calls.append((weights, options["checkpoint"]))
        raise KeyboardInterrupt  # stop before the evaluation

    monkeypatch.setattr(evaluation, "from_pretrained", record)
    for weights, checkpoint in ((str(pth), None), ("DEFAULT", str(pth))):
        with pytest.raises(KeyboardInterrupt):
            evaluation.evaluate_pretrained(tmp_path / "data", "resnet18", weights,
                                           checkpoint=checkpoint)
    ws = get_weight_set("resnet18")
    assert calls == [(ws, str(pth)), (ws, str(pth))]


def test_the_offline_error_fits_the_entry_point(tmp_path, monkeypatch, pth, capsys):
    from resnext_flax import cli
    from resnext_flax.cli.common import render_error

    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(WeightsUnavailableError) as info:
        resnext_flax.resnet18(weights="DEFAULT")
    message = str(info.value)
    assert "pass the file: checkpoint=PATH;" in message  # what the constructor takes:
    assert resnext_flax.resnet18(checkpoint=pth).pretrained_cfg is not None
    assert "checkpoint=PATH or --checkpoint PATH" in render_error(info.value)

    image = sample_image_paths()[0]
    assert cli.main(["predict", image, "--model", "resnet18", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "pass the file: --checkpoint PATH;" in err and "checkpoint=" not in err, err
    (tmp_path / "a-file").write_text("")
    assert cli.main(["predict", image, "--model", "resnet18", "--no-progress",
                     "--cache-dir", str(tmp_path / "a-file")]) == 1
    err = capsys.readouterr().err
    assert "--cache-dir DIR to a writable folder" in err and "cache_dir=" not in err, err
    with pytest.raises(WeightsUnavailableError, match="or cache_dir=DIR to a writable"):
        from_pretrained("resnet18", cache_dir=tmp_path / "a-file")


def test_the_command_takes_a_file_as_weights(pth, capsys):
    from resnext_flax import cli

    image = sample_image_paths()[0]
    outputs = []
    for option in ("--weights", "--checkpoint"):
        assert cli.main(["predict", image, "--model", "resnet18", option, str(pth),
                         "--top-k", "2", "--no-progress"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith(image)
