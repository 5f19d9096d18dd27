"""Which trunk to take from a foreign checkpoint, and why: :func:`resolve_checkpoint`.

The second step of every load of a file that is not a converted checkpoint (after
``weights.files`` read it): the survey (``foreign.survey``) finds every trunk, the options
(:class:`~resnext_flax.weights.foreign.survey.CheckpointOptions`) pick one, and the answer is a
:class:`~resnext_flax.weights.foreign.report.CheckpointReport`: the chosen trunk renamed to
torchvision's keys, what was dropped, and why. It never guesses between two complete trunks:
that is an error listing them and the option (a :class:`~resnext_flax.errors.Fix`) that picks
one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from resnext_flax.errors import Fix, Message, join, short_repr
from resnext_flax.models.variants import VARIANTS, ModelSpec
from resnext_flax.weights.foreign.names import KEY_STYLES
from resnext_flax.weights.foreign.report import CheckpointReport
from resnext_flax.weights.foreign.survey import (
    EMA_KEYS,
    Candidate,
    CheckpointOptions,
    as_mapping,
    candidates,
    container_path,
    is_tensor,
    state_dicts,
)
from resnext_flax.weights.torch_port import IGNORED_SUFFIXES


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


def _choose(candidates: list[Candidate], options: CheckpointOptions, name: str | None,
            notes: list[str]) -> tuple[Candidate | None, Message | None]:
    """The candidate to load, or an error naming the candidates and the options."""
    def listing(cands: list[Candidate]) -> str:
        return "\n".join(f"  - {c.label()}" for c in cands)

    if not candidates:
        return None, Message("no ResNet trunk found (no keys ending in conv1.weight and "
                             "layer1.0.conv1.weight under one prefix)")
    pool = candidates
    if options.key is not None:
        wanted = tuple(options.key.split(".")) if options.key else ()
        pool = [c for c in candidates if c.container == wanted]
        if not pool:
            return None, Message(f"no ResNet trunk in container {options.key!r}; trunks "
                                 f"found:\n{listing(candidates)}")
    elif options.ema:
        pool = [c for c in candidates if c.ema]
        if not pool:
            return None, Message(f"no EMA weights (containers named {', '.join(EMA_KEYS)}); "
                                 f"trunks found:\n{listing(candidates)}")
    elif any(c.ema for c in candidates):
        ema = ", ".join(sorted({container_path(c.container) for c in candidates if c.ema}))
        if all(c.ema for c in candidates):
            notes.append(Message(f"the file holds only EMA weights ({ema}): loaded"))
        else:
            pool = [c for c in candidates if not c.ema]
            notes.append(Message(f"EMA weights present in {ema}, not used; ",
                                 Fix.of(ema=True), " loads them"))
    if options.prefix is not None:
        prefixed = [c for c in pool if c.prefix == options.prefix]
        if not prefixed:
            return None, Message(f"no ResNet trunk under prefix {options.prefix!r}; trunks "
                                 f"found:\n{listing(pool)}")
        pool = prefixed
    complete = [c for c in pool if c.complete]
    if not complete:
        return None, Message("no complete ResNet trunk; candidates:\n" + listing(pool))
    if len(complete) < len(pool):
        notes.append(Message("incomplete trunks passed over: " + "; ".join(
            c.label() for c in pool if not c.complete)))
    if name is not None and len(complete) > 1:
        named = [c for c in complete if c.spec == VARIANTS.get(name)]
        complete = named or complete
    if len(complete) > 1:
        query = _moco_query_encoder(complete)
        if query is not None:
            key_encoder = query.prefix.replace("encoder_q", "encoder_k")
            notes.append(Message(f"MoCo layout: the query encoder {query.prefix!r} is loaded, "
                                 "as MoCo's own linear evaluation does; ",
                                 Fix.of(prefix=key_encoder), " loads the key encoder"))
            return query, None
        by_container = len({x.container for x in complete}) > 1
        fixes = [Fix.of(key=".".join(c.container)) if by_container else Fix.of(prefix=c.prefix)
                 for c in complete]
        return None, Message("several complete ResNet trunks; pick one:\n", join("\n", (
            Message(f"  - {c.label()}: ", fix) for c, fix in zip(complete, fixes, strict=True))))
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
    obj = as_mapping(obj)
    if not isinstance(obj, Mapping):
        return CheckpointReport(source, f"a {type(obj).__name__}", (), (), None,
                                Message(f"{source} holds a {type(obj).__name__}, not a state "
                                        "dict"))
    found = state_dicts(obj)
    trunks = [c for path, tensors in found for c in candidates(path, tensors)]
    containers = tuple(str(k) for k, v in obj.items() if not is_tensor(v))
    layout = _layout(obj, trunks)
    notes: list[str] = []
    chosen, error = _choose(trunks, options, name, notes)
    if error:
        return CheckpointReport(source, layout, containers, tuple(trunks), None,
                                Message(f"{source}: ", error), notes=tuple(notes))
    class_names = None
    if chosen.key_style == "transformers":
        error, class_names = _check_transformers_config(config, chosen, notes)
        if error:
            return CheckpointReport(source, layout, containers, tuple(trunks), None,
                                    Message(f"{source}: ", error), notes=tuple(notes))
    if chosen.key_style == "sequential":
        notes.append(Message("keys renamed from " + KEY_STYLES["sequential"]))
    state_dict, num_classes, fresh = _take(chosen, options, notes)
    if class_names is not None and len(class_names) != num_classes:
        class_names = None
    used = {chosen.original_keys[k] for k in state_dict}
    dropped = tuple(k for path, tensors in found if path == chosen.container
                    for k in tensors if k not in used and not k.endswith(IGNORED_SUFFIXES))
    return CheckpointReport(source, layout, containers, tuple(trunks), chosen, None,
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
    wrong = [f"{k}={short_repr(config.get(k, v))} (torchvision: {v!r})"
             for k, v in expected.items() if config.get(k, v) != v]
    depths = config.get("depths")
    if depths is not None and not (isinstance(depths, list) and all(
            isinstance(n, int) and not isinstance(n, bool) for n in depths)):
        return (f"its config.json field 'depths' must be a list of block counts, got "
                f"{short_repr(depths)}"), None
    spec = chosen.spec
    if spec is not None:
        layer_type = config.get("layer_type", "bottleneck")
        if layer_type != spec.block:
            wrong.append(f"layer_type={short_repr(layer_type)} but the weights hold "
                         f"{spec.block} blocks")
        if depths is not None and tuple(depths) != spec.layers:
            wrong.append(f"depths={short_repr(depths)} but the weights hold "
                         f"{list(spec.layers)}")
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
                num_classes: int) -> Message | None:
    """The option that would make `state_dict` load into a model of `spec` with
    `num_classes`, if one would (appended to strict-load errors)."""
    report = resolve_checkpoint(state_dict)
    chosen = report.chosen
    if chosen is None:
        complete = [c for c in report.candidates if c.complete]
        if len(complete) > 1:
            return Message("several trunks in the file: load it with resnext_flax.load_model "
                           "and ", join(" or ", (Fix.of(prefix=c.prefix) for c in complete)))
        return None
    if chosen.spec != spec and chosen.architecture:
        return Message(f"the file holds {chosen.architecture}: ask for that model (",
                       Fix.of(name=chosen.architecture, aside=True), ")")
    if chosen.prefix or chosen.key_style != "torchvision":
        return Message("its trunk is under a prefix or other names: load it with "
                       "resnext_flax.load_model, which finds it, or ", Fix.of(prefix=chosen.prefix))
    head = chosen.head
    if head.kind == "linear" and head.num_classes != num_classes:
        return Message(Fix.of(num_classes=head.num_classes), " keeps the file's head")
    if head.kind in ("none", "mlp") and num_classes:
        return Message(Fix.of(num_classes=0), " for a headless model, or load it with "
                       "resnext_flax.load_model(..., num_classes=N) for a fresh head")
    return None
