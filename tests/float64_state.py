"""A train state cast to float64, for tests that compare runs below float32's rounding."""

from __future__ import annotations


def in_float64(state, tx):
    """`state` with float64 parameters and BatchNorm statistics, and `tx`'s state for them.
    jax is imported here, not at import time: child processes of the tests import this module
    before they configure jax."""
    import jax
    import jax.numpy as jnp

    params, stats = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                 (state.params, state.batch_stats))
    return state.replace(params=params, batch_stats=stats, opt_state=tx.init(params))
