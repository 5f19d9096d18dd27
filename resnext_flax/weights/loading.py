"""From a weight file (or an in-memory state dict) to a filled model, one way:

read it (``files``) -> resolve what it holds (``foreign``, for files of other projects) -> map
the keys (``torch_port``) -> build and fill the model, and attach the record of what it was
loaded with (``model.pretrained_cfg``). ``from_pretrained(..., checkpoint=...)``, the
converter, the download cache and ``resnext-flax inspect`` all go through
:func:`load_model_with_report` or :func:`inspect_checkpoint`, with the same options.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from flax import nnx

from resnext_flax.errors import Message, WeightsError
from resnext_flax.metadata import PretrainedCfg
from resnext_flax.models.resnet import ResNet
from resnext_flax.models.variants import VARIANTS, ModelSpec, find_variant, get_spec
from resnext_flax.nn.init import abstract_model
from resnext_flax.weights.checkpoint import (
    check_converted,
    header_labels,
    model_from_converted,
)
from resnext_flax.weights.files import WeightFile, WeightFileError, read_weight_file
from resnext_flax.weights.foreign.report import CheckpointLayoutError, CheckpointReport
from resnext_flax.weights.foreign.resolve import resolve_checkpoint, suggest_fix
from resnext_flax.weights.foreign.survey import Candidate, CheckpointOptions, Head
from resnext_flax.weights.torch_port import (
    StateDictMismatchError,
    StateDictMismatchWarning,
    compare_state_dict,
    from_torch_layout,
    model_name,
    normalize_state_dict,
    put_each,
    to_numpy,
    torch_variables,
)

#: A path, a file already read, or an in-memory state dict or container.
Source = str | os.PathLike | WeightFile | Mapping[str, Any]
#: The `layout` of a :class:`CheckpointReport` on a converted checkpoint of this library.
CONVERTED_LAYOUT = "resnext_flax converted checkpoint"


def _options(prefix: str | None, ema: bool, key: str | None,
             num_classes: int | None) -> CheckpointOptions:
    return CheckpointOptions(prefix=prefix, ema=ema, key=key, num_classes=num_classes)


def inspect_checkpoint(
    source: Source,
    name: str | None = None,
    *,
    prefix: str | None = None,
    ema: bool = False,
    key: str | None = None,
    num_classes: int | None = None,
    trust_pickle: bool = False,
) -> CheckpointReport:
    """What a checkpoint file (or in-memory object) holds and what a load with these options
    takes from it, without building a model: container, prefixes, architecture, head, dtypes,
    parameter count, EMA, loaded and dropped keys. ``print(report.format())`` shows it; a
    load raises ``report.error`` if set. Options: see :func:`load_model`."""
    options = _options(prefix, ema, key, num_classes)
    if isinstance(source, Mapping):
        return resolve_checkpoint(source, options=options, name=name, source="the state dict")
    weight_file = _read(source, trust_pickle)
    if weight_file.kind == "converted":
        return _converted_report(weight_file, options, name)
    return resolve_checkpoint(weight_file.content, options=options, name=name,
                              source=repr(weight_file.path), config=weight_file.config)


def _read(source: str | os.PathLike | WeightFile, trust_pickle: bool) -> WeightFile:
    if isinstance(source, WeightFile):
        return source
    return read_weight_file(source, trust_pickle=trust_pickle)


def _converted_report(weight_file: WeightFile, options: CheckpointOptions,
                      name: str | None) -> CheckpointReport:
    """A converted checkpoint holds one model under NNX names; only `num_classes` applies.
    The file is checked as a load checks it (``check_converted``); where that fails, the
    report's `error` says why."""
    source = repr(weight_file.path)
    if options.prefix is not None or options.ema or options.key is not None:
        raise WeightsError(f"{source} is a converted resnext_flax checkpoint holding one model; "
                           "prefix, ema and key apply to PyTorch files")
    meta = weight_file.metadata
    try:
        spec, stored = check_converted(weight_file)
        _check_name(weight_file.path, spec, name)
    except WeightsError as err:
        return CheckpointReport(source, CONVERTED_LAYOUT, (), (), None, Message(str(err)))
    head = Head("linear", stored) if stored else Head("none")
    chosen = Candidate((), "", "torchvision", spec, head, (), (), dict(weight_file.content), {})
    wanted = stored if options.num_classes is None else options.num_classes
    names = header_labels(meta, weight_file.path)[0] if wanted == stored else None
    return CheckpointReport(source, CONVERTED_LAYOUT, (), (chosen,), chosen,
                            num_classes=wanted, fresh_head=wanted != stored and wanted > 0,
                            class_names=names, state_dict=dict(weight_file.content))


