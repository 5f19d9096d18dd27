"""Downloads end, and leave nothing behind: an overall deadline against servers that trickle
bytes, cleanup on SIGTERM and Ctrl-C in the Python API, and what SIGKILL left removed on the
next access to the cache (a dead writer's at once, a live writer's never). A local HTTP server
thread stands in for the network."""

from __future__ import annotations

import contextlib
import http.server
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch_reference
from limits import CHILD_TIMEOUT
from pretrained_helpers import save_torchvision_file

import resnext_flax
from resnext_flax.errors import WeightsUnavailableError
from resnext_flax.weights import cache as cache_module
from resnext_flax.weights import files
from resnext_flax.weights.cache import (
    DEADLINE_ENV,
    DOWNLOAD_FOLDER_PREFIX,
    cached_checkpoint_path,
    download_deadline,
)
from resnext_flax.weights.catalog import get_weight_set
from resnext_flax.weights.pretrained import download_pretrained

pytestmark = pytest.mark.usefixtures("isolated_dirs")

FILE = get_weight_set("resnet18").filename  # the name carries the sha256 prefix checked
TOTAL = 10_000  # bytes the trickling server announces


class Trickle(http.server.BaseHTTPRequestHandler):
    """Announces TOTAL bytes, then sends one every `interval` seconds (None: none at all)."""

    interval: float | None = 0.05
    stop: threading.Event
    sent: threading.Event  # set once a few bytes are out

    def do_GET(self):
        if self.path.endswith("/slow-headers/" + FILE):
            self.slow_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(TOTAL))
        self.end_headers()
        self.wfile.flush()
        for _ in range(TOTAL):
            if self.stop.wait(self.interval or 3600):
                return
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:  # the client went away
                return
            if _ == 4:
                self.sent.set()

    def slow_headers(self):
        self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
        for _ in range(TOTAL):
            if self.stop.wait(self.interval):
                return
            try:
                self.wfile.write(b"a")
            except OSError:
                return

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(interval: float | None = 0.05, sent: threading.Event | None = None):
    stop = threading.Event()
    handler = type("Handler", (Trickle,), {"interval": interval, "stop": stop,
                                           "sent": sent or threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{FILE}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def entries(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ---- the overall deadline ---------------------------------------------------------------------


def test_a_trickling_server_meets_the_deadline(tmp_path):
    cache = tmp_path / "cache"
    with serving() as url:
        start = time.monotonic()
        with pytest.raises(WeightsUnavailableError) as info:
            download_pretrained("resnet18", url=url, cache_dir=cache, progress=False,
                                download_deadline=0.5)
        elapsed = time.monotonic() - start
    message = str(info.value)
    assert url in message and "deadline of 0.5 s" in message, message
    received = int(message.split(" after ")[1].split(" bytes")[0])
    assert 0 < received < TOTAL, message
    assert f"${DEADLINE_ENV}=SECONDS" in message and "download_deadline=SECONDS" in message
    assert elapsed < 10, elapsed  # not TOTAL * interval = 500 s
    assert entries(cache) == []


def test_a_server_that_trickles_its_headers_meets_the_deadline(tmp_path):
    with serving() as url:
        url = url.replace(f"/{FILE}", f"/slow-headers/{FILE}")
        start = time.monotonic()
        with pytest.raises(WeightsUnavailableError, match=r"deadline of 0\.5 s after 0 bytes"):
            download_pretrained("resnet18", url=url, cache_dir=tmp_path / "c", progress=False,
                                download_deadline=0.5)
        assert time.monotonic() - start < 10
    assert entries(tmp_path / "c") == []


def test_the_deadline_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(DEADLINE_ENV, "0.3")
    assert download_deadline() == 0.3
    assert download_deadline(7) == 7.0  # the keyword wins
    with serving() as url, pytest.raises(WeightsUnavailableError, match=r"deadline of 0\.3 s"):
        download_pretrained("resnet18", url=url, cache_dir=tmp_path / "c", progress=False)
    monkeypatch.delenv(DEADLINE_ENV)
    assert download_deadline() == cache_module.DOWNLOAD_DEADLINE_SECONDS


@pytest.mark.parametrize("text", ["soon", "-1", "0", "nan", "inf"])
def test_a_bad_deadline_is_refused(text, monkeypatch):
    monkeypatch.setenv(DEADLINE_ENV, text)
    with pytest.raises(ValueError, match=rf"\${DEADLINE_ENV} must be"):
        download_deadline()
    monkeypatch.delenv(DEADLINE_ENV)
    if text not in ("soon",):
        with pytest.raises(ValueError, match="download_deadline must be"):
            download_deadline(float(text))


def test_the_per_read_timeout_still_holds(tmp_path, monkeypatch):
    """A server that goes silent fails after one read's timeout, well inside the deadline."""
    monkeypatch.setattr(cache_module, "READ_TIMEOUT_SECONDS", 0.3)
    with serving(interval=None) as url:
        start = time.monotonic()
        with pytest.raises(WeightsUnavailableError, match="failed after 0 bytes"):
            download_pretrained("resnet18", url=url, cache_dir=tmp_path / "c", progress=False,
                                download_deadline=60)
        assert time.monotonic() - start < 10
    assert entries(tmp_path / "c") == []


# ---- signals: the Python API cleans up, and leaves the process's handlers alone ---------------

CHILD = textwrap.dedent("""
    import sys
    from resnext_flax.weights.pretrained import download_pretrained
    download_pretrained("resnet18", url=sys.argv[1], cache_dir=sys.argv[2], progress=False)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_download_leaves_no_temporary_files(tmp_path, signum):
    cache = tmp_path / "cache"
    sent = threading.Event()
    with serving(sent=sent) as url:
        child = subprocess.Popen([sys.executable, "-c", CHILD, url, str(cache)],
                                 stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
        try:
            deadline = time.monotonic() + CHILD_TIMEOUT
            while not sent.wait(0.1) and child.poll() is None and time.monotonic() < deadline:
                pass
            partial = list(cache.glob(f"{DOWNLOAD_FOLDER_PREFIX}*/{FILE}"))
            assert partial, child.stderr.read() if child.poll() is not None else "no download"
            assert f"{child.pid}+" in partial[0].parent.name  # the writer is in the name
            child.send_signal(signum)
            _, err = child.communicate(timeout=CHILD_TIMEOUT)
        finally:
            if child.poll() is None:
                child.kill()
    # SIGTERM ends it as SIGTERM's default action does; Ctrl-C as Python's default does.
    assert child.returncode == -signum, err
    assert entries(cache) == [], err


def _downloading_handler(monkeypatch, tmp_path) -> list:
    seen = []

    def fake_download(url, dest, weights, *, progress, deadline=None):
        seen.append(signal.getsignal(signal.SIGTERM))
        raise WeightsUnavailableError("stop here")

    monkeypatch.setattr("resnext_flax.weights.pretrained.download", fake_download)
    with pytest.raises(WeightsUnavailableError, match="stop here"):
        download_pretrained("resnet18", cache_dir=tmp_path / "cache", progress=False)
    return seen


def test_the_library_installs_its_handler_only_during_the_write(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    assert before is signal.SIG_DFL
    seen = _downloading_handler(monkeypatch, tmp_path)
    assert seen and seen[0] not in (signal.SIG_DFL, None)  # cleanup on SIGTERM while writing
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_programs_own_handler_is_left_alone(tmp_path, monkeypatch):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert _downloading_handler(monkeypatch, tmp_path) == [mine]
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_handler_is_never_installed_outside_the_main_thread(tmp_path, monkeypatch):
    seen: list = []
    errors: list = []

    def run():
        try:
            seen.extend(_downloading_handler(monkeypatch, tmp_path))
        except BaseException as err:  # reported below
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not errors and seen == [signal.SIG_DFL]


# ---- what SIGKILL leaves is removed on the next access, by its writer's liveness and age -----


@pytest.fixture(scope="module")
def pth(tmp_path_factory) -> pathlib.Path:
    model = torch_reference.torch_model("resnet18", seed=5)
    return save_torchvision_file(model, tmp_path_factory.mktemp("weights"), "resnet18")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_writers_debris_goes_on_the_next_cache_hit(tmp_path, pth):
    import dataclasses

    ws = dataclasses.replace(get_weight_set("resnet18"), url=pth.as_uri())
    resnext_flax.from_pretrained("resnet18", ws, progress=False)  # now cached
    cached = cached_checkpoint_path(ws)
    cache = cached.parent
    host = files.writer_tag().split("+")[1]
    dead, live = dead_pid(), os.getpid()
    old = time.time() - 2 * files.STALE_TEMP_SECONDS

    def temp(writer: str, target: str = cached.name) -> pathlib.Path:
        path = cache / f".{target}.{files.TEMP_MARK}{writer}abc12345"
        path.write_bytes(b"partial")
        return path

    def folder(writer: str) -> pathlib.Path:
        path = cache / f"{DOWNLOAD_FOLDER_PREFIX}{writer}xyz78901"
        path.mkdir()
        (path / pth.name).write_bytes(b"partial")
        return path

    gone = [temp(f"{dead}+{host}+"), temp(f"{dead}+{host}+", "other.safetensors"),
            folder(f"{dead}+{host}+"), temp("4242+elsewhere.example+"),
            folder("4242+elsewhere.example+"), temp("")]
    for path in gone[3:]:  # liveness unknown: judged by age
        for p in (path, *(path.iterdir() if path.is_dir() else ())):
            os.utime(p, (old, old))
    kept = [temp(f"{live}+{host}+"), folder(f"{live}+{host}+"),
            temp("4242+elsewhere.example+", "fresh.safetensors"), cache / "notes.txt"]
    kept[3].write_text("mine")
    for path in kept[:2]:  # a live writer's, however old
        for p in (path, *(path.iterdir() if path.is_dir() else ())):
            os.utime(p, (old, old))
    recent = folder("4343+elsewhere.example+")  # an old folder, but written to just now
    os.utime(recent, (old, old))
    kept.append(recent)
    # Someone else's folder or file that merely starts alike is never ours to delete.
    for name in (f"{DOWNLOAD_FOLDER_PREFIX}manager", f".x.{files.TEMP_MARK}notes"):
        foreign = cache / name
        (foreign.mkdir() if name.startswith(DOWNLOAD_FOLDER_PREFIX) else
         foreign.write_text("theirs"))
        os.utime(foreign, (old - 10**6, old - 10**6))
        kept.append(foreign)

    model = resnext_flax.from_pretrained("resnet18", ws, progress=False)  # a hit: no write
    assert model.pretrained_cfg.weights == ws.name
    assert [p.name for p in gone if p.exists()] == []
    assert [p.name for p in kept if not p.exists()] == []
    assert cached.is_file()


def test_names_of_temporary_files_carry_the_writer(tmp_path):
    names = []

    def write(tmp: str) -> None:
        names.append(os.path.basename(tmp))
        pathlib.Path(tmp).write_bytes(b"x")

    files.atomic_write(tmp_path / "out.bin", write)
    assert names[0].startswith(f".out.bin.{files.TEMP_MARK}{files.writer_tag()}")
    mine = names[0].split(files.TEMP_MARK)[1]
    assert files.is_stale_leftover(mine, files.LIVE_WRITER_MAX_SECONDS - 1) is False
    # A live pid that old is another process that reused it.
    assert files.is_stale_leftover(mine, files.LIVE_WRITER_MAX_SECONDS + 1) is True
    assert files.is_stale_leftover(f"{dead_pid()}+{files.writer_tag().split('+')[1]}+abcdefgh",
                                   0)
    assert files.is_stale_leftover("manager", 10**9) is False  # no name of ours
