"""Converted checkpoints: one ``.safetensors`` file per model, readable without torch.

Tensors are stored under their NNX paths (``layer1.0.conv2.kernel``, HWIO) and the
architecture in the file's metadata, so :func:`load_checkpoint` rebuilds the model from the file
alone. safetensors is a flat, memory-mappable, pickle-free format with a JSON header that any
framework reads; orbax is the tool for training state (see ``docs/training.md``).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnext_flax.errors import WeightsError
from resnext_flax.metadata import Preprocessing, PretrainedCfg, pretrained_cfg
from resnext_flax.models.folding import is_folded
from resnext_flax.models.resnet import ResNet, check_num_classes
from resnext_flax.models.variants import ModelSpec, find_variant
from resnext_flax.nn.init import abstract_model
from resnext_flax.weights.files import (
    CONVERTED_FORMAT,
    WeightFile,
    atomic_write,
    read_safetensors_metadata,
    read_weight_file,
)
from resnext_flax.weights.stored import write_tensors
from resnext_flax.weights.torch_port import compare_shapes, put_each

FORMAT = CONVERTED_FORMAT
FORMAT_VERSION = "1"
#: Header keys written by this library; user metadata may not override them.
RESERVED_KEYS = ("format", "format_version", "spec", "num_classes", "model", "classes",
                 "preprocessing", "class_names")
#: Header keys (written by the download cache and the converter) the record reads back.
_SOURCE_KEYS = ("source_url", "source")


class CheckpointError(WeightsError):
    """A converted checkpoint is malformed or does not match its own header."""


def _flat_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {
        ".".join(map(str, path)): var
        for path, var in nnx.iter_graph(model)
        if isinstance(var, nnx.Param | nnx.BatchStat)
    }


def save_checkpoint(
    model: ResNet,
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    classes: Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
) -> None:
    """Write the model's parameters and BN statistics to a ``.safetensors`` file, atomically.

    `metadata` adds string entries to the header (e.g. where the weights came from); the
    library's own keys (``RESERVED_KEYS``) cannot be overridden. `classes` (one name per
    output) and `preprocessing` (what the model was trained and validated with) are recorded
    for prediction (:func:`read_checkpoint_labels`); by default they, and the weight set's
    name, come from the model's ``pretrained_cfg``, so a loaded model saves what it carries.
    """
    if is_folded(model):
        raise TypeError(
            "save_checkpoint: this model's BatchNorms are folded into its convs "
            "(optimize_for_inference / fold_batchnorm), and a checkpoint holds torchvision's "
            "layout with the BatchNorm statistics: save the model it was made from, and fold "
            "again after loading")
    metadata = dict(metadata or {})
    clash = sorted(set(metadata) & set(RESERVED_KEYS))
    if clash:
        raise CheckpointError(f"metadata keys {clash} are reserved for the checkpoint format")
    bad = sorted(k for k, v in metadata.items() if not isinstance(k, str)
                 or not isinstance(v, str))
    if bad:
        raise CheckpointError(f"metadata must map strings to strings; not so for {bad}")
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": json.dumps(_spec_to_json(model.spec)),
        "num_classes": str(model.num_classes),
        "model": find_variant(model.spec) or "",
        **metadata,
    }
    cfg = pretrained_cfg(model)
    if cfg is not None and cfg.num_classes == model.num_classes:
        classes = cfg.class_names if classes is None else classes
        preprocessing = cfg.preprocessing if preprocessing is None else preprocessing
        if cfg.weights and "weights" not in metadata:
            header["weights"] = cfg.weights
    if cfg is not None and cfg.license and "license" not in metadata:
        header["license"] = cfg.license  # the trunk's terms, whatever its head
    if classes is not None:
        header["classes"] = json.dumps(_check_classes(classes, model.num_classes,
                                                     f"writing {os.fspath(path)!r}"))
    if preprocessing is not None:
        header["preprocessing"] = json.dumps(preprocessing.to_json())
    tensors = {key: var.get_value() for key, var in _flat_variables(model).items()}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write_tensors(f, tensors, header)

    atomic_write(path, write)


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata header of a converted checkpoint; ValueError if it is not one."""
    meta = read_safetensors_metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{os.fspath(path)!r} is not a resnext_flax checkpoint (no '{FORMAT}' metadata); "
            "torchvision files load with resnext_flax.read_state_dict"
        )
    return meta


