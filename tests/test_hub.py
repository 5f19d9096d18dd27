"""Weights from the Hugging Face Hub (``hf-hub:``), offline only: a Hub cache folder built here,
and a server on 127.0.0.1 answering as the Hub's resolve endpoint does. huggingface_hub reads
its settings (``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``) when it is
imported, so each scenario runs in a child process with them set, as a user's would."""

from __future__ import annotations

import copy
import hashlib
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch_reference import random_images, relative_error, to_nchw, torch_model

from resnext_flax.errors import WeightsError
from resnext_flax.weights.hub import parse_hub_id, read_hub_config

ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT = 900  # a loaded 2-core machine; a hang still ends
COMMIT = "a" * 40
SIZE = (2, 32, 48)  # batch, height, width of the parity input
# As test_parity: the float32 floor (torch float32 vs float64) times 10, at least 1e-5.
RTOL, FLOOR_MULTIPLE = 1e-5, 10.0


def timm_config(arch: str, tag: str, **cfg) -> dict:
    """A config.json as timm's push_to_hub writes it."""
    return {"architecture": arch, "num_classes": 1000, "num_features": 512,
            "global_pool": "avg",
            "pretrained_cfg": {"tag": tag, "custom_load": False, "input_size": [3, 32, 32],
                               "fixed_input_size": False, "interpolation": "bicubic",
                               "crop_pct": 0.95, "crop_mode": "center",
                               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                               "num_classes": 1000, "pool_size": [1, 1], "first_conv": "conv1",
                               "classifier": "fc", **cfg}}


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory) -> tuple[torch.nn.Module, dict[str, bytes]]:
    """A random-weight resnet18 and the files of its timm repository (timm's keys are
    torchvision's for this architecture)."""
    model = torch_model("resnet18", seed=5)
    path = tmp_path_factory.mktemp("repo") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if not k.endswith("num_batches_tracked")}, path)
    return model, {"model.safetensors": path.read_bytes()}


def _files(resnet18_files, arch: str, tag: str, **cfg) -> dict[str, bytes]:
    return {**resnet18_files[1],
            "config.json": json.dumps(timm_config(arch, tag, **cfg)).encode()}


def write_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """The layout huggingface_hub keeps: blobs named by hash, a snapshot per commit linking
    to them, refs/main naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))


def torch_logits(model: torch.nn.Module) -> tuple[np.ndarray, float]:
    """The torch model's logits on the parity input and the bound their match must meet."""
    x = to_nchw(random_images(*SIZE, seed=1))
    with torch.no_grad():
        logits = model(x).numpy()
        exact = copy.deepcopy(model).double()(x.double()).numpy()
    return logits, max(RTOL, FLOOR_MULTIPLE * relative_error(logits, exact))


# Run in the child: loads, then a JSON line of what the test checks.
CHILD = textwrap.dedent("""
    import json, sys, urllib.request, warnings
    import numpy as np
    import resnext_flax
    from resnext_flax import cli
    from resnext_flax.weights.catalog import LicenseWarning

    out = {}
    def load(name, weights="DEFAULT"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = resnext_flax.from_pretrained(name, weights, progress=False)
        cfg = model.pretrained_cfg
        return model, {"weights": cfg.weights, "license": cfg.license, "source": cfg.source,
                       "sha256": cfg.sha256, "classes": cfg.class_names[:2],
                       "preprocessing": cfg.preprocessing.to_json(),
                       "license_warnings": [str(w.message) for w in caught
                                            if w.category is LicenseWarning]}
    def error(call):
        try:
            call()
        except Exception as err:
            return [type(err).__name__, str(err)]
        return None
    def requests():
        endpoint = sys.argv[2]
        return None if endpoint == "-" else int(urllib.request.urlopen(endpoint + "/_count").read())

    repo = sys.argv[1]
    model, out["first"] = load("hf-hub:" + repo)
    images = np.random.default_rng(1).standard_normal((2, 32, 48, 3)).astype(np.float32)
    np.save(sys.argv[3], np.asarray(model(images)))  # torch_reference.random_images(2, 32, 48, 1)
    out["torch_imported"] = "torch" in sys.modules
    out["after_first"] = requests()
    out["second"] = load(model.pretrained_cfg.architecture, "hf-hub:" + repo)[1]
    out["after_second"] = requests()
    out["by_tag"] = load(model.pretrained_cfg.architecture, repo.rsplit(".", 1)[1])[1]
    out["missing"] = error(lambda: resnext_flax.from_pretrained("hf-hub:timm/nothing.here"))
    hub = "hf-hub:timm/"
    out["resnet50d"] = error(lambda: resnext_flax.from_pretrained(hub + "resnet50d.a1_in1k"))
    out["no_weights"] = error(lambda: resnext_flax.from_pretrained(hub + "resnet18.config_only"))
    out["wrong_model"] = error(lambda: resnext_flax.from_pretrained("resnet50", "hf-hub:" + repo))
    from sklearn.datasets import load_sample_images
    out["cli"] = cli.main(["predict", load_sample_images().filenames[0], "--weights",
                           "hf-hub:" + repo, "--no-progress", "--no-compilation-cache"])
    print("RESULT " + json.dumps(out))
""")


