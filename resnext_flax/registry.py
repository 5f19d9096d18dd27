"""Building models by name: ``list_models``, ``create_model`` and one constructor per variant,
generated from the variant table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from resnext_flax.model import ResNet
from resnext_flax.variants import VARIANTS, get_spec


def list_models() -> list[str]:
    """torchvision names of the architectures this library builds."""
    return list(VARIANTS)


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    rngs: nnx.Rngs | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    zero_init_residual: bool = False,
) -> ResNet:
    """Build the named architecture with torchvision-style random initialization.

    **Arguments:**
    - `name`: one of :func:`list_models` (torchvision's names).
    - `num_classes`: classifier size.
    - `rngs`: random streams; ``nnx.Rngs(0)`` when omitted (deterministic).
    - `dtype`: compute dtype, e.g. ``jnp.bfloat16`` for mixed precision.
    - `param_dtype`: parameter dtype.
    - `zero_init_residual`: zero-init the last BatchNorm of each block.
    """
    return ResNet(
        get_spec(name),
        num_classes=num_classes,
        zero_init_residual=zero_init_residual,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs if rngs is not None else nnx.Rngs(0),
    )


def _constructor(name: str) -> Callable[..., ResNet]:
    def build(**kwargs: Any) -> ResNet:
        return create_model(name, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"torchvision's ``{name}`` ({get_spec(name)}) as a Flax NNX module; keyword "
        "arguments as for :func:`resnext_flax.create_model`."
    )
    return build


CONSTRUCTORS: dict[str, Callable[..., ResNet]] = {name: _constructor(name) for name in VARIANTS}
