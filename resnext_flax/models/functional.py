"""Models as pure functions of their state, for ``jax.jit``.

``nnx.jit`` walks the module graph in Python on every call. Here a module is split once
(``graphdef, state = nnx.split(model)``) and a pure function of ``(state, images)`` merges it
only while tracing, so a jitted call costs what the compiled program costs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from resnext_flax.models.resnet import check_input
from resnext_flax.nn import ops


def pure_forward(model: nnx.Module, method: str = "__call__") -> tuple[Callable, Any]:
    """``(fn, state)`` with ``fn(state, x) == model.<method>(x)`` in eval mode, as a pure
    function fit for ``jax.jit``. The model itself is not switched to eval mode."""
    graphdef, state = nnx.split(model)
    return functools.partial(_apply, graphdef, method), state


def _apply(graphdef: nnx.GraphDef, method: str, state: Any, x: jax.Array) -> Any:
    module = nnx.merge(graphdef, state)
    module.eval()  # BatchNorm on running statistics, whatever mode the source model is in
    return getattr(module, method)(x)


def _apply_in_context(graphdef: nnx.GraphDef, method: str, lowering_context: tuple, state: Any,
                      x: jax.Array) -> Any:
    del lowering_context  # read by the conv lowerings while tracing; here only a cache key
    return _apply(graphdef, method, state, x)


_jitted_apply = jax.jit(_apply_in_context, static_argnums=(0, 1, 2))


def _jit_apply(graphdef: nnx.GraphDef, method: str, state: Any, x: jax.Array) -> Any:
    """The jitted forward, traced again when the conv-lowering settings differ
    (``nn.ops.conv_lowering``): one compiled program per (shape, settings)."""
    return _jitted_apply(graphdef, method, ops.lowering_context(), state, x)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class CompiledModel:
    """A module split once into ``graphdef`` (static) and ``state`` (arrays); calling it runs
    a ``jax.jit`` compiled once per input shape, in eval mode. A pytree, so it can be an
    argument of your own jitted functions."""

    graphdef: nnx.GraphDef
    state: nnx.State

    @classmethod
    def from_module(cls, module: nnx.Module) -> CompiledModel:
        graphdef, state = nnx.split(module)
        return cls(graphdef, state)

    def module(self) -> nnx.Module:
        """The NNX module again (a new object over the same arrays)."""
        return nnx.merge(self.graphdef, self.state)

    def tree_flatten(self) -> tuple[tuple[nnx.State], nnx.GraphDef]:
        return (self.state,), self.graphdef

    @classmethod
    def tree_unflatten(cls, graphdef: nnx.GraphDef, children: tuple[nnx.State]):
        return cls(graphdef, children[0])

    def __call__(self, x: jax.Array) -> jax.Array:
        """The module's output (logits) for NHWC images."""
        check_input(x)
        return _jit_apply(self.graphdef, "__call__", self.state, x)

    def forward_features(self, x: jax.Array) -> dict[str, jax.Array]:
        """The module's ``forward_features`` outputs."""
        check_input(x)
        return _jit_apply(self.graphdef, "forward_features", self.state, x)
