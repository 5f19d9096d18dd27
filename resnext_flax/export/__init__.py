"""Export a model for deployment without this library: StableHLO (``jax.export``) or ONNX.

:func:`export` takes any model the library builds or loads (a model object, a variant name
with its weights, a weight file or converted checkpoint), folds its BatchNorms, writes the
artifact atomically, and first checks it: the artifact is run on a probe batch and its
outputs compared with the model's (``docs/deploy.md``). Nothing here imports JAX at module
level, so the command line checks its output path before any work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from resnext_flax.errors import ExportError, Fix, Message, Placeholder
from resnext_flax.export.metadata import export_record, input_signature, metadata_props
from resnext_flax.export.sources import (
    check_float32,
    load_source,
    source_files,
    source_label,
)
from resnext_flax.export.verify import (
    CHECKED_BATCHES,
    relative_error,
    verification_devices,
    verify_artifact,
)
from resnext_flax.metadata import MAX_IMAGE_SIZE
from resnext_flax.outputs import check_output_path

#: Output suffix -> format.
FORMATS = {".stablehlo": "stablehlo", ".onnx": "onnx"}
#: StableHLO's default platforms: one artifact for CPU and NVIDIA GPUs.
DEFAULT_PLATFORMS = ("cpu", "cuda")
ONNX_LAYOUTS = ("NHWC", "NCHW")
INSTALL_ONNX = "pip install 'resnext-flax[onnx]'"


def output_format(output: str | os.PathLike, format: str | None = None) -> str:
    """The format to write: `format`, or the one `output`'s suffix names; ExportError where
    neither names one, or where they disagree."""
    suffix = os.path.splitext(os.fspath(output))[1].lower()
    named = FORMATS.get(suffix)
    if format is None:
        if named is None:
            raise ExportError(Message(
                f"cannot tell the format from {os.fspath(output)!r}: name the file "
                f"{' or '.join('*' + s for s in FORMATS)}, or pass ",
                Fix.of(format=Placeholder("|".join(FORMATS.values())))))
        return named
    if format not in FORMATS.values():
        raise ExportError(f"unknown export format {format!r}; expected one of "
                          f"{', '.join(FORMATS.values())}")
    if named is not None and named != format:
        raise ExportError(f"{os.fspath(output)!r} names the {named} format, not {format}")
    return format


def check_outputs(output: str | os.PathLike, inputs: Sequence[str]) -> None:
    """The file the export writes, checked against what it reads before any work."""
    check_output_path(output, inputs, what="the output")


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What :func:`export` wrote and how it was checked.

    - `relative_errors`: batch size -> ``max|artifact - model| / max|model|`` on the probe
      images (empty without verification).
    - `platforms`: what a StableHLO artifact was lowered for (empty for ONNX).
    - `input_signature`: the input's name, shape (symbolic dimensions named), dtype, layout.
    - `verified_on`: where the artifact ran for the check (each platform of a StableHLO
      program this process has a device of; ONNX Runtime's CPU provider for ONNX), and
      `probe_size` the images' (height, width).
    - `record`: what the artifact says about itself (class names, preprocessing, input and
      output), stored in it: ``record.json`` in a StableHLO zip, ``metadata_props`` in ONNX.
    """

    format: str
    path: str
    size: int
    relative_errors: Mapping[int, float]
    platforms: tuple[str, ...]
    input_signature: Mapping[str, Any]
    record: Mapping[str, Any]
    verified_on: tuple[str, ...] = ()
    probe_size: tuple[int, int] | None = None

    def __str__(self) -> str:
        shape = ", ".join(str(d) for d in self.input_signature["shape"])
        lines = [f"wrote {self.path} ({self.format}, {self.size / 2**20:.1f} MiB)",
                 f"input: {self.input_signature['name']}, float32 ({shape}), "
                 f"{self.input_signature['layout']}"]
        if self.platforms:
            lines.append(f"platforms: {', '.join(self.platforms)}")
        if self.relative_errors:
            errors = ", ".join(f"batch {n}: {e:.2e}" for n, e in self.relative_errors.items())
            height, width = self.probe_size or ("?", "?")
            lines.append(f"verified against the model on {', '.join(self.verified_on)}, "
                         f"{height}x{width} images, relative error {errors}")
        else:
            lines.append("not verified")
        return "\n".join(lines)


