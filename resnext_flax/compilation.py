"""JAX's persistent compilation cache for this library's programs, and what the command line
says while a program compiles.

Every first call of a jitted forward or training step compiles an XLA program. JAX can keep the
compiled executables on disk and load them in later processes (its *persistent compilation
cache*), programs that contain the compiled CPU kernel's custom calls included: the kernel's
FFI targets are registered while the program is traced, before a cached executable is loaded.
JAX leaves that cache off, and a library must not switch on global settings behind its user's
back, so importing ``resnext_flax`` changes nothing: :func:`enable_compilation_cache` is an
explicit call (notebooks, services), and the ``resnext-flax`` command, which owns its process,
uses :func:`compilation_cache` unless told not to (``--no-compilation-cache``,
``RESNEXT_FLAX_COMPILATION_CACHE=0``). See ``docs/compilation.md``.

:func:`report_compilation` watches JAX's monitoring events (``jax.monitoring``) to say, on
stderr, when a block compiles and whether the executables were compiled or loaded from the
cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from resnext_flax.weights.cache import default_cache_dir

#: The command line's cache: ``0`` (``false``, ``no``, ``off``) turns it off, a path moves it;
#: unset (or ``1``) it is :func:`default_compilation_cache_dir`.
ENV = "RESNEXT_FLAX_COMPILATION_CACHE"
#: The cache's folder under the library's cache directory (``$RESNEXT_FLAX_CACHE``...).
SUBDIR = "jax-compilation"

# JAX's settings that decide whether and what the persistent cache keeps: every program of
# ours is kept, however fast it compiled and however small it is (-1: no size threshold, and
# JAX may not raise it).
_SETTINGS = {
    "jax_enable_compilation_cache": True,
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
}
_DIR = "jax_compilation_cache_dir"
_lock = threading.Lock()

# The events JAX records (jax/_src/dispatch.py, compiler.py): a time span for each trace,
# lowering and backend compilation (the latter also when the executable comes from the
# persistent cache), and one event per executable loaded from it.
_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_PREPARE_EVENTS = (_TRACE_EVENT, _LOWER_EVENT, _BACKEND_EVENT)


def default_compilation_cache_dir() -> Path:
    """``jax-compilation`` under the library's cache directory (``$RESNEXT_FLAX_CACHE``, else
    ``$XDG_CACHE_HOME/resnext_flax``, else ``~/.cache/resnext_flax``)."""
    return default_cache_dir() / SUBDIR


def command_line_cache_dir() -> Path | None:
    """The folder the command line keeps its programs in, as ``$RESNEXT_FLAX_COMPILATION_CACHE``
    says: None where it turns the cache off; a folder JAX was already given
    (``$JAX_COMPILATION_CACHE_DIR``) where it says nothing."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("0", "false", "no", "off"):
        return None
    if value and value.lower() not in ("1", "true", "yes", "on"):
        return Path(value).expanduser()
    import jax

    given = jax.config.jax_compilation_cache_dir
    return Path(given) if given else default_compilation_cache_dir()


def _prepare_dir(path: str | os.PathLike | None) -> Path:
    directory = Path(path).expanduser() if path is not None else default_compilation_cache_dir()
    directory = directory.absolute()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"the compilation cache folder {directory} is a file; pass "
                                 "another path or remove it")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        # Private: JAX runs what it loads from the cache, so others must not write there.
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"cannot create the compilation cache folder {directory} "
                                 f"({err.strerror}); pass a writable path") from err
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"the compilation cache folder {directory} is not writable; "
                              "pass a writable path")
    info = directory.stat()
    if info.st_mode & 0o022 or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
        # JAX runs the executables it loads: a folder others can write is a way in.
        raise PermissionError(f"the compilation cache folder {directory} can be written by "
                              f"others (mode {info.st_mode & 0o777:o}) or belongs to another "
                              "user; use a folder only you can write (chmod go-w)")
    return directory


def _current_settings() -> dict[str, Any]:
    import jax

    return {name: getattr(jax.config, name) for name in (_DIR, *_SETTINGS)}


