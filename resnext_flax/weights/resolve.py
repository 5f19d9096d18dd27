"""What a torch-side weight object holds: which ResNet trunk to load, and a report of how.

The second step of every load (after ``weights.files`` read the file). Checkpoints come in many
shapes (see ``docs/checkpoints.md``): training-script containers (torchvision's reference
scripts, timm, PyTorch Lightning, MoCo), a trunk under any prefix (``backbone.``,
``module.encoder_q.``), ``nn.Sequential(*list(resnet.children())[:-1])`` numbering,
Hugging Face transformers' ResNet names, no head or an MLP head. :func:`resolve_checkpoint`
surveys every state dict in the object, finds every ResNet trunk in each, picks one by the
options (:class:`CheckpointOptions`) and returns a :class:`CheckpointReport`: the chosen
trunk renamed to torchvision's keys, what was dropped, and why. It never guesses between two
complete trunks: that is an error listing them and the option that picks one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from resnext_flax.models.variants import VARIANTS, ModelSpec, find_variant
from resnext_flax.weights.files import WeightFileError
from resnext_flax.weights.names import (
    IGNORED_SUFFIXES,
    KEY_STYLES,
    TRUNK_CHILDREN,
    arch_phrase,
    infer_spec,
    rename_sequential,
    rename_transformers,
    torchvision_shapes,
    trunk_prefixes,
)

#: Container keys that hold exponential-moving-average weights (torchvision's reference
#: scripts: ``model_ema``; timm: ``state_dict_ema``; others).
EMA_KEYS = ("model_ema", "state_dict_ema", "ema", "ema_state_dict", "ema_model")
_MAX_CONTAINER_DEPTH = 4


# ---- options and findings --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """How to pick weights from a checkpoint that holds more than one model; every loader
    (``load_model``, ``from_pretrained(checkpoint=...)``, the converter, ``inspect``) takes
    the same ones.

    - `prefix`: the key prefix of the trunk to load (``"module.encoder_k."``; ``""`` for
      none) when several prefixes hold a complete trunk.
    - `ema`: take the exponential-moving-average weights (``model_ema``, ``state_dict_ema``).
    - `key`: the container to take, dotted for nesting (``"state_dict_ema"``, ``"teacher"``).
    - `num_classes`: the head of the model: None keeps the file's linear head (or none); 0
      builds a headless model; N != the file's builds a freshly initialized N-class head.
    """

    prefix: str | None = None
    ema: bool = False
    key: str | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        n = self.num_classes
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ValueError(f"num_classes must be None or an int >= 0, got {n!r}")
        if self.prefix is not None and not isinstance(self.prefix, str):
            raise ValueError(f"prefix must be a string, got {self.prefix!r}")
        if self.prefix and not self.prefix.endswith("."):
            object.__setattr__(self, "prefix", self.prefix + ".")
        if self.key is not None and self.ema:
            raise ValueError("pass either key= or ema=True, not both")


@dataclasses.dataclass(frozen=True)
class Head:
    """The classifier found beside a trunk: ``"none"``, ``"linear"`` (`num_classes`),
    ``"mlp"`` (``fc.0``/``fc.2``…, never loaded) or ``"other"`` (unrecognized ``fc`` keys)."""

    kind: str
    num_classes: int = 0
    keys: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()

    def __str__(self) -> str:
        if self.kind == "none":
            return "none (a backbone without classifier)"
        if self.kind == "linear":
            return f"linear, {self.num_classes} classes"
        layers = ", ".join(f"{k} {tuple(s)}" for k, s in zip(self.keys, self.shapes, strict=True)
                           if k.endswith("weight"))
        return f"{'MLP' if self.kind == 'mlp' else 'unrecognized'} head ({layers})"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One ResNet trunk found in a checkpoint.

    `container`: the keys followed from the top to its state dict; `prefix`: the key prefix
    of its torchvision names (after renaming `key_style` keys); `missing` / `mismatched`:
    trunk keys of the inferred architecture it lacks or holds with another shape.
    """

    container: tuple[str, ...]
    prefix: str
    key_style: str
    spec: ModelSpec | None
    head: Head
    missing: tuple[str, ...]
    mismatched: tuple[str, ...]
    state_dict: dict[str, Any] = dataclasses.field(repr=False, compare=False)
    original_keys: dict[str, str] = dataclasses.field(repr=False, compare=False)

    @property
    def complete(self) -> bool:
        return self.spec is not None and not self.missing and not self.mismatched

    @property
    def ema(self) -> bool:
        return any(part in EMA_KEYS for part in self.container)

    @property
    def architecture(self) -> str | None:
        return find_variant(self.spec) if self.spec is not None else None

    def label(self) -> str:
        state = arch_phrase(self.spec)
        if not self.complete:
            absent = self.missing + self.mismatched
            state += f", incomplete: {len(absent)} trunk key(s) missing or mis-shaped " \
                     f"({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''})"
        return f"container {_path(self.container)}, prefix {self.prefix!r}: {state}"