def run_child(tmp_path: Path, repo: str, endpoint: str | None, env: dict[str, str]) -> dict:
    logits = tmp_path / "logits.npy"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    child_env.update(JAX_PLATFORMS="cpu", HF_HOME=str(tmp_path / "hf-home"),
                     HF_HUB_DISABLE_TELEMETRY="1", RESNEXT_FLAX_CACHE=str(tmp_path / "rf"),
                     **env)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, repo, endpoint or "-", str(logits)], cwd=ROOT,
        env=child_env, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "logits": np.load(logits)}


def check_parity(resnet18_files, logits: np.ndarray) -> None:
    expected, bound = torch_logits(resnet18_files[0])
    assert relative_error(logits, expected) <= bound
    np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))


def test_offline_from_a_hub_cache_folder(tmp_path, resnet18_files):
    """HF_HUB_OFFLINE=1 with the repository in HF_HUB_CACHE: loads with no network, as the
    catalog's set (its license said once), with the repository's preprocessing."""
    cache = tmp_path / "hub"
    repo = "timm/resnet18.fb_swsl_ig1b_ft_in1k"
    write_hub_cache(cache, repo, _files(resnet18_files, "resnet18", "fb_swsl_ig1b_ft_in1k"))
    out = run_child(tmp_path, repo, None, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    check_parity(resnet18_files, out["logits"])
    assert not out["torch_imported"]  # safetensors read without torch
    first = out["first"]
    assert first["weights"] == "resnet18.fb_swsl_ig1b_ft_in1k"
    assert first["license"] == "CC-BY-NC-4.0"
    assert len(first["license_warnings"]) == 1 and "non-commercial" in first[
        "license_warnings"][0]
    assert out["second"]["license_warnings"] == []  # once per process
    assert out["by_tag"]["weights"] == first["weights"]  # the catalog's tag: the same repository
    assert first["classes"] == ["tench", "goldfish"]
    assert first["preprocessing"] == {"resize_size": 33, "crop_size": 32,
                                      "interpolation": "bicubic", "antialias": True,
                                      "mean": [0.485, 0.456, 0.406],
                                      "std": [0.229, 0.224, 0.225]}
    blob = hashlib.sha256(resnet18_files[1]["model.safetensors"]).hexdigest()
    assert first["sha256"] == blob
    assert first["source"] == f"https://huggingface.co/{repo}/blob/{COMMIT}/model.safetensors"
    kind, message = out["missing"]
    assert kind == "WeightsUnavailableError" and "not in the Hub cache" in message
    assert out["wrong_model"][0] == "UnknownModelError"
    assert "holds resnet18 weights, not resnet50's" in out["wrong_model"][1]


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub's ``/<repo>/resolve/<revision>/<file>`` (HEAD and GET), with its headers and
    error codes; ``/_count`` answers how many Hub requests came."""

    repos: ClassVar[dict[str, dict[str, bytes]]] = {}
    requests: ClassVar[list[tuple[str, str, str | None]]] = []

    def log_message(self, *args) -> None:
        pass

    def _answer(self, body: bool) -> None:
        if self.path == "/_count":
            data = str(len(self.requests)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.requests.append((self.command, self.path, self.headers.get("Authorization")))
        parts = self.path.lstrip("/").split("/")
        repo, files = "/".join(parts[:2]), self.repos.get("/".join(parts[:2]))
        if files is None or parts[2:3] != ["resolve"]:
            return self._error("RepoNotFound")
        data = files.get("/".join(parts[4:]))
        if data is None:
            return self._error("EntryNotFound")
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
        del repo

    def _error(self, code: str) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)


def test_download_from_a_local_hub_endpoint(tmp_path, resnet18_files):
    """Downloaded through huggingface_hub (HF_ENDPOINT, HF_TOKEN sent), then read from its
    cache with no request; a missing repository, an architecture this library does not build
    and a repository without model.safetensors each say so."""
    repo = "timm/resnet18.a1_in1k"
    FakeHub.repos = {
        repo: _files(resnet18_files, "resnet18", "a1_in1k"),
        "timm/resnet50d.a1_in1k": {"config.json": json.dumps(
            timm_config("resnet50d", "a1_in1k")).encode()},
        "timm/resnet18.config_only": {"config.json": json.dumps(
            timm_config("resnet18", "config_only")).encode()},
    }
    FakeHub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        out = run_child(tmp_path, repo, endpoint, {
            "HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(tmp_path / "hub"),
            "HF_TOKEN": "hf_test_token"})
    finally:
        server.shutdown()
        server.server_close()
    check_parity(resnet18_files, out["logits"])
    assert out["first"]["weights"] == "resnet18.a1_in1k"
    assert out["first"]["license"] == "Apache-2.0"
    assert out["first"]["license_warnings"] == []
    assert out["after_second"] == out["after_first"]  # the second load asked nothing
    assert out["by_tag"]["sha256"] == out["first"]["sha256"]
    ours = [(m, p) for m, p, _ in FakeHub.requests if p.startswith(f"/{repo}/")]
    gets = [p.rsplit("/", 1)[1] for m, p in ours if m == "GET"]
    assert sorted(gets) == ["config.json", "model.safetensors"]  # each fetched once
    assert all(auth == "Bearer hf_test_token" for _, _, auth in FakeHub.requests)
    assert (tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "refs" / "main").is_file()
    kind, message = out["missing"]
    assert kind == "WeightsUnavailableError" and "no repository timm/nothing.here" in message
    kind, message = out["resnet50d"]
    assert kind == "WeightsError" and "'resnet50d' is not one this library builds" in message
    kind, message = out["no_weights"]
    assert kind == "WeightsError" and "has no model.safetensors" in message
    assert out["cli"] == 0


def test_missing_huggingface_hub_says_how_to_install(monkeypatch):
    import resnext_flax

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'resnext-flax\[hub\]'"):
        resnext_flax.from_pretrained("hf-hub:timm/resnet18.a1_in1k")


def test_timm_config_is_read():
    config = read_hub_config(timm_config("resnext50_32x4d", "a1h_in1k", input_size=[3, 224, 224],
                                         label_names=None))
    assert (config.architecture, config.num_classes, config.tag) == (
        "resnext50_32x4d", 1000, "a1h_in1k")
    pre = config.preprocessing
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == (235, 224, "bicubic")
    named = timm_config("resnet18", "x")
    named.update(num_classes=2, label_names=["cat", "dog"])
    assert read_hub_config(named).class_names == ("cat", "dog")
    squash = read_hub_config(timm_config("resnet18", "x", crop_mode="squash"))
    assert squash.preprocessing is None  # not a resize-then-center-crop transform
    with pytest.raises(WeightsError, match="input_size must be"):
        read_hub_config(timm_config("resnet18", "x", input_size=[3, 224, 192]))
    with pytest.raises(WeightsError, match="crop_pct"):
        read_hub_config(timm_config("resnet18", "x", crop_pct=0))
    with pytest.raises(WeightsError, match="'seresnext50_32x4d' is not one this library"):
        read_hub_config(timm_config("seresnext50_32x4d", "x"))
    with pytest.raises(WeightsError, match="not a timm model repository"):
        read_hub_config({"model_type": "resnet", "depths": [2, 2, 2, 2]})


@pytest.mark.parametrize("text", ["hf-hub:timm", "hf-hub:timm/x@", "hf-hub:/x", "hf-hub:a/b/c"])
def test_malformed_hub_ids_are_refused(text):
    with pytest.raises(WeightsError, match="is not a Hub repository"):
        parse_hub_id(text)
    assert parse_hub_id("hf-hub:timm/resnet50.a1_in1k@v2") == ("timm/resnet50.a1_in1k", "v2")
