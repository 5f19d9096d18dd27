"""Pretrained models: ``from_pretrained(name, weights)`` with a cache of converted checkpoints.

Lookup order, first hit wins:

1. ``checkpoint=`` — a local torchvision ``.pth`` / ``.safetensors`` file or a converted
   resnext_flax checkpoint; never touches the network.
2. This library's cache (``$RESNEXT_FLAX_CACHE``, else ``$XDG_CACHE_HOME/resnext_flax``, else
   ``~/.cache/resnext_flax``): ``<torchvision file stem>.safetensors``, loaded without torch.
3. torch hub's checkpoint folder (``torch.hub.get_dir()/checkpoints``): the ``.pth`` a
   torchvision user already downloaded; its sha256 prefix is checked, then it is converted
   into the cache.
4. Download the ``.pth`` (urllib; ``file://`` URLs work, ``$RESNEXT_FLAX_BASE_URL`` names a
   mirror), check its sha256 prefix, convert it into the cache and discard the ``.pth``.

Converting a ``.pth`` needs torch (``torch.load``); every later load reads the converted
safetensors file and needs neither torch nor the network. Cache writes go through a
temporary file and a rename, so a failed or interrupted download never leaves a partial file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from resnext_flax.checkpoint import FORMAT as CHECKPOINT_FORMAT
from resnext_flax.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from resnext_flax.conversion import model_from_state_dict
from resnext_flax.model import ResNet
from resnext_flax.variants import get_spec
from resnext_flax.weight_sets import WeightSet, get_weight_set
from resnext_flax.weights import read_state_dict

CACHE_ENV = "RESNEXT_FLAX_CACHE"
BASE_URL_ENV = "RESNEXT_FLAX_BASE_URL"
OFFLINE_ENV = "RESNEXT_FLAX_OFFLINE"
_CHUNK = 1 << 20


class WeightsUnavailableError(OSError):
    """The weights are neither cached nor downloadable (offline, HTTP error, missing file)."""


class ChecksumError(ValueError):
    """A weight file's sha256 does not start with the prefix in its torchvision name."""


def default_cache_dir() -> Path:
    """Where converted checkpoints are cached: ``$RESNEXT_FLAX_CACHE``, else
    ``$XDG_CACHE_HOME/resnext_flax``, else ``~/.cache/resnext_flax``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg, "resnext_flax").expanduser()


def torch_hub_checkpoint_dir() -> Path:
    """torch hub's checkpoint folder, ``torch.hub.get_dir()/checkpoints``.

    Computed as torch does (``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``, else
    ``~/.cache/torch/hub``) without importing torch; if torch is already imported its
    ``get_dir()`` is asked, so ``torch.hub.set_dir`` is honoured.
    """
    hub = sys.modules.get("torch.hub")
    if hub is not None:
        return Path(hub.get_dir(), "checkpoints")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(xdg, "torch")
    return Path(torch_home, "hub", "checkpoints").expanduser()


def weights_url(weights: WeightSet, url: str | None = None) -> str:
    """The URL to download `weights` from: `url` if given, else ``$RESNEXT_FLAX_BASE_URL``
    joined with the file name (a mirror), else torchvision's URL."""
    if url:
        return url
    base = os.environ.get(BASE_URL_ENV)
    if base:
        return base.rstrip("/") + "/" + weights.filename
    return weights.url


def cached_checkpoint_path(weights: WeightSet, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted checkpoint of `weights` lives in the cache (it may not exist)."""
    stem = weights.filename.rsplit(".", 1)[0]
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return directory / f"{stem}.safetensors"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_hash(digest: str, weights: WeightSet, source: str) -> None:
    prefix = weights.sha256_prefix
    if not digest.startswith(prefix):
        raise ChecksumError(
            f"{source} has sha256 {digest[:16]}..., but {weights.filename} must start with "
            f"{prefix!r}: the file is corrupt, truncated or not {weights.name}"
        )


def _resolve(name: str, weights: str | WeightSet) -> WeightSet:
    get_spec(name)  # a clear error for unknown names
    if isinstance(weights, WeightSet):
        if weights.model != name:
            raise ValueError(f"weight set {weights.name} is for {weights.model}, not {name}")
        return weights
    if weights is None:
        raise ValueError(
            "from_pretrained needs a weight set (e.g. 'DEFAULT'); for random weights use "
            f"resnext_flax.create_model({name!r})"
        )
    return get_weight_set(name, weights)


def _model_from_torch_file(
    name: str, path: str | os.PathLike, *, dtype: Any = None
) -> ResNet:
    """Build `name` from a torchvision state-dict file (strict, by name)."""
    return model_from_state_dict(read_state_dict(path), name, dtype=dtype)


def _load_converted(
    name: str, path: str | os.PathLike, meta: dict[str, str], *, dtype: Any = None
) -> ResNet:
    if meta.get("model") and meta["model"] != name:
        raise ValueError(f"{os.fspath(path)!r} holds a {meta['model']} checkpoint, not {name}")
    model = load_checkpoint(path, dtype=dtype)
    if model.spec != get_spec(name):
        raise ValueError(f"{os.fspath(path)!r} holds architecture {model.spec}, not {name}")
    return model


def _load_local(name: str, path: str | os.PathLike, *, dtype: Any = None) -> ResNet:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="numpy") as f:
                meta = f.metadata() or {}
        except Exception as err:
            raise ValueError(f"{path!r} is not a readable safetensors file: {err}") from err
        if meta.get("format") == CHECKPOINT_FORMAT:  # converted; else a torchvision state dict
            return _load_converted(name, path, meta, dtype=dtype)
    return _model_from_torch_file(name, path, dtype=dtype)


def _convert_into_cache(
    weights: WeightSet, pth: str | os.PathLike, dest: Path, *, source_url: str, digest: str
) -> None:
    model = _model_from_torch_file(weights.model, pth)
    save_checkpoint(model, dest, metadata={
        "weights": weights.name,
        "source_url": source_url,
        "source_sha256": digest,
    })


def _require_torch(weights: WeightSet) -> None:
    if importlib.util.find_spec("torch") is None:
        raise ImportError(
            f"converting {weights.filename} (a PyTorch file) needs torch once: "
            "pip install 'resnext-flax[torch]'; or pass checkpoint= a converted .safetensors file"
        )


def _download(url: str, dest: Path, weights: WeightSet, *, progress: bool) -> str:
    """Stream `url` into `dest`; returns the sha256. Raises on short reads and bad hashes."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise WeightsUnavailableError(_unavailable_message(weights, url, err)) from err
    with response, open(dest, "wb") as f:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=weights.filename, disable=not progress) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                raise WeightsUnavailableError(
                    f"download of {url} failed after {received} bytes ({err}); nothing was "
                    "cached"
                ) from err
    if total is not None and received != total:
        raise WeightsUnavailableError(
            f"download of {url} stopped after {received} of {total} bytes; nothing was cached"
        )
    hexdigest = digest.hexdigest()
    _check_hash(hexdigest, weights, f"the file downloaded from {url}")
    return hexdigest