def _path(container: tuple[str, ...]) -> str:
    return repr(".".join(container)) if container else "(top level)"


class CheckpointLayoutError(WeightFileError):
    """No single trunk can be taken from a checkpoint (none, several, or not the one asked
    for); the message lists what was found and the option that picks one."""


# ---- the survey --------------------------------------------------------------------------------


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _as_mapping(obj: Any) -> Any:
    """A pickled torch module (``torch.save(model)``, read with ``trust_pickle``) stands for
    its ``state_dict()``."""
    state_dict = getattr(obj, "state_dict", None)
    if not isinstance(obj, Mapping) and callable(state_dict):
        return state_dict()
    return obj


def _state_dicts(obj: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """Every mapping holding tensors under string keys, and its path of container keys."""
    obj = _as_mapping(obj)
    if not isinstance(obj, Mapping) or len(path) > _MAX_CONTAINER_DEPTH:
        return []
    found = []
    tensors = {str(k): v for k, v in obj.items() if _is_tensor(v)}
    if tensors:
        found.append((path, tensors))
    for key, value in obj.items():
        if not _is_tensor(value):
            found += _state_dicts(value, (*path, str(key)))
    return found


def _classify_head(sub: Mapping[str, Any]) -> Head:
    keys = tuple(sorted(k for k in sub if k.split(".", 1)[0] == "fc"))
    shapes = tuple(tuple(sub[k].shape) for k in keys)
    if not keys:
        return Head("none")
    weight = sub.get("fc.weight")
    if set(keys) <= {"fc.weight", "fc.bias"} and weight is not None and len(weight.shape) == 2:
        return Head("linear", int(weight.shape[0]), keys, shapes)
    if all(re.fullmatch(r"fc\.\d+\.(weight|bias)", k) for k in keys):
        return Head("mlp", 0, keys, shapes)
    return Head("other", 0, keys, shapes)


def _candidates(container: tuple[str, ...], tensors: dict[str, Any]) -> list[Candidate]:
    keys = list(tensors)
    styles = {}
    renames = rename_transformers(keys)
    styles.update({new: "transformers" for new in renames.values()})
    seq = rename_sequential([k for k in keys if k not in renames])
    styles.update({new: "sequential" for new in seq.values()})
    renames.update(seq)
    named = {renames.get(k, k): k for k in keys}
    found = []
    for prefix in trunk_prefixes(named):
        sub = {k[len(prefix):]: tensors[named[k]] for k in named if k.startswith(prefix)}
        originals = {k[len(prefix):]: named[k] for k in named if k.startswith(prefix)}
        sub = {k: v for k, v in sub.items()
               if k.split(".", 1)[0] in (*TRUNK_CHILDREN, "fc")}
        inferred = infer_spec(sub)
        spec = inferred[0] if inferred else None
        mismatched: tuple[str, ...] = ()
        if spec is not None:
            expected = torchvision_shapes(spec)
            missing = tuple(k for k in expected if k not in sub)
            mismatched = tuple(k for k in expected if k in sub
                               and tuple(sub[k].shape) != expected[k])
        else:  # too little to tell the architecture: name the absent parts
            missing = tuple(f"{part}.*" for part in TRUNK_CHILDREN
                            if not any(k.startswith(part + ".") for k in sub))
        style = styles.get(prefix + "conv1.weight", "torchvision")
        found.append(Candidate(container, prefix, style, spec, _classify_head(sub), missing,
                               mismatched, sub, {k: originals[k] for k in sub}))
    return found


# ---- the choice and the report -------------------------------------------------------------------


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
    error: str | None = None
    num_classes: int | None = None
    fresh_head: bool = False
    dropped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
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
            return (f"{spec} is not one of the ten architectures this library builds",)
        loaded = 0 if self.fresh_head else self.num_classes or 0
        expected = torchvision_shapes(spec, loaded)
        got = {k: tuple(v.shape) for k, v in self.state_dict.items()}
        found = [("missing", [k for k in expected if k not in got]),
                 ("unexpected", [k for k in got if k not in expected]),
                 ("mis-shaped", [k for k in got if k in expected and got[k] != expected[k]])]
        return tuple(f"{len(ks)} {what} ({', '.join(ks[:3])}{', ...' if len(ks) > 3 else ''})"
                     for what, ks in found if ks)

    def require(self) -> CheckpointReport:
        """The report itself, or the :class:`CheckpointLayoutError` that a load raises."""
        if self.error:
            raise CheckpointLayoutError(self.error)
        return self

    def format(self) -> str:
        """A human-readable summary (what ``resnext-flax inspect`` prints)."""
        lines = [f"file: {self.source}", f"layout: {self.layout}",
                 f"top-level containers and entries: {', '.join(self.containers) or 'none'}",
                 f"EMA weights: {'present' if self.ema_present else 'none'}",
                 f"trunks found ({len(self.candidates)}):"]
        lines += [f"  {c.label()}; {KEY_STYLES[c.key_style]}; head: {c.head}"
                  for c in self.candidates]
        c = self.chosen
        if c is None:
            lines.append("load: not possible with these options:\n  "
                         + self.error.replace("\n", "\n  "))
            return "\n".join(lines)
        head = ("none (headless: the output is the pooled features)" if not self.num_classes
                else f"{'fresh ' if self.fresh_head else ''}linear, {self.num_classes} classes")
        lines += [
            f"container: {_path(c.container)}",
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
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


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


def _layout(obj: Any, candidates: list[Candidate]) -> str:
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    keys = set(map(str, obj))
    if "pytorch-lightning_version" in keys:
        return "PyTorch Lightning checkpoint"
    if {"state_dict", "arch"} <= keys and any("encoder_q." in c.prefix for c in candidates):
        return "MoCo v1/v2 checkpoint"
    if {"state_dict", "arch", "version"} <= keys:
        return "timm train.py checkpoint"
    if {"model", "optimizer", "args"} <= keys:
        return "torchvision reference-script checkpoint"
    if any(c.container for c in candidates):
        return "training checkpoint (a state dict nested in a container)"
    if any(c.key_style == "transformers" for c in candidates):
        return "Hugging Face transformers ResNet state dict"
    return "state dict"


def _options_text(**options: Any) -> str:
    api = ", ".join(f"{k}={v!r}" for k, v in options.items())
    cli = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v or repr(v)}")
                   for k, v in options.items())
    return f"{api} ({cli})"


