"""What an export reads: the model a source stands for (a model object, a model name with its
weights, a weight file), the files behind it, and the check that it is float32."""

from __future__ import annotations

import os
from typing import Any

from resnext_flax.errors import ExportError, UnknownModelError, WeightFileNotFoundError
from resnext_flax.models.variants import VARIANTS
from resnext_flax.outputs import weight_source_files


def _is_model(source: Any) -> bool:
    from resnext_flax.models.functional import CompiledModel
    from resnext_flax.models.resnet import ResNet

    return isinstance(source, ResNet | CompiledModel)


def _is_model_name(source: Any) -> bool:
    """A string naming a variant is the model, even where a file of that name exists here
    (``./resnet18`` names the file)."""
    return isinstance(source, str) and source in VARIANTS


def source_files(source: Any, weights: Any = None, checkpoint: Any = None,
                 cache_dir: Any = None) -> list[str]:
    """The local files an export of `source` reads (what its output must not be), the
    converted checkpoint in the cache included where a model name's weight set is read from
    it."""
    paths = [p for p in (weights, checkpoint) if isinstance(p, str | os.PathLike)
             and os.path.exists(p)]
    if _is_model_name(source):
        cached = _cached_weight_file(source, weights, checkpoint, cache_dir)
        paths += [] if cached is None else [cached]
    elif isinstance(source, str | os.PathLike) and os.path.exists(source):
        paths.append(source)
    return [f for path in paths for f in weight_source_files(path)]


def _cached_weight_file(name: str, weights: Any, checkpoint: Any, cache_dir: Any) -> str | None:
    """Where the cache holds (or would hold) the converted weight set a model name loads;
    None where a local file is loaded instead, or the weight set is unknown (the load then
    names the problem). Read without JAX: the command checks its output before importing
    it."""
    from resnext_flax.weights.cache import cached_checkpoint_path
    from resnext_flax.weights.catalog import resolve_weights

    if checkpoint is not None or isinstance(weights, os.PathLike):
        return None
    if isinstance(weights, str) and (os.sep in weights or os.path.splitext(weights)[1]):
        return None
    try:
        weight_set = resolve_weights(name, "DEFAULT" if weights is None else weights)
    except (ValueError, TypeError, KeyError):
        return None
    return os.fspath(cached_checkpoint_path(weight_set, cache_dir))


def source_label(source: Any, weights: Any, checkpoint: Any) -> str | None:
    """What the record names as the export's source: the file the weights came from (a
    local `weights` or `checkpoint` file, or the `source` file), or the model name."""
    for path in (checkpoint, weights, source):
        if isinstance(path, str | os.PathLike) and not _is_model_name(path) and (
                os.path.exists(path)):
            return os.fspath(path)
    return source if isinstance(source, str) else None


def load_source(source: Any, *, weights: Any, checkpoint: Any, name: str | None, cache_dir: Any,
          progress: bool, **options: Any) -> Any:
    """The model `source` stands for (see :func:`export`)."""
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    if _is_model(source):
        if weights is not None or checkpoint is not None or name is not None or given:
            raise ValueError("weights, checkpoint, name and the load options apply to a model "
                             "name or a file, not to a model object")
        return source
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"source must be a ResNet, a model name or a path, got "
                        f"{type(source).__name__}")
    if not _is_model_name(source) and os.path.exists(source):
        if weights is not None or checkpoint is not None:
            raise ValueError("weights and checkpoint apply to a model name; the file "
                             f"{os.fspath(source)!r} is the weights")
        from resnext_flax.weights.loading import load_model

        return load_model(source, name, **options)
    if source in VARIANTS:
        if name is not None and name != source:
            raise ValueError(f"name={name!r} differs from the model name {source!r}")
        from resnext_flax.weights.pretrained import from_pretrained

        return from_pretrained(source, "DEFAULT" if weights is None else weights,
                               checkpoint=checkpoint, cache_dir=cache_dir, progress=progress,
                               **options)
    if os.sep in os.fspath(source) or os.path.splitext(os.fspath(source))[1]:
        raise WeightFileNotFoundError(f"no file or folder {os.fspath(source)!r}")
    raise UnknownModelError(f"{source!r} is neither a file nor a model name; models: "
                            f"{', '.join(VARIANTS)}")


def check_float32(model: Any) -> None:
    """ExportError unless `model` computes and stores float32."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from resnext_flax.models.functional import CompiledModel

    module = model.module() if isinstance(model, CompiledModel) else model
    dtypes = {jnp.dtype(leaf.dtype).name for leaf in jax.tree.leaves(nnx.state(module, nnx.Param))}
    compute = None if module.dtype is None else jnp.dtype(module.dtype).name
    if compute not in (None, "float32") or dtypes - {"float32"}:
        what = compute if compute not in (None, "float32") else ", ".join(sorted(dtypes))
        raise ExportError(f"export writes float32 programs only; this model computes or "
                          f"stores {what}: build or load it without dtype= (float32)")
