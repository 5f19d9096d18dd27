"""Optimizer pieces with torch's semantics, as optax transformations.

- :func:`add_weight_decay`: torch's coupled L2 (``grad + wd * param``) with a rate per
  parameter, for torchvision's parameter groups (:func:`resnext_flax.training.weight_decay_tree`).
- :func:`clip_grad_norm`: ``torch.nn.utils.clip_grad_norm_``, which differs from
  ``optax.clip_by_global_norm`` in its ``1e-6`` and in scaling whenever the coefficient is < 1.
- :func:`accumulate_gradients`: one optimizer step per ``steps`` micro-batches on their mean
  gradient, as ``(loss / steps).backward()`` on each and ``optimizer.step()`` after the last.
  The train step still runs (and updates the BatchNorm statistics) on every micro-batch, as
  torch's forward passes do.

Chain them in torch's order: clip the (accumulated) gradient first, then the optimizer, e.g.
``accumulate_gradients(optax.chain(clip_grad_norm(1.0), training.sgd(...)), 4)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Params = Any


def add_weight_decay(rates: Callable[[Params], Params]) -> optax.GradientTransformation:
    """``grad + rate * param`` per leaf, `rates(params)` giving each leaf's rate (a Python
    number, so a zero rate costs nothing)."""

    def init(params: Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Params, state: optax.EmptyState, params: Params | None = None):
        if params is None:
            raise ValueError("weight decay needs the parameters: call update(grads, state, "
                             "params)")
        return jax.tree.map(lambda g, p, rate: g + rate * p if rate else g,
                            updates, params, rates(params)), state

    return optax.GradientTransformation(init, update)


def global_norm(tree: Params) -> jax.Array:
    """The 2-norm of all leaves as one vector, computed as torch does: the norm of the
    per-tensor norms."""
    norms = [jnp.linalg.norm(jnp.ravel(leaf)) for leaf in jax.tree.leaves(tree)]
    return jnp.linalg.norm(jnp.stack(norms)) if norms else jnp.zeros((), jnp.float32)


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_(parameters, max_norm)``: every gradient times
    ``min(1, max_norm / (total_norm + 1e-6))``; a non-finite norm gives non-finite
    gradients, as in torch."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, int | float) or \
            not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")

    def init(params: Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Params, state: optax.EmptyState, params: Params | None = None):
        del params
        coefficient = jnp.minimum(max_norm / (global_norm(updates) + 1e-6), 1.0)
        return jax.tree.map(lambda g: g * coefficient.astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


def accumulate_gradients(tx: optax.GradientTransformation,
                         steps: int) -> optax.GradientTransformation:
    """`tx` applied once per `steps` updates, to the mean of their gradients (zero updates in
    between); ``steps=1`` is `tx` itself. A schedule inside `tx` counts optimizer steps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if steps == 1:
        return tx

    def multi_steps(tree: Params) -> optax.MultiSteps:
        # optax accumulates in float32 unless told otherwise; float64 parameters need their
        # own precision (bfloat16 ones keep float32: the mean of many small gradients).
        dtype = jnp.promote_types(jnp.result_type(*jax.tree.leaves(tree)), jnp.float32)
        return optax.MultiSteps(tx, every_k_schedule=steps, accumulator_dtype=dtype)

    def init(params: Params) -> optax.MultiStepsState:
        return multi_steps(params).init(params)

    def update(updates: Params, state: optax.MultiStepsState, params: Params | None = None):
        return multi_steps(state.acc_grads).update(updates, state, params)

    return optax.GradientTransformation(init, update)