def _choose(candidates: list[Candidate], options: CheckpointOptions, name: str | None,
            notes: list[str]) -> tuple[Candidate | None, str | None]:
    """The candidate to load, or an error naming the candidates and the options."""
    def listing(cands: list[Candidate]) -> str:
        return "\n".join(f"  - {c.label()}" for c in cands)

    if not candidates:
        return None, "no ResNet trunk found (no keys ending in conv1.weight and " \
                     "layer1.0.conv1.weight under one prefix)"
    pool = candidates
    if options.key is not None:
        wanted = tuple(options.key.split(".")) if options.key else ()
        pool = [c for c in candidates if c.container == wanted]
        if not pool:
            return None, (f"no ResNet trunk in container {options.key!r}; trunks found:\n"
                          f"{listing(candidates)}")
    elif options.ema:
        pool = [c for c in candidates if c.ema]
        if not pool:
            return None, (f"no EMA weights (containers named {', '.join(EMA_KEYS)}); "
                          f"trunks found:\n{listing(candidates)}")
    elif any(c.ema for c in candidates):
        ema = ", ".join(sorted({_path(c.container) for c in candidates if c.ema}))
        if all(c.ema for c in candidates):
            notes.append(f"the file holds only EMA weights ({ema}): loaded")
        else:
            pool = [c for c in candidates if not c.ema]
            notes.append(f"EMA weights present in {ema}, not used; "
                         f"{_options_text(ema=True)} loads them")
    if options.prefix is not None:
        prefixed = [c for c in pool if c.prefix == options.prefix]
        if not prefixed:
            return None, (f"no ResNet trunk under prefix {options.prefix!r}; trunks found:\n"
                          f"{listing(pool)}")
        pool = prefixed
    complete = [c for c in pool if c.complete]
    if not complete:
        return None, ("no complete ResNet trunk; candidates:\n" + listing(pool))
    if len(complete) < len(pool):
        notes.append("incomplete trunks passed over: " + "; ".join(
            c.label() for c in pool if not c.complete))
    if name is not None and len(complete) > 1:
        named = [c for c in complete if c.spec == VARIANTS.get(name)]
        complete = named or complete
    if len(complete) > 1:
        query = _moco_query_encoder(complete)
        if query is not None:
            notes.append(f"MoCo layout: the query encoder {query.prefix!r} is loaded, as "
                         "MoCo's own linear evaluation does; "
                         f"{_options_text(prefix=query.prefix.replace('encoder_q', 'encoder_k'))}"
                         " loads the key encoder")
            return query, None
        fixes = []
        for c in complete:
            if len({x.container for x in complete}) > 1:
                fixes.append(_options_text(key=".".join(c.container)))
            else:
                fixes.append(_options_text(prefix=c.prefix))
        return None, ("several complete ResNet trunks; pick one:\n"
                      + "\n".join(f"  - {c.label()}: {fix}"
                                  for c, fix in zip(complete, fixes, strict=True)))
    return complete[0], None


