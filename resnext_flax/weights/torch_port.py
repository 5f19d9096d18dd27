"""The weight port: torchvision state dicts <-> this library's NNX state, matched by name.

Module names mirror torchvision's, so a torch key is the NNX path joined by dots with the leaf
renamed; only two layout changes exist (conv kernels OIHW <-> HWIO, linear weights transposed),
kept in one table.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnext_flax.models.variants import find_variant
from resnext_flax.weights.names import describe, normalize_state_dict
from resnext_flax.weights.resolve import suggest_fix

# NNX leaf name -> torch leaf name.
_TORCH_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
# Kernel rank -> axis order taking this library's layout to torch's: conv HWIO -> OIHW,
# linear (in, out) -> (out, in). The inverse permutation goes back.
_TO_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}


def _torch_axes(leaf: str, ndim: int, *, inverse: bool = False) -> tuple[int, ...] | None:
    axes = _TO_TORCH_AXES.get(ndim) if leaf == "kernel" else None
    return tuple(np.argsort(axes)) if axes is not None and inverse else axes


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """An NNX leaf's value in torch's layout."""
    axes = _torch_axes(leaf, value.ndim)
    return value if axes is None else value.transpose(axes)


def from_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """A torch tensor's value (numpy) in this library's layout."""
    axes = _torch_axes(leaf, value.ndim, inverse=True)
    return value if axes is None else value.transpose(axes)


def torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of an NNX leaf of `shape`."""
    axes = _torch_axes(leaf, len(shape))
    return tuple(shape) if axes is None else tuple(shape[a] for a in axes)


def _torch_key(path: tuple[Any, ...]) -> str:
    *modules, leaf = path
    return ".".join([*map(str, modules), _TORCH_LEAF[leaf]])


def torch_variables(model: nnx.Module) -> dict[str, tuple[str, nnx.Variable]]:
    """torch key -> (NNX leaf name, the model's Variable), for every weight and statistic."""
    out = {}
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param | nnx.BatchStat):
            out[_torch_key(path)] = (path[-1], variable)
    return out


def to_torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's weights and BN statistics as a torchvision state dict of numpy arrays.

    torchvision's ``load_state_dict(..., strict=True)`` accepts it (after
    ``torch.from_numpy``); ``num_batches_tracked`` is torch's step counter and is omitted.
    """
    return {
        key: np.array(to_torch_layout(leaf, np.asarray(var.get_value())), order="C")
        for key, (leaf, var) in torch_variables(model).items()
    }


def to_numpy(key: str, value: Any) -> np.ndarray:
    """A floating-point tensor or array as numpy (half precision widened to float32); any
    other dtype raises a ValueError naming `key`."""
    if hasattr(value, "detach"):  # a torch tensor; torch is not imported unless it is used
        value = value.detach().cpu()
        if not value.is_floating_point():
            raise ValueError(f"{key!r}: expected a floating-point tensor, got {value.dtype}")
        return value.float().numpy() if value.dtype.itemsize < 4 else value.numpy()
    try:
        array = np.asarray(value)
    except Exception as err:
        raise ValueError(f"{key!r}: expected a floating-point array, got "
                         f"{type(value).__name__}") from err
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"{key!r}: expected a floating-point array, got {array.dtype}")
    return array


@dataclasses.dataclass(frozen=True)
class StateDictReport:
    """How a state dict fits a model: keys the model needs but the dict lacks, keys the dict has
    but the model does not, keys whose shapes differ ``(key, expected, got)`` and keys that
    are not floating point ``(key, dtype)``; `fix`: the option that would make it load, when
    one would (the message's last line)."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    source: str
    wrong_dtype: tuple[tuple[str, str], ...] = ()  # (key, dtype) of non-float tensors
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.wrong_dtype)

    def format(self, model_name: str) -> str:
        lines = [f"state dict does not fit {model_name}: {self.source}."]
        if self.missing:
            lines.append(f"{len(self.missing)} missing key(s): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} unexpected key(s): {', '.join(self.unexpected)}")
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} key(s) with mismatched shapes:")
            lines += [f"  {k}: expected {tuple(e)}, got {tuple(g)}" for k, e, g in self.mismatched]
        if self.wrong_dtype:
            lines.append(f"{len(self.wrong_dtype)} key(s) that are not floating point: "
                         + ", ".join(f"{k} ({d})" for k, d in self.wrong_dtype))
        if self.fix:
            lines.append(f"fix: {self.fix}")
        return "\n".join(lines)