def _check_classes(classes: Sequence[str], num_classes: int, where: str) -> list[str]:
    """One non-empty name per output. Names may repeat: published label lists do (ImageNet's
    original synset names hold "crane" twice), and they are labels, not keys."""
    names = list(classes)
    if isinstance(classes, str) or not all(isinstance(n, str) and n for n in names):
        raise CheckpointError(f"classes must be a sequence of non-empty strings, got {classes!r}")
    if len(names) != num_classes:
        raise CheckpointError(f"{len(names)} class names for a model with {num_classes} outputs "
                         f"({where})")
    return names


def read_checkpoint_labels(
    path: str | os.PathLike,
) -> tuple[tuple[str, ...] | None, Preprocessing | None]:
    """(class names, preprocessing) recorded in a converted checkpoint; None where absent (a
    torchvision conversion, or any file that is not a converted checkpoint, such as a
    ``.pth``); CheckpointError if they are malformed."""
    if not os.fspath(path).endswith(".safetensors"):
        return None, None
    meta = read_safetensors_metadata(path)
    if meta.get("format") != FORMAT:
        return None, None
    return header_labels(meta, os.fspath(path))


def header_labels(
    meta: Mapping[str, str], path: str
) -> tuple[tuple[str, ...] | None, Preprocessing | None]:
    """(class names, preprocessing) of a converted checkpoint's header. Class names are under
    ``classes``; files written by earlier converters have them under ``class_names``."""
    key = "classes" if "classes" in meta else "class_names"
    classes = _header_json(meta, key, path)
    preprocessing = _header_json(meta, "preprocessing", path)
    try:
        if classes is not None:
            classes = tuple(_check_classes(classes, int(meta.get("num_classes", -1)),
                                            f"reading {path!r}"))
    except (TypeError, ValueError) as err:
        raise _header_error(path, key, str(err)) from None
    try:
        if preprocessing is not None:
            preprocessing = Preprocessing.from_json(preprocessing)
    except (TypeError, ValueError) as err:
        raise _header_error(path, "preprocessing", str(err)) from None
    return classes, preprocessing


def _header_error(path: str, field: str, why: str) -> CheckpointError:
    return CheckpointError(f"{path!r}: malformed converted-checkpoint header, "
                           f"field {field!r}: {why}")


def _header_json(meta: Mapping[str, str], key: str, path: str) -> Any:
    """A header field's JSON value (None if absent); nesting too deep for the parser is
    malformed like any other bad JSON."""
    if key not in meta:
        return None
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as err:
        raise _header_error(path, key, f"not JSON ({err})") from None
    except RecursionError:
        raise _header_error(path, key, "JSON nested too deeply") from None


def load_checkpoint(
    path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = jnp.float32
) -> ResNet:
    """Rebuild a model from a converted checkpoint (no torch, no random initialization).

    Returns the model in eval mode. Every stored tensor must match the architecture recorded in
    the file, key by key and shape by shape.
    """
    weight_file = read_weight_file(path)
    if weight_file.kind != "converted":
        read_checkpoint_metadata(path)  # raises the "not a resnext_flax checkpoint" error
    return model_from_converted(weight_file, dtype=dtype, param_dtype=param_dtype)


def model_from_converted(
    weight_file: WeightFile, *, dtype: Any = None, param_dtype: Any = jnp.float32
) -> ResNet:
    """The model a converted checkpoint (read by ``read_weight_file``) describes, filled."""
    path, tensors = weight_file.path, weight_file.content
    spec, num_classes = check_converted(weight_file)
    model = abstract_model(
        lambda rngs: ResNet(spec, num_classes=num_classes, dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)
    )
    variables = _flat_variables(model)
    classes, preprocessing = header_labels(weight_file.metadata, path)

    def cast() -> Iterator[tuple[str, np.ndarray]]:
        # Cast on the host, one tensor at a time as it is read (``weights.stored``): a cast
        # on the device compiles a program per shape. Finiteness is checked after the cast:
        # float64 values beyond float32's range become Inf.
        for key, var in variables.items():
            with np.errstate(over="ignore"):  # overflow is reported by put_each, by key
                yield key, np.asarray(tensors[key], dtype=var.get_value().dtype)

    values = put_each(cast(), repr(path))
    for var, value in zip(variables.values(), values, strict=True):
        var.set_value(value)
    model.eval()
    meta = weight_file.metadata
    model.pretrained_cfg = PretrainedCfg(
        architecture=find_variant(spec), spec=spec, num_classes=num_classes,
        weights=meta.get("weights") or None,
        source=next((meta[k] for k in _SOURCE_KEYS if meta.get(k)), path),
        sha256=meta.get("source_sha256") or None, class_names=classes,
        preprocessing=preprocessing, license=meta.get("license") or None)
    return model