def _moco_query_encoder(candidates: list[Candidate]) -> Candidate | None:
    by_prefix = {c.prefix: c for c in candidates}
    queries = [c for p, c in by_prefix.items() if p.endswith("encoder_q.")]
    if len(queries) == 1 and len(candidates) == 2 and (
            queries[0].prefix.replace("encoder_q.", "encoder_k.") in by_prefix):
        return queries[0]
    return None


def resolve_checkpoint(
    obj: Any,
    *,
    options: CheckpointOptions | None = None,
    name: str | None = None,
    source: str = "the object",
    config: Mapping[str, Any] | None = None,
) -> CheckpointReport:
    """Survey `obj` (a state dict, or a checkpoint nesting one or several) and choose the
    trunk to load; never raises for what it finds: see :meth:`CheckpointReport.require`.

    `name` (a torchvision model name) picks among complete trunks of different
    architectures; `config` is a transformers ``config.json`` read beside the file.
    """
    options = options or CheckpointOptions()
    obj = _as_mapping(obj)
    if not isinstance(obj, Mapping):
        return CheckpointReport(source, f"a {type(obj).__name__}", (), (), None,
                                f"{source} holds a {type(obj).__name__}, not a state dict")
    state_dicts = _state_dicts(obj)
    candidates = [c for path, tensors in state_dicts for c in _candidates(path, tensors)]
    containers = tuple(str(k) for k, v in obj.items() if not _is_tensor(v))
    layout = _layout(obj, candidates)
    notes: list[str] = []
    chosen, error = _choose(candidates, options, name, notes)
    if error:
        return CheckpointReport(source, layout, containers, tuple(candidates), None,
                                f"{source}: {error}", notes=tuple(notes))
    class_names = None
    if chosen.key_style == "transformers":
        error, class_names = _check_transformers_config(config, chosen, notes)
        if error:
            return CheckpointReport(source, layout, containers, tuple(candidates), None,
                                    f"{source}: {error}", notes=tuple(notes))
    if chosen.key_style == "sequential":
        notes.append("keys renamed from " + KEY_STYLES["sequential"])
    state_dict, num_classes, fresh = _take(chosen, options, notes)
    if class_names is not None and len(class_names) != num_classes:
        class_names = None
    used = {chosen.original_keys[k] for k in state_dict}
    dropped = tuple(k for path, tensors in state_dicts if path == chosen.container
                    for k in tensors if k not in used and not k.endswith(IGNORED_SUFFIXES))
    return CheckpointReport(source, layout, containers, tuple(candidates), chosen, None,
                            num_classes, fresh, dropped, tuple(notes), class_names, state_dict,
                            name)


