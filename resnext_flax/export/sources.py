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


def source_files(source: Any, weights: Any = None, checkpoint: Any = None) -> list[str]:
    """The local files an export of `source` reads (what its outputs must not be)."""
    paths = [p for p in (source, weights, checkpoint)
             if isinstance(p, str | os.PathLike) and os.path.exists(p)]
    return [f for path in paths for f in weight_source_files(path)]


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
    if os.path.exists(source):
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
