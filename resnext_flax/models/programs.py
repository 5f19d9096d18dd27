"""One compiled program per (module structure, method, outputs, input shape and dtype), shared
by every way of running a model.

A module's graph definition (``nnx.split``) holds everything that decides what its forward
computes besides the arrays: the architecture, BatchNorm's mode (train or running statistics),
each conv's ``ConvPolicy``, folded or fused blocks. :data:`forward_program` is ``jax.jit``
keyed on it, so ``model(x)`` called eagerly, ``Predictor.from_model(model)``,
``FeatureExtractor(model)``, ``optimize_for_inference(model)(x)`` and a model loaded again from
the same file all reuse one compilation per input shape, instead of one per wrapper object.

:func:`call_compiled` is the eager entry of ``ResNet.__call__``/``forward_features``: outside
any JAX trace it runs this program (a whole forward compiled once, instead of every op
compiled and dispatched on its own); inside a trace (``jax.jit``, ``nnx.jit``, ``grad``,
``vmap``...) or under ``jax.disable_jit()`` the module runs as plain code, as any NNX module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from resnext_flax.nn.layers import BatchNorm

#: The BatchNorm statistics a train-mode forward writes back.
_UPDATED = nnx.BatchStat


def _updates_statistics(module: nnx.Module) -> bool:
    """Whether a forward of `module` writes BatchNorm statistics (a BatchNorm in train mode).
    Read while tracing only, so it costs nothing per call."""
    return any(getattr(m, "use_running_average", True) is False
               for _, m in nnx.iter_graph(module))


def _forward(graphdef: nnx.GraphDef, state: Any, x: jax.Array, method: str,
             outputs: tuple[str, ...] | None) -> tuple[Any, Any]:
    """``module.<method>(x)`` for ``module = nnx.merge(graphdef, state)`` in the mode its
    graph definition records; with `outputs`, only those keys of a dict result. Returns the
    result and the updated BatchNorm statistics (None in eval mode, where nothing changes)."""
    module = nnx.merge(graphdef, state)
    result = getattr(module, method)(x)
    if outputs is not None:
        result = {name: result[name] for name in outputs}
    if isinstance(result, dict):  # jit returns dicts with sorted keys: keep the method's order
        _KEY_ORDER[graphdef, method, outputs] = tuple(result)
    updates = nnx.state(module, _UPDATED) if _updates_statistics(module) else None
    return result, updates


#: :func:`_forward` jitted; the graph definition, method and outputs are static.
forward_program = jax.jit(_forward, static_argnums=(0, 3, 4))
#: The key order of each program's dict result, recorded while tracing.
_KEY_ORDER: dict[tuple, tuple[str, ...]] = {}


def _run(graphdef: nnx.GraphDef, state: Any, x: Any, method: str,
         outputs: tuple[str, ...] | None) -> tuple[Any, Any]:
    # One kind of argument (a device array), so numpy and jax inputs share one program.
    x = x if isinstance(x, jax.Array) else jax.numpy.asarray(x)
    result, updates = forward_program(graphdef, state, x, method, outputs)
    if isinstance(result, dict):
        result = {name: result[name] for name in _KEY_ORDER[graphdef, method, outputs]}
    return result, updates


def run(graphdef: nnx.GraphDef, state: Any, x: Any, method: str = "__call__") -> Any:
    """``module.<method>(x)`` for ``module = nnx.merge(graphdef, state)`` through the shared
    program (an eval-mode `graphdef`: nothing is written back)."""
    return _run(graphdef, state, x, method, None)[0]


def _eval_ready(module: nnx.Module) -> bool:
    return all(m.use_running_average and m.axis_name is None
               for _, m in nnx.iter_graph(module) if isinstance(m, BatchNorm))


def eval_split(module: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """``nnx.split`` of `module` as it runs in eval mode (BatchNorm on running statistics, no
    cross-device axis: an eval-mode BatchNorm reads none), without changing `module` itself:
    every eval-mode wrapper of one model then keys the same compiled program, whatever mode
    and data-parallel axis the model was left with (e.g. after fine-tuning)."""
    graphdef, state = nnx.split(module)
    if not _eval_ready(module):
        view = nnx.merge(graphdef, state)  # new module objects over the same arrays
        view.eval()
        for _, m in nnx.iter_graph(view):
            if isinstance(m, BatchNorm):
                m.axis_name = None
        graphdef, state = nnx.split(view)
    return graphdef, state


def _traced(tree: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def call_compiled(module: nnx.Module, method: str, x: Any,
                  outputs: Sequence[str] | None = None) -> Any | None:
    """``module.<method>(x)`` through :data:`forward_program` when called outside any trace,
    writing back the BatchNorm statistics a train-mode call updates; None where the module
    must run as plain code instead (a traced input or variable, or ``jax.disable_jit()``)."""
    if isinstance(x, jax.core.Tracer) or jax.config.jax_disable_jit:
        return None
    graphdef, state = nnx.split(module)
    if _traced(state):  # e.g. nnx.grad over the parameters with a concrete input
        return None
    result, updates = _run(graphdef, state, x, method,
                           None if outputs is None else tuple(outputs))
    if updates is not None:
        nnx.update(module, updates)
    return result


class ModuleForward:
    """``fn(state, x) -> module.<method>(x)`` for an eval-mode split module: a pure function
    for your own traces (``fn(state, x)``), and through :meth:`compiled` the shared program.
    Equal for equal graph definitions, methods and outputs, so it also keys caches."""

    __slots__ = ("__weakref__", "graphdef", "method", "outputs")

    def __init__(self, graphdef: nnx.GraphDef, method: str = "__call__",
                 outputs: Sequence[str] | None = None):
        self.graphdef = graphdef
        self.method = method
        self.outputs = None if outputs is None else tuple(outputs)

    def _key(self) -> tuple:
        return (self.graphdef, self.method, self.outputs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModuleForward) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, state: Any, x: jax.Array) -> Any:
        """The forward as plain code (for an enclosing trace)."""
        return _forward(self.graphdef, state, x, self.method, self.outputs)[0]

    def compiled(self, state: Any, x: jax.Array) -> Any:
        """The forward through the shared compiled program."""
        return _run(self.graphdef, state, x, self.method, self.outputs)[0]