def export(
    source: Any,
    output: str | os.PathLike,
    *,
    format: str | None = None,
    weights: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    name: str | None = None,
    platforms: Sequence[str] | None = None,
    verify: bool = True,
    probe_batch: int = 3,
    probe_size: int | None = None,
    tolerance: float = 1e-5,
    fixed_size: int | tuple[int, int] | str | None = None,
    onnx_layout: str = "NHWC",
    dtype: Any = None,
    prefix: str | None = None,
    ema: bool = False,
    key: str | None = None,
    num_classes: int | None = None,
    trust_pickle: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> ExportReport:
    """Write `source` as a StableHLO or ONNX artifact at `output`, verified.

    **Arguments:**
    - `source`: a ``ResNet`` (or ``optimize_for_inference``'s result); a model name, whose
      `weights` (a tag, default ``"DEFAULT"``, or a local file) or `checkpoint` are loaded as
      ``from_pretrained`` loads them; or a weight file or folder (``.pth``, ``.safetensors``,
      converted or fine-tuned checkpoint, Hugging Face folder), loaded as ``load_model`` loads
      it, with `name` (checked against the file), `prefix`, `ema`, `key`, `trust_pickle`. A
      string that names a model is the model even where a file of that name exists (write
      ``./resnet18`` for the file). `num_classes` may only be 0 (export the features): any
      other head than the weights' own would be untrained.
    - `format`: ``"stablehlo"`` or ``"onnx"``; None: from `output`'s suffix.
    - `platforms`: StableHLO only: what to lower for (default ``("cpu", "cuda")``).
    - `fixed_size`: None: height and width symbolic (any image size); an int or (height,
      width): fixed at that size; ``"crop"``: fixed at the crop size the weights record.
      Batch is always symbolic.
    - `onnx_layout`: ONNX only: the input's layout, ``"NHWC"`` (the library's) or ``"NCHW"``.
    - `verify`: run the artifact on `probe_batch` random images of `probe_size` pixels a side
      (default 224, at least :data:`MIN_PROBE_SIZE`; a fixed-size artifact is probed at its
      size) and on their first 1 and 3, on every platform it was lowered for that this
      process has a device of, and raise :class:`ExportError` (nothing written) where its
      relative error to the model exceeds `tolerance`.
    - `dtype`: only float32 (None) is exported: the artifact is a float32 program.

    `output` is checked before anything is read, and written atomically. Returns an
    :class:`ExportReport`.
    """
    format = output_format(output, format)
    platforms = _check_format_options(format, platforms, onnx_layout, dtype)
    size = _check_fixed_size(fixed_size)
    _check_probe(probe_batch, probe_size, tolerance, size)
    if num_classes not in (None, 0):
        raise ExportError(f"num_classes={num_classes!r}: an export writes the weights' own "
                          "head (leave num_classes unset) or none (num_classes=0, features); "
                          "another head would be untrained")
    inputs = source_files(source, weights, checkpoint, cache_dir)
    check_outputs(output, inputs)
    if format == "onnx":
        _require_onnx(verify)
    say = _progress(progress)
    say(f"loading {source if isinstance(source, str | os.PathLike) else 'the model'}")
    model = load_source(source, weights=weights, checkpoint=checkpoint, name=name,
                        prefix=prefix, ema=ema, key=key, num_classes=num_classes,
                        trust_pickle=trust_pickle, cache_dir=cache_dir, progress=progress)
    check_float32(model)
    if size == "crop":
        size = _crop_size(model)
    probe_shape = (probe_batch, *((probe_size or 224,) * 2 if size is None else size))
    label = source_label(source, weights, checkpoint)
    if format == "stablehlo":
        return _export_stablehlo(model, output, platforms=platforms, verify=verify,
                                 probe_shape=probe_shape, tolerance=tolerance, size=size,
                                 source=label, say=say)
    return _export_onnx(model, output, layout=onnx_layout, verify=verify,
                        probe_shape=probe_shape, tolerance=tolerance, size=size, source=label,
                        say=say)


def _crop_size(model: Any) -> tuple[int, int]:
    """The crop size the weights record; ExportError where they record none."""
    cfg = getattr(_module(model), "pretrained_cfg", None)
    if cfg is None or cfg.preprocessing is None:
        raise ExportError(Message("fixed_size='crop': these weights record no crop size; "
                                  "name the size: ", Fix.of(fixed_size=224)))
    return cfg.preprocessing.crop_size, cfg.preprocessing.crop_size


def _check_fixed_size(fixed_size: Any) -> tuple[int, int] | str | None:
    if fixed_size is None or fixed_size == "crop":
        return fixed_size
    sizes = (fixed_size, fixed_size) if isinstance(fixed_size, int) else fixed_size
    if not (isinstance(sizes, tuple | list) and len(sizes) == 2 and all(
            isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_IMAGE_SIZE
            for n in sizes)):
        raise ValueError(f"fixed_size must be None, 'crop', or a size from 1 to "
                         f"{MAX_IMAGE_SIZE} (an int, or (height, width)), got {fixed_size!r}")
    return int(sizes[0]), int(sizes[1])


def _check_format_options(format: str, platforms: Sequence[str] | None, onnx_layout: str,
                          dtype: Any) -> tuple[str, ...]:
    if dtype is not None:
        import numpy as np

        with contextlib.suppress(TypeError):  # a name numpy does not know stays as given
            dtype = np.dtype(dtype).name
        if dtype != "float32":
            raise ExportError(f"export writes float32 programs only, not {dtype}: leave dtype "
                              "unset (the weights' float32)")
    if onnx_layout not in ONNX_LAYOUTS:
        raise ExportError(f"onnx_layout must be one of {', '.join(ONNX_LAYOUTS)}, got "
                          f"{onnx_layout!r}")
    if format == "onnx":
        if platforms is not None:
            raise ExportError("platforms apply to StableHLO; an ONNX file runs wherever its "
                              "runtime does")
        return ()
    if onnx_layout != "NHWC":
        raise ExportError("a StableHLO artifact takes NHWC images (the library's layout); "
                          "onnx_layout applies to ONNX")
    from resnext_flax.export.stablehlo import check_platforms

    return check_platforms(DEFAULT_PLATFORMS if platforms is None else platforms)


#: The smallest probe side for a symbolic-size artifact: from 33 pixels up, the last stage's
#: maps are 2x2, where every tap of a 3x3 conv meets real pixels. On smaller images most taps
#: read only padding, and a wrong kernel layout could pass the comparison.
MIN_PROBE_SIZE = 33


def _check_probe(batch: int, size: int | None, tolerance: float,
                 fixed_size: tuple[int, int] | str | None) -> None:
    if not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
        raise ValueError(f"probe_batch must be a positive int, got {batch!r}")
    if size is not None:
        if fixed_size is not None:
            raise ValueError("probe_size: a fixed-size artifact is probed at its own size; "
                             "leave probe_size unset")
        if not (isinstance(size, int) and not isinstance(size, bool)
                and MIN_PROBE_SIZE <= size <= MAX_IMAGE_SIZE):
            raise ValueError(f"probe_size must be an int from {MIN_PROBE_SIZE} (where every "
                             f"conv's whole kernel takes part in the comparison) to "
                             f"{MAX_IMAGE_SIZE}, got {size!r}")
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"the tolerance must be a positive finite number, got {tolerance!r}")


