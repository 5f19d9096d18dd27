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

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
from flax import nnx

from resnext_flax.nn.layers import BatchNorm

#: What a forward may write: every variable but the parameters (BatchNorm statistics in train
#: mode, a dropout head's RNG counters, sown intermediates...).
_MUTABLE = nnx.Not(nnx.Param)

#: A method: its name (resolved on the module, overrides included) or a function of
#: ``(module, x)`` (a base class's own method, called on a subclass instance).
Method = str | Callable[..., Any]


def _forward(graphdef: nnx.GraphDef, state: Any, x: jax.Array, method: Method,
             outputs: tuple[str, ...] | None) -> tuple[Any, Any]:
    """``module.<method>(x)`` for ``module = nnx.merge(graphdef, state)`` in the mode its
    graph definition records; with `outputs`, only those keys of a dict result. Returns the
    result and every non-parameter variable when the call wrote any (train-mode BatchNorm
    statistics, RNG counters...; compared while tracing), else None."""
    module = nnx.merge(graphdef, state)
    before = jax.tree.leaves(nnx.state(module, _MUTABLE))
    call = getattr(module, method) if isinstance(method, str) else partial(method, module)
    result = call(x)
    if outputs is not None:
        result = {name: result[name] for name in outputs}
    if isinstance(result, dict):  # jit returns dicts with sorted keys: keep the method's order
        _KEY_ORDER[graphdef, method, outputs] = tuple(result)
    after = nnx.state(module, _MUTABLE)
    leaves = jax.tree.leaves(after)
    written = len(leaves) != len(before) or any(
        a is not b for a, b in zip(leaves, before, strict=True))
    return result, after if written else None


#: :func:`_forward` jitted; the graph definition, method and outputs are static.
forward_program = jax.jit(_forward, static_argnums=(0, 3, 4))
#: The key order of each program's dict result, recorded while tracing.
_KEY_ORDER: dict[tuple, tuple[str, ...]] = {}


def _run(graphdef: nnx.GraphDef, state: Any, x: Any, method: Method,
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


def eval_split(module: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """``nnx.split`` of `module` as it runs in eval mode (``module.eval()``: BatchNorm on running
    statistics, dropout off; and no BatchNorm data-parallel axis, which running statistics never
    read), without changing `module` itself: every eval-mode wrapper of one model then keys the
    same compiled program, whatever mode and axis the model was left with (e.g. after
    fine-tuning)."""
    view = nnx.merge(*nnx.split(module))  # new module objects over the same arrays
    view.eval()
    for _, m in nnx.iter_graph(view):
        if isinstance(m, BatchNorm):
            m.axis_name = None
    return nnx.split(view)


def _traced(tree: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def call_compiled(module: nnx.Module, method: Method, x: Any,
                  outputs: Sequence[str] | None = None) -> Any | None:
    """``method(module, x)`` (or ``module.<method>(x)`` for a name) through
    :data:`forward_program` when called outside any trace, writing back what the call wrote
    (train-mode BatchNorm statistics...); None where the module must run as plain code instead
    (a traced input or variable, or ``jax.disable_jit()``). A class's own method passes itself
    (``ResNet.__call__``), so a subclass that overrides it and calls ``super()`` runs its
    override once, outside the program."""
    if isinstance(x, jax.core.Tracer) or jax.config.jax_disable_jit:
        return None
    if not isinstance(method, str) and getattr(type(module), method.__name__, None) is method:
        method = method.__name__  # not overridden: the key the wrappers' programs use
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