def load_model_with_report(
    source: Source,
    name: str | None = None,
    *,
    dtype: Any = None,
    prefix: str | None = None,
    ema: bool = False,
    key: str | None = None,
    num_classes: int | None = None,
    trust_pickle: bool = False,
) -> tuple[ResNet, CheckpointReport]:
    """:func:`load_model`, also returning the :class:`CheckpointReport` of what was taken."""
    options = _options(prefix, ema, key, num_classes)
    if not isinstance(source, Mapping):
        weight_file = _read(source, trust_pickle)
        if weight_file.kind == "converted":
            return _load_converted(weight_file, name, options, dtype)
        report = resolve_checkpoint(weight_file.content, options=options, name=name,
                                    source=repr(weight_file.path), config=weight_file.config)
        return _build(report.require(), name, dtype, weight_file.path), report
    report = resolve_checkpoint(source, options=options, name=name, source="the state dict")
    return _build(report.require(), name, dtype, None), report


def _load_converted(weight_file: WeightFile, name: str | None, options: CheckpointOptions,
                    dtype: Any) -> tuple[ResNet, CheckpointReport]:
    spec, _ = check_converted(weight_file)  # the file's own errors, before any report
    _check_name(weight_file.path, spec, name)
    report = _converted_report(weight_file, options, name)
    model = model_from_converted(weight_file, dtype=dtype)
    if report.num_classes != model.num_classes:
        model.reset_classifier(report.num_classes)  # the record follows (with_head)
    return model, report


def _check_name(path: str, spec: ModelSpec, name: str | None) -> None:
    """A WeightsError unless a converted checkpoint of `spec` is the model `name` asked for."""
    held = find_variant(spec)
    if name is not None and held != name:
        raise WeightsError(f"{path!r} holds a {held or spec} checkpoint, not {name}")


def _build(report: CheckpointReport, name: str | None, dtype: Any, path: str | None) -> ResNet:
    """The model of the report's architecture (or `name`'s: the strict load then names the
    difference), filled strictly, in eval mode."""
    chosen = report.chosen
    if name is None:
        name = chosen.architecture
        if name is None:
            raise CheckpointLayoutError(
                f"{report.source}: its trunk is {chosen.spec}, which is not one of the "
                f"architectures this library builds ({', '.join(VARIANTS)})")
    spec = get_spec(name)
    loaded_classes = 0 if report.fresh_head else report.num_classes
    model = abstract_model(lambda rngs: ResNet(spec, num_classes=loaded_classes, dtype=dtype,
                                               rngs=rngs))
    try:
        load_torch_state_dict(model, report.state_dict, strict=True)
    except StateDictMismatchError as err:  # name the file
        raise StateDictMismatchError(err.report, f"{name} (from {report.source})") from None
    if report.fresh_head:
        model.reset_classifier(report.num_classes)
    model.eval()
    model.pretrained_cfg = PretrainedCfg(
        architecture=name, spec=spec, num_classes=model.num_classes,
        source=path,
        class_names=None if report.fresh_head else report.class_names,
        dropped=report.dropped, notes=tuple(str(n) for n in report.notes))
    return model


def load_model(
    source: Source,
    name: str | None = None,
    *,
    dtype: Any = None,
    prefix: str | None = None,
    ema: bool = False,
    key: str | None = None,
    num_classes: int | None = None,
    trust_pickle: bool = False,
) -> ResNet:
    """A model (eval mode) from a checkpoint as it comes (see ``docs/checkpoints.md``): a
    ``.pth``/``.bin``/``.ckpt``/``.safetensors`` file, a Hugging Face model folder, a
    converted checkpoint, or an in-memory state dict or container; loaded strictly.

    **Arguments:**
    - `name`: the model name; checked against what the file holds (inferred if omitted).
    - `prefix`, `ema`, `key`: pick one trunk where the file holds several
      (see :class:`~resnext_flax.weights.foreign.survey.CheckpointOptions`).
    - `num_classes`: None keeps the file's linear head (or none: a headless model); 0 builds a
      headless model (output = pooled features); N builds a fresh N-class head unless the
      file's head has N classes.
    - `trust_pickle`: unpickle globals outside the allow-list; runs code from the file.
    - `dtype`: compute dtype; parameters stay float32.
    """
    return load_model_with_report(source, name, dtype=dtype, prefix=prefix, ema=ema, key=key,
                                  num_classes=num_classes, trust_pickle=trust_pickle)[0]


