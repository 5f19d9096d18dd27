"""Models as pure functions of their state, for ``jax.jit``.

``nnx.jit`` walks the module graph in Python on every call. Here a module is split once
(``graphdef, state = nnx.split(model)``) and a pure function of ``(state, images)`` merges it
only while tracing, so a jitted call costs what the compiled program costs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from resnext_flax.models.programs import ModuleForward, eval_split, run
from resnext_flax.models.resnet import check_input


def apply(graphdef: nnx.GraphDef, state: Any, x: jax.Array, method: str = "__call__") -> Any:
    """``module.<method>(x)`` in eval mode (BatchNorm on running statistics) for the module
    ``nnx.merge(graphdef, state)``: the one eval-mode forward, un-jitted (for ``shard_map`` or
    an enclosing jit). `state` may be a tuple of states (e.g. parameters and statistics). The
    module's conv policies are part of `graphdef`, so a jit keyed on it traces once per policy.
    """
    module = nnx.merge(graphdef, *state) if isinstance(state, tuple) else nnx.merge(
        graphdef, state)
    module.eval()  # BatchNorm on running statistics, whatever mode the source model is in
    return getattr(module, method)(x)


def pure_forward(model: nnx.Module, method: str = "__call__") -> tuple[ModuleForward, Any]:
    """``(fn, state)`` with ``fn(state, x) == model.<method>(x)`` in eval mode, as a pure
    function fit for ``jax.jit`` (``programs.ModuleForward``: ``fn.compiled(state, x)`` runs
    the program every wrapper of an equal model shares). The model itself is not switched to
    eval mode."""
    graphdef, state = eval_split(model)
    return ModuleForward(graphdef, method), state


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
        """`module` split as it runs in eval mode (the module itself is not switched)."""
        return cls(*eval_split(module))

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
        return self._run("__call__", x)

    def forward_features(self, x: jax.Array) -> dict[str, jax.Array]:
        """The module's ``forward_features`` outputs."""
        check_input(x)
        return self._run("forward_features", x)

    def _run(self, method: str, x: jax.Array) -> Any:
        if isinstance(x, jax.core.Tracer) or jax.config.jax_disable_jit:
            return apply(self.graphdef, self.state, x, method)  # inside the caller's trace
        return run(self.graphdef, self.state, x, method)
