"""The weight port: torchvision state dicts <-> this library's NNX state, matched by name.

Module names mirror torchvision's, so a torch key is the NNX path joined by dots with the leaf
renamed; only two layout changes exist (conv kernels OIHW <-> HWIO, linear weights transposed),
kept in one table. The keys and shapes a checkpoint of an architecture must hold come from the
model itself (:func:`expected_shapes`), and every key/shape check is :func:`compare_shapes`.
Pouring a state dict into a model is ``weights.loading``'s step.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnext_flax.errors import Message, WeightsError
from resnext_flax.models.folding import is_folded
from resnext_flax.models.resnet import ResNet
from resnext_flax.models.variants import ModelSpec, find_variant
from resnext_flax.nn.init import abstract_model

IGNORED_SUFFIXES = ("num_batches_tracked",)  # torch's BN step counter; no Flax counterpart
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile

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
# torch's module registration order (state-dict order), for listing keys as torch does.
_TORCH_ORDER = {name: i for i, name in enumerate((
    "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample", "layer1", "layer2", "layer3",
    "layer4", "fc", "weight", "bias", "running_mean", "running_var"))}


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


def _torch_order(key: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else _TORCH_ORDER.get(p, len(_TORCH_ORDER))
                 for p in key.split("."))


@functools.lru_cache(maxsize=64)
def expected_shapes(spec: ModelSpec, num_classes: int = 0) -> Mapping[str, tuple[int, ...]]:
    """Every key of a torchvision state dict of `spec` (without ``num_batches_tracked``) and
    its torch shape, in torch's order; ``fc`` only if `num_classes` > 0. Read off an abstract
    model (``nnx.eval_shape``: nothing is allocated), so the architecture is described once."""
    model = abstract_model(lambda rngs: ResNet(spec, num_classes=num_classes, rngs=rngs))
    shapes = {key: torch_shape(leaf, var.get_value().shape)
              for key, (leaf, var) in torch_variables(model).items()}
    return MappingProxyType({k: shapes[k] for k in sorted(shapes, key=_torch_order)})


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Strip DataParallel/DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes and
    drop ``num_batches_tracked``; values are left as they are."""
    out = {}
    for key, value in state_dict.items():
        key = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key.endswith(IGNORED_SUFFIXES):
            continue
        out[key] = value
    return out