def read_state_dict(
    path: str | os.PathLike,
    *,
    prefix: str | None = None,
    ema: bool = False,
    key: str | None = None,
    num_classes: int | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """The trunk (and linear head, if kept) a checkpoint file holds, as a torchvision-keyed
    dict of numpy arrays: resolved as :func:`load_model` does, with the same options.
    ``.safetensors`` needs no torch; ``num_batches_tracked`` is dropped."""
    report = inspect_checkpoint(path, prefix=prefix, ema=ema, key=key, num_classes=num_classes,
                                trust_pickle=trust_pickle)
    if report.layout == CONVERTED_LAYOUT:
        raise WeightFileError(
            f"{report.source} is a converted resnext_flax checkpoint, not a torchvision "
            "state dict: load it with resnext_flax.load_checkpoint(path)")
    report.require()
    try:
        return {k: to_numpy(k, v) for k, v in report.state_dict.items()}
    except ValueError as err:
        raise WeightFileError(f"{report.source}: {err}") from None


def load_torch_state_dict(
    model: nnx.Module, state_dict: Mapping[str, Any], *, strict: bool = True
) -> nnx.Module:
    """Pour a torchvision state dict into `model` in place and return it.

    Values may be torch tensors or numpy arrays of any floating dtype; they are cast to the
    dtype of the model's variables. ``module.``/``_orig_mod.`` prefixes are stripped and
    ``num_batches_tracked`` dropped. Every key, shape and dtype is checked before anything is
    written, so a failed load leaves the model as it was. With ``strict=True`` any missing,
    unexpected or mis-shaped key raises one :class:`StateDictMismatchError` listing them all,
    ending with the option that would make it load where one would; with ``strict=False`` the
    fitting keys load and the rest are reported as a :class:`StateDictMismatchWarning`. A
    trunk under another prefix, in a container or with other names is for
    :func:`load_model`, which finds it.
    """
    report = compare_state_dict(model, state_dict)
    if not report.ok:
        if strict:
            fix = suggest_fix(state_dict, getattr(model, "spec", None),
                              getattr(model, "num_classes", 0))
            raise StateDictMismatchError(dataclasses.replace(report, fix=fix), model_name(model))
        warnings.warn(report.format(model_name(model)), StateDictMismatchWarning, stacklevel=2)
    sd = normalize_state_dict(state_dict)
    skip = {k for k, _, _ in report.mismatched} | {k for k, _ in report.wrong_dtype}
    targets = [(key, leaf, var) for key, (leaf, var) in torch_variables(model).items()
               if key in sd and key not in skip]

    def cast() -> Iterator[tuple[str, np.ndarray]]:
        # Relayout and cast on the host, into a copy (the device array must not alias the
        # torch tensor's memory, which torch could later change in place), one tensor at a
        # time (a file's tensors are read here, as asked for: ``weights.stored``); on the
        # device each would compile a program per shape. Finiteness is checked after the
        # cast: float64 values beyond float32's range become Inf.
        for key, leaf, var in targets:
            with np.errstate(over="ignore"):  # overflow is reported by put_each, by key
                yield key, np.array(from_torch_layout(leaf, to_numpy(key, sd[key])),
                                    dtype=var.get_value().dtype, order="C")

    values = put_each(cast(), "the state dict")  # every tensor read before any write
    for (_, _, var), value in zip(targets, values, strict=True):
        var.set_value(value)
    if isinstance(model, ResNet):
        # The weights are the state dict's now: a record of earlier ones would mislabel them.
        model.pretrained_cfg = PretrainedCfg(
            architecture=find_variant(model.spec), spec=model.spec,
            num_classes=model.num_classes)
    return model
