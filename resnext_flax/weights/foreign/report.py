"""What a checkpoint holds and what a load takes from it: :class:`CheckpointReport`, the
answer of ``foreign.resolve`` (and of ``resnext-flax inspect``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from resnext_flax.errors import Message, join
from resnext_flax.models.variants import VARIANTS, find_variant
from resnext_flax.weights.files import WeightFileError
from resnext_flax.weights.foreign.names import KEY_STYLES
from resnext_flax.weights.foreign.survey import Candidate, Head, container_path
from resnext_flax.weights.torch_port import arch_phrase, compare_shapes, expected_shapes


class CheckpointLayoutError(WeightFileError):
    """No single trunk can be taken from a checkpoint (none, several, or not the one asked
    for); the message lists what was found and the option that picks one."""


@dataclasses.dataclass(frozen=True)
class CheckpointReport:
    """What a checkpoint holds and what a load takes from it (``resnext-flax inspect``).

    - `layout`: the project convention recognised (``"timm train.py checkpoint"``…).
    - `containers`: the object's top-level entries other than tensors (``"model"``,
      ``"optimizer"``, ``"epoch"``…).
    - `candidates`: every ResNet trunk found (in every container, under every prefix).
    - `chosen`: the one to load, or None with `error` saying why (loaders raise it).
    - `num_classes`: the model's class count; `fresh_head`: its head is newly initialized.
    - `state_dict`: what is loaded, in torchvision's names (trunk, plus the linear head if
      kept); `dropped`: the file's keys that are not loaded; `notes`: choices made.
    - `class_names`: from the file's metadata (transformers' ``id2label``), if any.
    """

    source: str
    layout: str
    containers: tuple[str, ...]
    candidates: tuple[Candidate, ...]
    chosen: Candidate | None
    error: Message | None = None
    num_classes: int | None = None
    fresh_head: bool = False
    dropped: tuple[str, ...] = ()
    notes: tuple[Message, ...] = ()
    class_names: tuple[str, ...] | None = None
    state_dict: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    model_name: str | None = None

    @property
    def architecture(self) -> str | None:
        return self.chosen.architecture if self.chosen else None

    @property
    def container(self) -> tuple[str, ...] | None:
        return self.chosen.container if self.chosen else None

    @property
    def prefix(self) -> str | None:
        return self.chosen.prefix if self.chosen else None

    @property
    def head(self) -> Head | None:
        return self.chosen.head if self.chosen else None

    @property
    def loaded_keys(self) -> tuple[str, ...]:
        """The file's own names of the loaded tensors."""
        names = self.chosen.original_keys if self.chosen else {}
        return tuple(names.get(k, k) for k in self.state_dict)

    @property
    def ema_present(self) -> bool:
        return any(c.ema for c in self.candidates)

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(sorted({str(v.dtype).replace("torch.", "") for v in
                             self.state_dict.values()}))

    @property
    def num_params(self) -> int:
        """Learnable parameters loaded (weights and biases; not BatchNorm statistics)."""
        total = 0
        for key, value in self.state_dict.items():
            if not key.endswith(("running_mean", "running_var")):
                n = 1
                for d in value.shape:
                    n *= int(d)
                total += n
        return total

    @property
    def problems(self) -> tuple[str, ...]:
        """Why the strict load of `state_dict` into the model (`model_name`, else the inferred
        architecture) would fail; empty if it fits."""
        chosen = self.chosen
        spec = VARIANTS.get(self.model_name or "") or (chosen.spec if chosen else None)
        if chosen is None or spec is None or not chosen.original_keys:
            return ()
        if find_variant(spec) is None:
            return (f"{spec} is not one of the architectures this library builds",)
        loaded = 0 if self.fresh_head else self.num_classes or 0
        got = {k: tuple(v.shape) for k, v in self.state_dict.items()}
        return compare_shapes(expected_shapes(spec, loaded), got, self.source).summary()

    def require(self) -> CheckpointReport:
        """The report itself, or the :class:`CheckpointLayoutError` that a load raises."""
        if self.error:
            raise CheckpointLayoutError(self.error)
        return self

    def format(self) -> Message:
        """A human-readable summary (what ``resnext-flax inspect`` prints); its fixes are
        spelled by whoever renders it."""
        lines = [f"file: {self.source}", f"layout: {self.layout}",
                 f"top-level containers and entries: {', '.join(self.containers) or 'none'}",
                 f"EMA weights: {'present' if self.ema_present else 'none'}",
                 f"trunks found ({len(self.candidates)}):"]
        lines += [f"  {c.label()}; {KEY_STYLES[c.key_style]}; head: {c.head}"
                  for c in self.candidates]
        c = self.chosen
        if c is None:
            error = Message(self.error).map_text(lambda t: t.replace("\n", "\n  "))
            lines.append(Message("load: not possible with these options:\n  ", error))
            return join("\n", lines)
        head = ("none (headless: the output is the pooled features)" if not self.num_classes
                else f"{'fresh ' if self.fresh_head else ''}linear, {self.num_classes} classes")
        lines += [
            f"container: {container_path(c.container)}",
            f"prefix: {c.prefix!r}",
            f"keys: {KEY_STYLES[c.key_style]}",
            f"architecture: {arch_phrase(c.spec)}",
            f"head in the file: {c.head}",
            f"model head: {head}",
            f"dtypes: {', '.join(self.dtypes)}",
            f"parameters: {self.num_params:,} loaded",
            f"would load: {len(self.state_dict)} tensors into "
            f"{self.model_name or arch_phrase(c.spec)}"
            + (f"; the strict load would fail: {'; '.join(self.problems)}"
               if self.problems else ", strictly: every key and shape fits"),
            f"dropped: {summarize_keys(self.dropped, self.loaded_keys) or 'nothing'}",
        ]
        if self.class_names:
            shown = ", ".join(self.class_names[:5])
            lines.append(f"class names: {shown}{', ...' if len(self.class_names) > 5 else ''}")
        lines += [Message("note: ", note) for note in self.notes]
        return join("\n", lines)


def summarize_keys(keys: tuple[str, ...], kept: tuple[str, ...] = (), limit: int = 8) -> str:
    """`keys` grouped under the shortest module path that holds none of the `kept` keys:
    ``"module.encoder_k.* (320 keys), module.queue"``."""
    kept_modules = {".".join(k.split(".")[:i]) + "." for k in kept
                    for i in range(1, k.count(".") + 1)}
    groups: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        modules = (".".join(parts[:i]) + "." for i in range(1, len(parts)))
        group = next((m + "*" for m in modules if m not in kept_modules), key)
        groups.setdefault(group, []).append(key)
    items = [f"{g} ({len(ks)} keys)" if len(ks) > 1 else ks[0] for g, ks in groups.items()]
    more = f", ... ({len(items) - limit} more groups)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