def check_converted(weight_file: WeightFile) -> tuple[ModelSpec, int]:
    """The architecture and class count of a converted checkpoint (read by
    ``read_weight_file``), after every check a load makes short of building the model: the
    header (architecture within ``models.variants``' limits, ``num_classes`` up to
    ``MAX_CLASSES``, class names, preprocessing), and every tensor's key, shape and floating
    dtype against that architecture. CheckpointError naming the file and the field otherwise.
    ``resnext-flax inspect`` runs it too, so it fails exactly where a load would."""
    path, tensors = weight_file.path, weight_file.content
    spec, num_classes = _architecture(weight_file.metadata, tensors, path)
    expected = _converted_shapes(spec, num_classes)
    report = compare_shapes(expected, {k: tuple(v.shape) for k, v in tensors.items()},
                            f"its header records {spec} with num_classes={num_classes}")
    if not report.ok:
        raise CheckpointError(report.format(repr(path)))
    bad = sorted(k for k in expected if not jnp.issubdtype(tensors[k].dtype, jnp.floating))
    if bad:
        raise CheckpointError(f"{path!r}: tensors must be floating point; not so for "
                              + ", ".join(f"{k} ({tensors[k].dtype})" for k in bad))
    header_labels(weight_file.metadata, path)
    return spec, num_classes


@functools.lru_cache(maxsize=16)
def _converted_shapes(spec: ModelSpec, num_classes: int) -> Mapping[str, tuple[int, ...]]:
    """The key -> shape table a converted checkpoint of `spec` holds (NNX paths), read off an
    abstract model (nothing is allocated)."""
    model = abstract_model(lambda rngs: ResNet(spec, num_classes=num_classes, rngs=rngs))
    return MappingProxyType({k: tuple(v.get_value().shape)
                             for k, v in _flat_variables(model).items()})


def _architecture(
    meta: Mapping[str, str], tensors: Mapping[str, Any], path: str
) -> tuple[ModelSpec, int]:
    """The header's architecture, validated against the limits of ``models.variants``
    (``MAX_BLOCKS_PER_STAGE``, ``MAX_BLOCK_WIDTH``) and ``MAX_CLASSES``, and against the
    number of tensors, before anything is built (a header claiming thousands of blocks must not
    make the loader build them)."""
    if "spec" not in meta:
        raise _header_error(path, "spec", "missing")
    data = _header_json(meta, "spec", path)
    if not isinstance(data, dict):
        raise _header_error(path, "spec", f"expected a JSON object, got {type(data).__name__}")
    fields = {"block", "layers", "groups", "width_per_group"}
    unknown, absent = sorted(set(data) - fields), sorted(fields - set(data))
    if unknown or absent:
        raise _header_error(path, "spec", f"expected the fields {sorted(fields)}; unknown "
                                          f"{unknown[:10]}, missing {absent}")
    try:
        layers = data["layers"]
        spec = ModelSpec(data["block"], tuple(layers) if isinstance(layers, list) else layers,
                         data["groups"], data["width_per_group"])
    except (TypeError, ValueError) as err:
        raise _header_error(path, "spec", str(err)) from None
    raw = meta.get("num_classes", "")
    if not re.fullmatch(r"\d{1,20}", raw):
        raise _header_error(path, "num_classes",
                            f"expected a non-negative integer, got {raw[:40]!r}")
    try:
        check_num_classes(int(raw))
    except ValueError as err:
        raise _header_error(path, "num_classes", str(err)) from None
    if sum(spec.layers) > len(tensors):  # every block holds tensors: checked before building
        raise _header_error(path, "spec", f"records {sum(spec.layers)} blocks, but the file "
                                          f"holds only {len(tensors)} tensors")
    return spec, int(raw)


def _spec_to_json(spec: ModelSpec) -> dict[str, Any]:
    return {"block": spec.block, "layers": list(spec.layers), "groups": spec.groups,
            "width_per_group": spec.width_per_group}