def _take(chosen: Candidate, options: CheckpointOptions,
          notes: list[str]) -> tuple[dict[str, Any], int, bool]:
    """The chosen trunk's state dict (plus the file's linear head if kept), the model's class
    count, and whether its head is fresh."""
    sd = {k: v for k, v in chosen.state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
    head = chosen.head
    trunk = {k: v for k, v in sd.items() if k.split(".", 1)[0] != "fc"}
    wanted = options.num_classes
    if head.kind == "mlp":
        notes.append(f"non-linear {head} dropped: only a linear fc maps onto this model")
    if head.kind == "other":  # unrecognized fc keys: let the strict load list them
        return sd, wanted if wanted is not None else 0, bool(wanted)
    if head.kind == "linear" and wanted in (None, head.num_classes):
        return sd, head.num_classes, False
    if head.kind == "linear":
        notes.append(f"the file's linear head ({head.num_classes} classes) dropped: "
                     f"num_classes={wanted} asked for")
    if wanted:
        notes.append(f"fresh {wanted}-class head, initialized like torch's nn.Linear")
    return trunk, wanted or 0, bool(wanted)


def _check_transformers_config(
    config: Mapping[str, Any] | None, chosen: Candidate, notes: list[str]
) -> tuple[str | None, tuple[str, ...] | None]:
    """An error if a transformers ``config.json`` describes another network than
    torchvision's (its weights alone cannot tell), and its class names."""
    if config is None:
        notes.append("no config.json beside the file: assumed transformers' defaults "
                     "(downsample_in_bottleneck=false: stride in the 3x3 conv, torchvision's "
                     "V1.5), as in the microsoft/resnet-* configs")
        return None, None
    expected = {"model_type": "resnet", "num_channels": 3, "embedding_size": 64,
                "hidden_act": "relu", "downsample_in_first_stage": False,
                "downsample_in_bottleneck": False}
    wrong = [f"{k}={config.get(k, v)!r} (torchvision: {v!r})" for k, v in expected.items()
             if config.get(k, v) != v]
    spec = chosen.spec
    if spec is not None:
        layer_type = config.get("layer_type", "bottleneck")
        if layer_type != spec.block:
            wrong.append(f"layer_type={layer_type!r} but the weights hold {spec.block} blocks")
        depths = config.get("depths")
        if depths is not None and tuple(depths) != spec.layers:
            wrong.append(f"depths={list(depths)} but the weights hold {list(spec.layers)}")
    if wrong:
        return ("its config.json describes a network this library does not implement: "
                + "; ".join(wrong)), None
    labels = config.get("id2label")
    if not isinstance(labels, Mapping):
        return None, None
    try:
        names = tuple(str(labels[i] if i in labels else labels[str(i)])
                      for i in range(len(labels)))
    except KeyError:
        return None, None
    notes.append("class names from config.json's id2label")
    return None, names


def suggest_fix(state_dict: Mapping[str, Any], spec: ModelSpec | None,
                num_classes: int) -> str | None:
    """The option that would make `state_dict` load into a model of `spec` with
    `num_classes`, if one would (appended to strict-load errors)."""
    report = resolve_checkpoint(state_dict)
    chosen = report.chosen
    if chosen is None:
        complete = [c for c in report.candidates if c.complete]
        if len(complete) > 1:
            return ("several trunks in the file: load it with resnext_flax.load_model and "
                    + " or ".join(_options_text(prefix=c.prefix) for c in complete))
        return None
    if chosen.spec != spec and chosen.architecture:
        return f"the file holds {chosen.architecture}: ask for that model " \
               f"(name={chosen.architecture!r}, --model {chosen.architecture})"
    if chosen.prefix or chosen.key_style != "torchvision":
        return ("its trunk is under a prefix or other names: load it with "
                "resnext_flax.load_model, which finds it, or "
                + _options_text(prefix=chosen.prefix))
    head = chosen.head
    if head.kind == "linear" and head.num_classes != num_classes:
        return _options_text(num_classes=head.num_classes) + " keeps the file's head"
    if head.kind in ("none", "mlp") and num_classes:
        return (_options_text(num_classes=0) + " for a headless model, or load it with "
                "resnext_flax.load_model(..., num_classes=N) for a fresh head")
    return None