def infer_spec(state_dict: Mapping[str, Any]) -> tuple[ModelSpec, int] | None:
    """The architecture and class count (0: no linear ``fc``) a torchvision-named state dict
    was saved from, or None if its keys do not describe a ResNet-family model: the block
    counts, the block kind and the grouped conv's shape are all a :class:`ModelSpec` needs."""
    sd = normalize_state_dict(state_dict)
    try:
        blocks = []
        for stage in range(1, 5):
            indices = {int(m.group(1)) for k in sd
                       if (m := re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", k))}
            blocks.append(len(indices))
        conv2 = tuple(sd["layer1.0.conv2.weight"].shape)
        fc = sd.get("fc.weight")
        num_classes = int(fc.shape[0]) if fc is not None and len(fc.shape) == 2 else 0
        if not all(blocks):
            return None
        if "layer1.0.conv3.weight" in sd:
            width, per_group = conv2[0], conv2[1]
            spec = ModelSpec("bottleneck", tuple(blocks), groups=width // per_group,
                             width_per_group=per_group)
        else:
            spec = ModelSpec("basic", tuple(blocks))
    except (KeyError, AttributeError, IndexError, TypeError, ValueError, ZeroDivisionError):
        return None
    return spec, num_classes


def infer_architecture(state_dict: Mapping[str, Any]) -> str | None:
    """torchvision's name for the architecture of a state dict, or None if not one of ours."""
    inferred = infer_spec(state_dict)
    return find_variant(inferred[0]) if inferred else None


def arch_phrase(spec: ModelSpec | None) -> str:
    """``"resnet50"``, or what else `spec` is, for messages."""
    if spec is None:
        return "an unknown architecture"
    return find_variant(spec) or f"an unlisted ResNet ({spec})"


def describe(state_dict: Mapping[str, Any]) -> str:
    """One phrase for messages: which architecture the state dict looks like."""
    inferred = infer_spec(state_dict)
    if inferred is None:
        return "it does not look like a torchvision ResNet-family state dict"
    spec, num_classes = inferred
    return f"it looks like {arch_phrase(spec)} with num_classes={num_classes}"


def to_torch_state_dict(model: nnx.Module, *, as_torch: bool = False) -> dict[str, Any]:
    """The model's weights and BN statistics as a torchvision state dict.

    By default the values are numpy arrays (no torch needed), without torch's BatchNorm step
    counter ``num_batches_tracked``; convert them with ``torch.from_numpy`` before
    ``load_state_dict``, which takes only tensors. With ``as_torch=True`` (needs torch) the
    values are ``torch.Tensor`` s and the keys are those of torchvision's own ``state_dict()``,
    ``num_batches_tracked`` (0) included, so ``load_state_dict(..., strict=True)`` takes the
    dict as it is. A model whose BatchNorms are folded (``optimize_for_inference``) has no
    torchvision layout and is refused (TypeError): convert the model it was made from.
    """
    if is_folded(model):
        raise TypeError("to_torch_state_dict: this model's BatchNorms are folded into its "
                        "convs (optimize_for_inference / fold_batchnorm), which torchvision's "
                        "layout cannot hold: convert the model it was made from")
    arrays = {
        key: np.array(to_torch_layout(leaf, np.asarray(var.get_value())), order="C")
        for key, (leaf, var) in torch_variables(model).items()
    }
    if not as_torch:
        return arrays
    try:
        import torch
    except ImportError as err:
        raise ImportError("to_torch_state_dict(as_torch=True) needs torch: pip install "
                          "'resnext-flax[torch]', or leave as_torch out for numpy arrays") from err
    tensors = {}
    for key in sorted(arrays, key=_torch_order):
        tensors[key] = torch.from_numpy(arrays[key])
        if key.endswith(".running_var"):  # torch keeps one step counter per BatchNorm
            counter = key[:-len("running_var")] + IGNORED_SUFFIXES[0]
            tensors[counter] = torch.tensor(0, dtype=torch.long)
    return tensors


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
    except WeightsError:  # a file's tensor that could not be read says why itself
        raise
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
    fix: Message | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.wrong_dtype)

    def summary(self) -> tuple[str, ...]:
        """One short phrase per kind of problem: ``"80 missing (a, b, c, ...)"``."""
        found = [("missing", self.missing), ("unexpected", self.unexpected),
                 ("mis-shaped", tuple(k for k, _, _ in self.mismatched))]
        return tuple(f"{len(ks)} {what} ({', '.join(ks[:3])}{', ...' if len(ks) > 3 else ''})"
                     for what, ks in found if ks)

    def format(self, model_name: str) -> Message:
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
            return Message("\n".join(lines), "\nfix: ", self.fix)
        return Message("\n".join(lines))


class StateDictMismatchError(WeightsError):
    """A state dict does not fit the model; the message lists every offending key."""

    def __init__(self, report: StateDictReport, model_name: str):
        super().__init__(report.format(model_name))
        self.report = report


class StateDictMismatchWarning(UserWarning):
    """Emitted by a non-strict load for the keys it could not load."""


class NonFiniteWeightsWarning(UserWarning):
    """Loaded weights contain NaN or Inf (a diverged run, a corrupt file)."""


def put_each(arrays: Iterable[tuple[str, np.ndarray]], source: str) -> list[jax.Array]:
    """Each ``(key, host array)`` on the default device, in order, taking the next host array
    only once the last is there: with a generator that reads or converts each tensor when
    asked, a load holds its weights about once (the device's, on the CPU) instead of a full
    host copy beside them. Warns, naming the tensors, about those holding NaN or Inf."""
    values, bad = [], []
    for key, array in arrays:
        if not np.isfinite(array).all():
            bad.append(key)
        values.append(jax.device_put(array))
        del array  # before the generator makes the next
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        warnings.warn(f"{source}: {len(bad)} tensor(s) hold NaN or Inf: {shown}",
                      NonFiniteWeightsWarning, stacklevel=3)
    return values


def compare_shapes(
    expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], source: str
) -> StateDictReport:
    """The one key/shape check: the report for two key -> shape tables (what a model needs,
    what a file holds)."""
    mismatched = [(k, tuple(expected[k]), tuple(got[k])) for k in got
                  if k in expected and tuple(expected[k]) != tuple(got[k])]
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
    variables = torch_variables(model)
    expected = {key: torch_shape(variables[key][0], variables[key][1].get_value().shape)
                for key in sorted(variables, key=_torch_order)}
    report = compare_shapes(expected, {k: tuple(np.shape(v)) for k, v in sd.items()},
                            describe(sd))
    wrong = tuple((k, d) for k in expected if k in sd and (d := _dtype_name(sd[k])))
    return dataclasses.replace(report, wrong_dtype=wrong)


def model_name(model: nnx.Module) -> str:
    """The torchvision name of a model's architecture, for messages."""
    spec = getattr(model, "spec", None)
    name = find_variant(spec) if spec is not None else None
    return name or type(model).__name__