def _unavailable_message(weights: WeightSet, url: str, reason: object) -> str:
    hub_path = torch_hub_checkpoint_dir() / weights.filename
    return (
        f"could not download {weights.name} from {url} ({reason}).\n"
        f"Without network access: fetch {url} on another machine and put the file at "
        f"{hub_path} (torch hub's checkpoint folder), or pass checkpoint=PATH; "
        f"${BASE_URL_ENV} points downloads at a mirror."
    )


def download_pretrained(
    name: str,
    weights: str | WeightSet = "DEFAULT",
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    url: str | None = None,
) -> Path:
    """Make sure the converted checkpoint of ``name`` / `weights` is in the cache; return its
    path. Uses the cache, then torch hub's folder, then downloads (see the module docstring).

    **Arguments:**
    - `weights`: a tag (``"DEFAULT"``, ``"IMAGENET1K_V1"``…) or a :class:`WeightSet`.
    - `cache_dir`: overrides ``$RESNEXT_FLAX_CACHE`` / ``~/.cache/resnext_flax``.
    - `progress`: show a tqdm progress bar while downloading.
    - `url`: download from here instead (a mirror or a ``file://`` URL); the file must still
      carry the weight set's sha256 prefix.
    """
    ws = _resolve(name, weights)
    dest = cached_checkpoint_path(ws, cache_dir)
    if dest.is_file():
        return dest
    hub_file = torch_hub_checkpoint_dir() / ws.filename
    if hub_file.is_file():
        _require_torch(ws)
        digest = sha256_file(hub_file)
        _check_hash(digest, ws, f"{hub_file} (torch hub's copy; delete it to re-download)")
        _convert_into_cache(ws, hub_file, dest, source_url=hub_file.as_uri(), digest=digest)
        return dest
    source = weights_url(ws, url)
    if os.environ.get(OFFLINE_ENV, "").strip() not in ("", "0"):
        raise WeightsUnavailableError(
            _unavailable_message(ws, source, f"${OFFLINE_ENV} is set; no download attempted")
        )
    _require_torch(ws)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
        pth = Path(tmp, ws.filename)
        digest = _download(source, pth, ws, progress=progress)
        _convert_into_cache(ws, pth, dest, source_url=source, digest=digest)
    return dest


def from_pretrained(
    name: str,
    weights: str | WeightSet = "DEFAULT",
    *,
    checkpoint: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    url: str | None = None,
    dtype: Any = None,
) -> ResNet:
    """torchvision's pretrained `name` as a Flax model, in eval mode.

    **Arguments:**
    - `name`: a model name (``resnext_flax.list_models()``).
    - `weights`: ``"DEFAULT"`` (torchvision's choice), a tag such as ``"IMAGENET1K_V1"``, or
      a :class:`WeightSet`.
    - `checkpoint`: a local torchvision ``.pth`` / ``.safetensors`` state dict or a converted
      resnext_flax checkpoint; loaded strictly, no network. Its class count is kept (e.g. a
      fine-tuned head).
    - `cache_dir`, `progress`, `url`: see :func:`download_pretrained`.
    - `dtype`: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    """
    ws = _resolve(name, weights)
    if checkpoint is not None:
        return _load_local(name, checkpoint, dtype=dtype)
    path = download_pretrained(name, ws, cache_dir=cache_dir, progress=progress, url=url)
    try:
        meta = read_checkpoint_metadata(path)
    except ValueError as err:
        raise ValueError(f"cached checkpoint {path} is unreadable; delete it to fetch it "
                         f"again ({err})") from err
    expected = ws.sha256_prefix
    if not meta.get("source_sha256", expected).startswith(expected):
        raise ValueError(
            f"cached checkpoint {path} was converted from a file with sha256 "
            f"{meta['source_sha256'][:16]}..., not {ws.filename}; delete it to fetch it again"
        )
    return _load_converted(name, path, meta, dtype=dtype)


__all__ = [
    "ChecksumError",
    "WeightsUnavailableError",
    "cached_checkpoint_path",
    "default_cache_dir",
    "download_pretrained",
    "from_pretrained",
    "torch_hub_checkpoint_dir",
    "weights_url",
]