class StateDictMismatchError(ValueError):
    """A state dict does not fit the model; the message lists every offending key."""

    def __init__(self, report: StateDictReport, model_name: str):
        super().__init__(report.format(model_name))
        self.report = report


class StateDictMismatchWarning(UserWarning):
    """Emitted by a non-strict load for the keys it could not load."""


class NonFiniteWeightsWarning(UserWarning):
    """Loaded weights contain NaN or Inf (a diverged run, a corrupt file)."""


def warn_non_finite(arrays: Mapping[str, np.ndarray], source: str) -> None:
    """Warn, naming the tensors, if any of `arrays` holds NaN or Inf."""
    bad = [key for key, value in arrays.items() if not np.isfinite(value).all()]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        warnings.warn(f"{source}: {len(bad)} tensor(s) hold NaN or Inf: {shown}",
                      NonFiniteWeightsWarning, stacklevel=3)


def compare_shapes(
    expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], source: str
) -> StateDictReport:
    """The report for two key -> shape tables (what a model needs, what a file holds)."""
    mismatched = [(k, tuple(expected[k]), tuple(got[k])) for k in expected.keys() & got.keys()
                  if tuple(expected[k]) != tuple(got[k])]
    return StateDictReport(
        missing=tuple(k for k in expected if k not in got),
        unexpected=tuple(k for k in got if k not in expected),
        mismatched=tuple(sorted(mismatched)),
        source=source,
    )


def _dtype_name(value: Any) -> str | None:
    """The dtype of a tensor or array if it is not floating point, else None."""
    if hasattr(value, "is_floating_point"):  # a torch tensor
        return None if value.is_floating_point() else str(value.dtype)
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return type(value).__name__
    return None if jnp.issubdtype(dtype, jnp.floating) else str(dtype)


def compare_state_dict(model: nnx.Module, state_dict: Mapping[str, Any]) -> StateDictReport:
    """Which keys of a (torchvision-named) state dict fit the model (names, shapes, floating
    dtypes), without loading any."""
    sd = normalize_state_dict(state_dict)
    expected = {key: torch_shape(leaf, var.get_value().shape)
                for key, (leaf, var) in torch_variables(model).items()}
    report = compare_shapes(expected, {k: tuple(np.shape(v)) for k, v in sd.items()},
                            describe(sd))
    wrong = tuple((k, d) for k in expected if k in sd and (d := _dtype_name(sd[k])))
    return dataclasses.replace(report, wrong_dtype=wrong)


def model_name(model: nnx.Module) -> str:
    """The torchvision name of a model's architecture, for messages."""
    spec = getattr(model, "spec", None)
    name = find_variant(spec) if spec is not None else None
    return name or type(model).__name__


def load_torch_state_dict(
    model: nnx.Module, state_dict: Mapping[str, Any], *, strict: bool = True
) -> nnx.Module:
    """Pour a torchvision state dict into `model` in place and return it.

    Values may be torch tensors or numpy arrays of any floating dtype; they are cast to the
    dtype of the model's variables. ``module.``/``_orig_mod.`` prefixes are stripped and
    ``num_batches_tracked`` dropped. Every key, shape and dtype is checked before anything is
    written, so a failed load leaves the model as it was. With ``strict=True`` any missing,
    unexpected or mis-shaped key raises one :class:`StateDictMismatchError` listing them all;
    with ``strict=False`` the fitting keys load and the rest are reported as a
    :class:`StateDictMismatchWarning`. A trunk under another prefix, in a container or with
    other names is for :func:`resnext_flax.load_model`, which finds it (the error says so).
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
    arrays = {key: to_numpy(key, sd[key]) for key in torch_variables(model)
              if key in sd and key not in skip}  # every dtype checked before any write
    warn_non_finite(arrays, "the state dict")
    for key, (leaf, var) in torch_variables(model).items():
        if key in arrays:
            # A copy: on the CPU jnp.asarray may alias the torch tensor's memory, which torch
            # could later change in place.
            var.set_value(jnp.array(from_torch_layout(leaf, arrays[key]),
                                    dtype=var.get_value().dtype, copy=True))
    return model
