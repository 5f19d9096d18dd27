"""Where pretrained weights live on disk and how they arrive: the cache of converted
checkpoints, torch hub's checkpoint folder, and downloads checked against the sha256 prefix in
torchvision's file names."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import math
import os
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from resnext_flax.errors import Fix, Message, Placeholder, WeightsError, WeightsUnavailableError
from resnext_flax.weights.catalog import WeightSet
from resnext_flax.weights.files import is_stale_leftover, remove_stale_temp_files, writer_tag

CACHE_ENV = "RESNEXT_FLAX_CACHE"
BASE_URL_ENV = "RESNEXT_FLAX_BASE_URL"
OFFLINE_ENV = "RESNEXT_FLAX_OFFLINE"
DEADLINE_ENV = "RESNEXT_FLAX_DOWNLOAD_DEADLINE"
#: The longest a whole download may take, in seconds, unless ``download_deadline=`` or
#: ``$RESNEXT_FLAX_DOWNLOAD_DEADLINE`` says otherwise: long enough for the largest torchvision
#: file (485 MB) at 150 kB/s, and a server that trickles bytes cannot hold a process forever.
DOWNLOAD_DEADLINE_SECONDS = 3600.0
#: The longest one read may wait for bytes: a stalled server fails this fast.
READ_TIMEOUT_SECONDS = 60.0
#: Downloads go to ``<cache>/.download-<pid>+<host>+<random>/`` (the writer, as in
#: ``weights.files.writer_tag``), so a cleaner can tell a killed writer's folder.
DOWNLOAD_FOLDER_PREFIX = ".download-"
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
    elsewhere = Message(f"set ${CACHE_ENV} or ", Fix.of(cache_dir=Placeholder("DIR")),
                        " to a writable folder")
    if directory.exists() and not directory.is_dir():
        raise WeightsUnavailableError(Message(
            f"the cache folder {directory} is a file, not a folder; remove it, or ", elsewhere))
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WeightsUnavailableError(Message(
            f"cannot create the cache folder {directory} ({err.strerror}); ", elsewhere)) from err
    if not os.access(directory, os.W_OK | os.X_OK):
        raise WeightsUnavailableError(Message(
            f"the cache folder {directory} is not writable; ", elsewhere))


def remove_stale_leftovers(directory: Path) -> None:
    """Delete what killed writers left in the cache folder: temporary files of atomic writes
    (``weights.files.remove_stale_temp_files``) and download folders, each judged by
    ``weights.files.is_stale_leftover`` (a dead writer of this host, else the age of its
    newest file), so a running download, here or on another host, is never touched."""
    remove_stale_temp_files(directory)
    now = time.time()
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(DOWNLOAD_FOLDER_PREFIX)]
    except OSError:
        return
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            changed = _newest_change(entry.path)
            if is_stale_leftover(entry.name[len(DOWNLOAD_FOLDER_PREFIX):], now - changed):
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass


def _newest_change(folder: str) -> float:
    """The latest modification time of `folder` and everything below it."""
    times = [os.stat(folder, follow_symlinks=False).st_mtime]
    for parent, names, files in os.walk(folder):
        times += [os.stat(os.path.join(parent, name), follow_symlinks=False).st_mtime
                  for name in (*names, *files)]
    return max(times)


def download_folder_prefix() -> str:
    """The name prefix of this process's download folders (see ``DOWNLOAD_FOLDER_PREFIX``)."""
    return DOWNLOAD_FOLDER_PREFIX + writer_tag()


def download_deadline(seconds: float | None = None) -> float:
    """The deadline of a whole download in seconds: `seconds` if given, else
    ``$RESNEXT_FLAX_DOWNLOAD_DEADLINE``, else ``DOWNLOAD_DEADLINE_SECONDS``; a positive,
    finite number."""
    source = "download_deadline"
    if seconds is None:
        text = os.environ.get(DEADLINE_ENV, "").strip()
        if not text:
            return DOWNLOAD_DEADLINE_SECONDS
        source = f"${DEADLINE_ENV}"
        try:
            seconds = float(text)
        except ValueError:
            raise ValueError(f"{source} must be a number of seconds, got {text!r}") from None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{source} must be a number of seconds, got {type(seconds).__name__}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{source} must be a positive, finite number of seconds, got {seconds}")
    return float(seconds)


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


