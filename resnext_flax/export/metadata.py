"""What an exported model says about itself: one record for both formats.

The StableHLO artifact carries it as ``record.json`` inside its zip; the ONNX file carries it
in its ``metadata_props`` (string values, JSON where a value is structured). Either
way a runtime without this library finds the class names, the preprocessing the weights
expect and the input it must feed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Sequence
from typing import Any

from resnext_flax.metadata import class_names, pretrained_cfg
from resnext_flax.models.variants import find_variant

#: Names and versions the record's layout: a reader checks it before trusting the fields.
FORMAT_VERSION = "resnext-flax-export/1"
#: The input's name in both formats (an ONNX graph input, the record's signature).
INPUT_NAME = "images"


def producer_version() -> str:
    """The installed resnext-flax's version ("unknown" from a source tree)."""
    try:
        return importlib.metadata.version("resnext-flax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def input_signature(shape: Sequence[int | str], *, layout: str = "NHWC") -> dict[str, Any]:
    """The input an artifact takes: `shape` with symbolic dimensions as names (``"batch"``),
    float32 images normalized as the preprocessing says, in `layout`."""
    return {"name": INPUT_NAME, "shape": [d if isinstance(d, int) else str(d) for d in shape],
            "dtype": "float32", "layout": layout,
            "values": "images transformed as 'preprocessing' says (resized, cropped, "
                      "normalized)"}


def output_signature(model: Any) -> dict[str, Any]:
    """The output: logits per class, or the pooled features of a headless model."""
    headless = not model.num_classes
    width = model.num_features if headless else model.num_classes
    return {"name": "features" if headless else "logits", "shape": ["batch", width],
            "dtype": "float32"}


def export_record(
    model: Any,
    *,
    format: str,
    input_shape: Sequence[int | str],
    layout: str = "NHWC",
    platforms: Sequence[str] | None = None,
    source: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The record of an exported `model` (JSON values): format and version, model name,
    class names and preprocessing where the model knows them (None where not: nothing is
    invented), input and output signatures, the platforms a StableHLO artifact was lowered
    for, and the file or name it was exported from."""
    cfg = pretrained_cfg(model)
    names = class_names(model)
    preprocessing = None if cfg is None or cfg.preprocessing is None else (
        cfg.preprocessing.to_json())
    record = {
        "format_version": FORMAT_VERSION,
        "format": format,
        "model": find_variant(model.spec),
        "weights": None if cfg is None else cfg.weights,
        "source": None if source is None else os.path.basename(
            os.path.normpath(os.fspath(source))),
        "num_classes": model.num_classes,
        "class_names": None if names is None else list(names),
        "preprocessing": preprocessing,
        "input": input_signature(input_shape, layout=layout),
        "output": output_signature(model),
        "producer": f"resnext-flax {producer_version()}",
    }
    if platforms is not None:
        record["platforms"] = list(platforms)
    return record


def metadata_props(record: dict[str, Any]) -> dict[str, str]:
    """`record` as string values (ONNX ``metadata_props``): strings as they are, everything
    else (lists, objects, numbers, null) as JSON."""
    return {key: value if isinstance(value, str) else json.dumps(value)
            for key, value in record.items()}
