"""Where pretrained weights live on disk and how they arrive: the cache of converted
checkpoints, torch hub's checkpoint folder, and downloads checked against the sha256 prefix in
torchvision's file names."""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from resnext_flax.errors import WeightsError, WeightsUnavailableError
from resnext_flax.weights.catalog import WeightSet

CACHE_ENV = "RESNEXT_FLAX_CACHE"
BASE_URL_ENV = "RESNEXT_FLAX_BASE_URL"
OFFLINE_ENV = "RESNEXT_FLAX_OFFLINE"
_CHUNK = 1 << 20


class ChecksumError(WeightsError):
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


def check_cache_dir(directory: Path) -> None:
    """Make sure the cache folder exists and is writable, or say which folder and why."""
    if directory.exists() and not directory.is_dir():
        raise WeightsUnavailableError(
            f"the cache folder {directory} is a file, not a folder; remove it, or set "
            f"${CACHE_ENV} / cache_dir= to another folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WeightsUnavailableError(
            f"cannot create the cache folder {directory} ({err.strerror}); set ${CACHE_ENV} / "
            "cache_dir= to a writable folder") from err
    if not os.access(directory, os.W_OK | os.X_OK):
        raise WeightsUnavailableError(
            f"the cache folder {directory} is not writable; set ${CACHE_ENV} / cache_dir= to a "
            "writable folder")


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


def check_hash(digest: str, weights: WeightSet, source: str) -> None:
    prefix = weights.sha256_prefix
    if not digest.startswith(prefix):
        raise ChecksumError(
            f"{source} has sha256 {digest[:16]}..., but {weights.filename} must start with "
            f"{prefix!r}: the file is corrupt, truncated or not {weights.name}"
        )


def max_download_bytes(weights: WeightSet) -> int:
    """The most a download of `weights` may bring: its published size plus 1% and 1 MiB (the
    published size is rounded), so a source that does not end cannot fill the disk."""
    return int(weights.file_size_mb * 2**20 * 1.01) + 2**20


def download(url: str, dest: Path, weights: WeightSet, *, progress: bool) -> str:
    """Stream `url` into `dest`; returns the sha256. Raises on short reads, on more bytes
    than the weight set's file can have, and on bad hashes."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    limit = max_download_bytes(weights)
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise WeightsUnavailableError(unavailable_message(weights, url, err)) from err
    with response, open(dest, "wb") as f:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if total is not None and total > limit:
            raise ChecksumError(
                f"{url} announces {total} bytes, but {weights.filename} is "
                f"{weights.file_size_mb:.1f} MB: not {weights.name}; nothing was downloaded")
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=weights.filename, disable=not progress) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    received += len(chunk)
                    if received > limit:
                        raise ChecksumError(
                            f"{url} sent more than {limit} bytes, but {weights.filename} is "
                            f"{weights.file_size_mb:.1f} MB: not {weights.name}; stopped, "
                            "nothing was cached")
                    f.write(chunk)
                    digest.update(chunk)
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
    check_hash(hexdigest, weights, f"the file downloaded from {url}")
    return hexdigest


def unavailable_message(weights: WeightSet, url: str, reason: object) -> str:
    hub_path = torch_hub_checkpoint_dir() / weights.filename
    return (
        f"could not download {weights.name} from {url} ({reason}).\n"
        f"Without network access: fetch {url} on another machine and put the file at "
        f"{hub_path} (torch hub's checkpoint folder), or pass checkpoint=PATH; "
        f"${BASE_URL_ENV} points downloads at a mirror."
    )