class _Deadline:
    """The end of one download: its HTTP connections are shut down when it passes, so a read
    blocked on a server that trickles bytes (its headers included) returns at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.connections: list[Any] = []
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True

    def passed(self) -> bool:
        return time.monotonic() >= self.end

    def _expire(self) -> None:
        for connection in list(self.connections):
            if connection.sock is not None:  # the plain socket's shutdown, also under TLS
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(connection.sock, socket.SHUT_RDWR)

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib's opener, its HTTP(S) connections watched."""
        handlers = [_WatchedHTTP()]
        if hasattr(urllib.request, "HTTPSHandler"):  # Python built with ssl
            handlers.append(_WatchedHTTPS())
        for handler in handlers:
            handler.deadline = self
        return urllib.request.build_opener(*handlers)

    def watch(self, http_class: Any) -> Any:
        def connect(*args: Any, **kwargs: Any) -> Any:
            connection = http_class(*args, **kwargs)
            self.connections.append(connection)
            return connection
        return connect


class _Watched:
    deadline: _Deadline

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        return super().do_open(self.deadline.watch(http_class), req, **kwargs)


class _WatchedHTTP(_Watched, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPS(_Watched, getattr(urllib.request, "HTTPSHandler", object)):
    pass


def download(url: str, dest: Path, weights: WeightSet, *, progress: bool,
             deadline: float | None = None) -> str:
    """Stream `url` into `dest`; returns the sha256. Raises on short reads, on more bytes
    than the weight set's file can have, on bad hashes, and when the whole download takes
    longer than `deadline` seconds (:func:`download_deadline`) or one read waits longer than
    ``READ_TIMEOUT_SECONDS``."""
    deadline = _Deadline(download_deadline(deadline))
    deadline.timer.start()
    try:
        return _stream(url, dest, weights, progress, deadline)
    finally:
        deadline.timer.cancel()


def _stream(url: str, dest: Path, weights: WeightSet, progress: bool,
            deadline: _Deadline) -> str:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    limit = max_download_bytes(weights)
    received = 0
    try:
        response = deadline.opener().open(url, timeout=READ_TIMEOUT_SECONDS)
    except Exception as err:
        if deadline.passed():
            raise WeightsUnavailableError(_late(url, received, deadline.seconds)) from err
        if isinstance(err, (urllib.error.URLError, OSError, ValueError)):
            raise WeightsUnavailableError(unavailable_message(weights, url, err)) from err
        raise
    # read1 returns what has arrived, so the deadline is checked as bytes trickle in.
    read = getattr(response, "read1", response.read)
    with response, open(dest, "wb") as f:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if total is not None and total > limit:
            raise ChecksumError(
                f"{url} announces {total} bytes, but {weights.filename} is "
                f"{weights.file_size_mb:.1f} MB: not {weights.name}; nothing was downloaded")
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=weights.filename, disable=not progress) as bar:
            try:
                while not deadline.passed() and (chunk := read(_CHUNK)):
                    received += len(chunk)
                    if received > limit:
                        raise ChecksumError(
                            f"{url} sent more than {limit} bytes, but {weights.filename} is "
                            f"{weights.file_size_mb:.1f} MB: not {weights.name}; stopped, "
                            "nothing was cached")
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            except Exception as err:
                if deadline.passed():
                    raise WeightsUnavailableError(
                        _late(url, received, deadline.seconds)) from err
                if isinstance(err, (urllib.error.URLError, TimeoutError, ConnectionError,
                                    http.client.HTTPException)):
                    raise WeightsUnavailableError(
                        f"download of {url} failed after {received} bytes ({err}); nothing "
                        "was cached") from err
                raise
    if deadline.passed() and not (total is not None and received == total):
        raise WeightsUnavailableError(_late(url, received, deadline.seconds))
    if total is not None and received != total:
        raise WeightsUnavailableError(
            f"download of {url} stopped after {received} of {total} bytes; nothing was cached"
        )
    hexdigest = digest.hexdigest()
    check_hash(hexdigest, weights, f"the file downloaded from {url}")
    return hexdigest


def _late(url: str, received: int, deadline: float) -> Message:
    return Message(
        f"download of {url} passed its deadline of {deadline:g} s after {received} bytes; "
        f"nothing was cached. On a slow link raise it with ${DEADLINE_ENV}=SECONDS or ",
        Fix.of(download_deadline=Placeholder("SECONDS")))


def unavailable_message(weights: WeightSet, url: str, reason: object) -> Message:
    """Why `weights` could not be downloaded, and the ways to use a file fetched elsewhere:
    torch hub's folder, or the file itself (a fix, so each entry point spells it its way)."""
    hub_path = torch_hub_checkpoint_dir() / weights.filename
    return Message(
        f"could not download {weights.name} from {url} ({reason}).\n"
        f"Without network access: fetch {url} on another machine and put the file at "
        f"{hub_path} (torch hub's checkpoint folder), or pass the file: ",
        Fix.of(checkpoint=Placeholder("PATH")), f"; ${BASE_URL_ENV} points downloads at a "
        "mirror.")
