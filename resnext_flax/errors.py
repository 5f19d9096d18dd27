"""The library's exceptions, one root, and the structured fixes its messages suggest.

Every error about what a user hands the library (a model name or weight set, a weight file or
checkpoint, an image folder) is a :class:`ResnextFlaxError`; a call's own argument of the
wrong type or range stays a plain ``TypeError``/``ValueError``, as in any Python library. The
subclasses say what went wrong, and also keep the built-in base (``ValueError``, ``OSError``,
``FileNotFoundError``) that says what kind of failure it is, so code written against the
standard exceptions catches them too. A message that names an option which would make the call
succeed carries it as a :class:`Fix` inside a :class:`Message`: the library's text spells it as
keyword arguments (``prefix='backbone.'``), and the command line renders the same fix as its
flags (``--prefix backbone.``) without parsing text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


class ResnextFlaxError(Exception):
    """The root of the errors about models, weights, checkpoints and data (see the module)."""


class UnknownModelError(ResnextFlaxError, ValueError):
    """A model name or weight set that the tables do not hold, or a weight set of another
    model; the message lists the known ones."""


class WeightsError(ResnextFlaxError, ValueError):
    """Weights that cannot be used as asked: an unreadable or malformed file, no single trunk
    in it, keys or shapes that do not fit the model, a failed checksum or verification,
    options that do not apply to them."""


class WeightsUnavailableError(ResnextFlaxError, OSError):
    """The weights are neither cached nor downloadable (offline, HTTP error, missing file)."""


class WeightFileNotFoundError(WeightsUnavailableError, FileNotFoundError):
    """No weight file at the path given (or no weight file in the folder given)."""


class DatasetError(ResnextFlaxError, ValueError):
    """An image folder or list file that cannot be used as asked: the message names the file
    or folder and what is wrong with it."""


class OutputPathError(ResnextFlaxError, ValueError):
    """Where a command or function would write cannot take its output: it is (or holds) one
    of its inputs, it is a folder where a file is written (or the reverse), or its parent
    folder is missing or not writable. Raised before any work is done."""


class TrainingError(ResnextFlaxError, ValueError):
    """A fine-tuning run that cannot go on as asked: its output directory holds a run with
    other settings or data, its loss became NaN or infinite, or the weights about to be
    written hold NaN or Inf."""


class ExportError(ResnextFlaxError, ValueError):
    """A model that cannot be exported as asked: a dtype or platform the artifact cannot
    hold, or an artifact whose outputs do not match the model's (nothing is written then)."""


@dataclasses.dataclass(frozen=True)
class Fix:
    """Options that would make a call succeed: ``(keyword, value)`` pairs of the loader's
    arguments. `aside`: written inside parentheses the message already opens."""

    options: tuple[tuple[str, Any], ...]
    aside: bool = False

    @classmethod
    def of(cls, *, aside: bool = False, **options: Any) -> Fix:
        return cls(tuple(options.items()), aside)

    def __str__(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options)


class Placeholder(str):
    """A fix's value that the user supplies, such as ``PATH``: written bare
    (``checkpoint=PATH``, ``--checkpoint PATH``), not as a literal to copy."""

    def __repr__(self) -> str:
        return str(self)


class Message(str):
    """A message whose parts may be :class:`Fix` objects: as a ``str`` it spells them as
    keyword arguments; :meth:`render` lets another layer spell them its own way."""

    parts: tuple[str | Fix, ...]

    def __new__(cls, *parts: str | Fix) -> Message:
        flat: list[str | Fix] = []
        for part in parts:
            flat.extend(part.parts if isinstance(part, Message) else [part])
        text = super().__new__(cls, "".join(map(str, flat)))
        text.parts = tuple(flat)
        return text

    def map_text(self, edit: Callable[[str], str]) -> Message:
        """The message with `edit` applied to its text parts (fixes kept)."""
        return Message(*(p if isinstance(p, Fix) else edit(p) for p in self.parts))

    def render(self, fix: Callable[[Fix], str]) -> str:
        """The text with each fix written by `fix`."""
        return "".join(fix(p) if isinstance(p, Fix) else p for p in self.parts)


def render(text: Any, fix: Callable[[Fix], str]) -> str:
    """`text` (a :class:`Message`, an exception carrying one, or anything else) as a string,
    with fixes written by `fix`."""
    if isinstance(text, BaseException):
        args = text.args
        if len(args) == 1 and isinstance(args[0], Message):
            return args[0].render(fix)
        return str(text)
    return text.render(fix) if isinstance(text, Message) else str(text)


def short_repr(value: Any, limit: int = 80) -> str:
    """`value`'s repr cut to about `limit` characters, for messages about a file's values (a
    hostile header's field may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def join(separator: str, items: Any) -> Message:
    """``separator.join(items)`` that keeps the fixes of :class:`Message` items."""
    parts: list[str | Fix] = []
    for i, item in enumerate(items):
        if i:
            parts.append(separator)
        parts.append(item)
    return Message(*parts)