def _require_onnx(verify: bool) -> None:
    """ImportError naming the extra where a package the ONNX export needs is missing (before
    any work)."""
    import importlib.util

    needed = ["onnx", "onnxruntime"] if verify else ["onnx"]
    missing = [p for p in needed if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(f"ONNX export needs {' and '.join(missing)}, not installed: "
                          f"{INSTALL_ONNX}")


def _progress(enabled: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if enabled:
            print(f"resnext-flax: {message}", file=sys.stderr, flush=True)

    return say


def _module(model: Any) -> Any:
    from resnext_flax.models.functional import CompiledModel

    return model.module() if isinstance(model, CompiledModel) else model


def _write_bytes(path: str | os.PathLike, data: bytes) -> None:
    from resnext_flax.weights.files import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def _export_stablehlo(model: Any, output: str | os.PathLike, *, platforms: tuple[str, ...],
                      verify: bool, probe_shape: tuple[int, int, int], tolerance: float,
                      size: tuple[int, int] | None, source: Any, say: Callable[[str], None]
                      ) -> ExportReport:
    import jax

    from resnext_flax.export.stablehlo import (
        export_stablehlo,
        input_shape,
        run_stablehlo,
        write_stablehlo,
    )
    from resnext_flax.weights.files import atomic_write

    say(f"exporting StableHLO for {', '.join(platforms)}")
    exported, weights = export_stablehlo(model, platforms=platforms, size=size)
    serialized = exported.serialize()
    errors: dict[int, float] = {}
    verified_on: list[str] = []
    if verify:
        loaded = jax.export.deserialize(serialized)
        for device in verification_devices(platforms):
            say(f"verifying on {device.platform} at batch sizes "
                f"{sorted({probe_shape[0], *CHECKED_BATCHES})}")
            placed = jax.device_put(weights, device)
            found = verify_artifact(lambda x, d=device, w=placed: run_stablehlo(loaded, w, x, d),
                                    model, probe_shape, tolerance,
                                    f"exported StableHLO program on {device.platform}")
            errors = {n: max(e, errors.get(n, 0.0)) for n, e in found.items()}
            verified_on.append(device.platform)
            del placed
    shape = input_shape(size)
    record = export_record(_module(model), format="stablehlo", input_shape=shape,
                           platforms=platforms, source=source)
    record["jax"] = {"version": jax.__version__,
                     "calling_convention_version": exported.calling_convention_version}
    record = json.loads(json.dumps(record))  # the report's record is the one stored
    atomic_write(output, lambda tmp: write_stablehlo(tmp, serialized, weights, record))
    return ExportReport("stablehlo", os.fspath(output), os.path.getsize(output), errors,
                        platforms, input_signature(shape), record, tuple(verified_on),
                        probe_shape[1:] if verify else None)


def _export_onnx(model: Any, output: str | os.PathLike, *, layout: str, verify: bool,
                 probe_shape: tuple[int, int, int], tolerance: float,
                 size: tuple[int, int] | None, source: Any, say: Callable[[str], None]
                 ) -> ExportReport:
    try:
        from resnext_flax.export.onnx_graph import onnx_session, run_onnx, to_onnx
    except ImportError as err:
        if "onnx_graph" not in str(err):
            raise
        raise ImportError("ONNX export is not part of this installation of resnext-flax"
                          ) from err
    height, width = ("height", "width") if size is None else size
    shape = ("batch", height, width, 3) if layout == "NHWC" else ("batch", 3, height, width)
    record = export_record(_module(model), format="onnx", input_shape=shape, layout=layout,
                           source=source)
    say(f"exporting ONNX ({layout} input)")
    data = to_onnx(model, layout=layout, metadata=metadata_props(record), size=size)
    errors = {}
    if verify:
        say("verifying in ONNX Runtime (CPU)")
        session = onnx_session(data)

        def run(images: Any) -> Any:
            return run_onnx(session, images if layout == "NHWC" else images.transpose(0, 3, 1,
                                                                                       2))

        errors = verify_artifact(run, model, probe_shape, tolerance, "ONNX graph")
    _write_bytes(output, data)
    return ExportReport("onnx", os.fspath(output), len(data), errors, (), input_signature(
        shape, layout=layout), json.loads(json.dumps(record)),
        ("onnxruntime cpu",) if verify else (), probe_shape[1:] if verify else None)


__all__ = ["CHECKED_BATCHES", "ExportReport", "check_outputs", "export", "export_record",
           "metadata_props", "output_format", "relative_error", "source_files",
           "verify_artifact"]