def _apply(settings: dict[str, Any]) -> None:
    """Set JAX's cache settings; where they change what the cache is, start it afresh.

    JAX opens its cache once per process, on the first compilation after a folder is set,
    and keeps that folder and its on/off decision; a later change of folder would be ignored
    without ``reset_cache()``, which makes the next compilation open the cache again."""
    import jax
    from jax._src import compilation_cache

    if settings == _current_settings() and _cache_follows(settings[_DIR]):
        return
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def _cache_follows(directory: str | None) -> bool:
    """Whether the cache JAX opened (if any) is the one the settings name."""
    from jax._src import compilation_cache

    opened = compilation_cache._cache
    if opened is None:
        return not (compilation_cache._cache_checked and not compilation_cache._cache_used)
    return directory is not None and os.fspath(opened._path) == directory


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Keep every XLA program this process compiles on disk and reuse it in later processes.

    Sets JAX's persistent compilation cache (``jax_compilation_cache_dir``, with no minimum
    compile time or size, so every program of the library is kept) to `path`, by default
    :func:`default_compilation_cache_dir`. This is JAX's global configuration: it applies to
    every jitted function of the process, yours included. It takes effect for programs
    compiled after the call, whenever it is made; calling it again with the same folder
    changes nothing, with another folder switches to it. Returns the folder (created, private
    to the user). Only point it at a folder no one else can write: JAX runs what it loads.
    """
    with _lock:
        directory = _prepare_dir(path)
        _apply({_DIR: os.fspath(directory), **_SETTINGS})
    return directory


@contextlib.contextmanager
def compilation_cache(path: str | os.PathLike | None = None) -> Iterator[Path]:
    """:func:`enable_compilation_cache` for the block, then JAX's previous settings again (for
    a command run inside another program, e.g. ``resnext_flax.cli.main`` from a script)."""
    with _lock:
        previous = _current_settings()
    directory = enable_compilation_cache(path)
    try:
        yield directory
    finally:
        with _lock:
            _apply(previous)


@dataclasses.dataclass
class CompileReport:
    """What a :func:`report_compilation` block compiled: programs compiled by XLA, programs
    loaded from the persistent cache, and the seconds spent tracing, lowering, compiling or
    loading them (overlapping spans counted once)."""

    compiled: int = 0
    loaded: int = 0
    seconds: float = 0.0
    spans: list[tuple[float, float]] = dataclasses.field(default_factory=list, repr=False)

    def _add_span(self, start: float, end: float) -> None:
        self.spans.append((start, end))
        total, reach = 0.0, float("-inf")
        for begin, finish in sorted(self.spans):
            if finish > reach:
                total += finish - max(begin, reach)
                reach = finish
        self.seconds = total


def _cache_dir_in_use() -> str | None:
    """The persistent cache's folder where JAX would use one, else None."""
    import jax

    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir


def _say(message: str, file: TextIO | None) -> None:
    # tqdm.write keeps an active progress bar (evaluate, finetune) intact.
    from tqdm import tqdm

    tqdm.write(message, file=file if file is not None else sys.stderr)


@contextlib.contextmanager
def report_compilation(what: str, *, enabled: bool = True,
                       file: TextIO | None = None) -> Iterator[CompileReport]:
    """Say when the block starts compiling (``compiling resnet50 for 2x224x224, or loading it
    from the compilation cache...``) and afterwards how long it took and whether the programs
    were compiled or loaded from the cache; nothing where the block compiles nothing. Messages
    go to `file` (stderr by default), none without `enabled`. Yields the block's
    :class:`CompileReport`, filled in from JAX's monitoring events (also when not `enabled`).
    The events are JAX's, process-wide: compilations in other threads count too."""
    from jax import monitoring

    report = CompileReport()
    cache = _cache_dir_in_use()
    announced = False

    def on_start(event: str, value: float, **_: Any) -> None:
        nonlocal announced
        if event in _PREPARE_EVENTS and enabled and not announced:
            announced = True
            how = ", or loading it from the compilation cache" if cache else (
                " (the compilation cache is off)")
            _say(f"resnext-flax: compiling {what}{how}...", file)

    def on_span(event: str, start: float, end: float, **_: Any) -> None:
        if event in _PREPARE_EVENTS:
            report._add_span(start, end)
            report.compiled += event == _BACKEND_EVENT

    def on_event(event: str, **_: Any) -> None:
        report.loaded += event == _HIT_EVENT

    monitoring.register_scalar_listener(on_start)
    monitoring.register_event_time_span_listener(on_span)
    monitoring.register_event_listener(on_event)
    try:
        yield report
    finally:
        monitoring.unregister_scalar_listener(on_start)
        monitoring.unregister_event_time_span_listener(on_span)
        monitoring.unregister_event_listener(on_event)
        report.compiled -= report.loaded  # a cache hit is also reported as a backend compile
    if announced:
        _say(f"resnext-flax: {_summary(what, report, cache)}", file)


def _summary(what: str, report: CompileReport, cache: str | None) -> str:
    seconds = f"{report.seconds:.1f} s"
    if not report.compiled:
        if report.loaded:
            return f"{what} loaded from the compilation cache in {seconds}"
        return f"{what} traced in {seconds} (its programs were already compiled)"
    programs = f"{report.compiled} program{'s' * (report.compiled != 1)}"
    if report.loaded:
        programs += f", {report.loaded} more loaded from the cache"
    where = (f"kept in {cache} for next time" if cache else
             "the compilation cache is off: the next run compiles again")
    return f"compiled {what} in {seconds} ({programs}; {where})"
