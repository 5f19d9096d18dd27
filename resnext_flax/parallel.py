"""Data parallelism over a ``jax.sharding.Mesh``: batch sharded, parameters replicated.

Two ways to run the same step on many devices:

- ``jax.jit`` with a sharded batch (GSPMD): the plain :data:`resnext_flax.training.train_step`
  partitioned by XLA. Simple, but for grouped convolutions (ResNeXt) XLA all-gathers the
  batch (openxla/xla#47945), so every device computes the whole batch there.
- ``jax.shard_map`` per-device programs (:func:`make_parallel_train_step`,
  :func:`make_parallel_predict`): each device runs the model on its shard; BatchNorm averages
  its statistics over the mesh axis (``axis_name``) and the loss is the global mean, so the
  result equals a single-device step on the whole batch, up to float rounding.
"""

from __future__ import annotations

import collections
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnext_flax import training
from resnext_flax.mixing import MixConfig
from resnext_flax.training import Metrics, TrainState

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over `devices` (all of ``jax.devices()`` by default, across processes)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), (axis_name,))


def local_devices(mesh: Mesh) -> int:
    """How many of the mesh's devices belong to this process (all of them in a
    single-process run)."""
    here = jax.process_index()
    return sum(d.process_index == here for d in mesh.devices.flat)


def shard_batch(mesh: Mesh, *arrays: Any, axis_name: str = DATA_AXIS) -> Any:
    """Put arrays on the mesh split along their first (batch) axis.

    Each process passes its own part of the global batch (in a single-process run, all of
    it): the part's rows go to this process's devices of the mesh, in order, and the result
    is one global array (``jax.make_array_from_process_local_data``) whose batch is every
    process's part, process 0's first for a mesh from :func:`data_mesh`. The part must split
    evenly over this process's devices, and every process must pass as many rows.
    """
    local = local_devices(mesh)
    if local == 0:
        raise ValueError(f"none of the mesh's {mesh.size} devices belongs to process "
                         f"{jax.process_index()}: build the mesh over jax.devices()")
    where = ("" if local == mesh.size else
             f" of process {jax.process_index()} (its part of the global batch)")
    for a in arrays:
        n = np.shape(a)[0] if np.ndim(a) else 0
        if n == 0 or n % local:
            raise ValueError(
                f"a batch of {n} cannot be split evenly over {local} devices{where} (mesh "
                f"axis {axis_name!r}): use a batch size that is a multiple of {local}, or pad "
                "the last batch and ignore the padding")
    sharding = NamedSharding(mesh, P(axis_name))
    if sharding.is_fully_addressable:
        out = [jax.device_put(a, sharding) for a in arrays]
    else:
        out = [jax.make_array_from_process_local_data(
            sharding, np.asarray(a), (np.shape(a)[0] * mesh.size // local, *np.shape(a)[1:]))
            for a in arrays]
    return out[0] if len(out) == 1 else tuple(out)


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Copy a pytree (e.g. a :class:`TrainState`) to every device of the mesh.

    In a multi-process run every process must pass the same values (the same seed, the same
    checkpoint): each places its own copy on its devices, after comparing a checksum of every
    array with the other processes (``jax.device_put`` would gather every process's whole
    tree on every host to compare them, memory that grows with the process count).
    """
    sharding = NamedSharding(mesh, P())
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    local = [_host_copy(leaf) for _, leaf in leaves]
    _check_same_everywhere([path for path, _ in leaves], local)
    return jax.tree_util.tree_unflatten(treedef, [
        jax.device_put(leaf, sharding) if host is None
        else jax.make_array_from_process_local_data(sharding, host, host.shape)
        for (_, leaf), host in zip(leaves, local, strict=True)])


def _host_copy(leaf: Any) -> np.ndarray | None:
    """The leaf's value on this host, or None for an array already spread over processes
    (it is resharded by JAX, nothing to compare)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return None
    if not isinstance(leaf, jax.Array | np.ndarray):
        leaf = jnp.asarray(leaf)  # a Python scalar: the dtype JAX would give it
    return np.asarray(leaf)


def _check_same_everywhere(paths: list[Any], values: list[np.ndarray | None]) -> None:
    """A ValueError on every process unless all processes hold the same values."""
    from jax.experimental import multihost_utils

    sums = np.array([0 if v is None else zlib.crc32(np.ascontiguousarray(v).tobytes())
                     for v in values], np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(sums))  # (processes, leaves)
    differ = np.flatnonzero((gathered != gathered[0]).any(axis=0))
    if differ.size:
        names = ", ".join(jax.tree_util.keystr(paths[i]) for i in differ[:5])
        raise ValueError(
            f"{differ.size} of the {len(values)} arrays to replicate differ between processes "
            f"({names}{', ...' if differ.size > 5 else ''}): every process must start from "
            "the same state (the same seed, the same weights or checkpoint)")


def with_batchnorm_axis(state: TrainState, axis_name: str | None = DATA_AXIS) -> TrainState:
    """The same state with every BatchNorm reducing its batch statistics over `axis_name`.

    Needed for training under ``shard_map`` (statistics of the global batch, as on one
    device); ``None`` switches back to per-device statistics.
    """
    model = nnx.merge(state.graphdef, state.params, state.batch_stats)
    for bn in training.batchnorm_modules(model):
        bn.axis_name = axis_name
    graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    return state.replace(graphdef=graphdef)


def make_parallel_train_step(
    mesh: Mesh,
    *,
    label_smoothing: float = 0.0,
    axis_name: str = DATA_AXIS,
    donate: bool = False,
    mix: MixConfig | None = None,
    mix_seed: int = 0,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """A jit-compiled ``shard_map`` train step: each device runs its shard of the batch.

    The state must come from :func:`with_batchnorm_axis` (BatchNorm statistics over the whole
    mesh); it is replicated, images and labels are sharded along `axis_name`. `mix` and
    `mix_seed`: MixUp / CutMix per device (:func:`resnext_flax.training.train_step_fn`).
    """
    step = training.train_step_fn(label_smoothing=label_smoothing, axis_name=axis_name,
                                  mix=mix, mix_seed=mix_seed)
    per_device = jax.shard_map(
        step, mesh=mesh, in_specs=(P(), P(axis_name), P(axis_name)), out_specs=(P(), P())
    )
    return jax.jit(per_device, donate_argnums=(0,) if donate else ())


def make_parallel_predict(
    mesh: Mesh, *, axis_name: str = DATA_AXIS
) -> Callable[[TrainState, jax.Array], jax.Array]:
    """Jit-compiled per-device inference (eval mode): logits sharded like the images."""
    per_device = jax.shard_map(
        training.predict_fn, mesh=mesh, in_specs=(P(), P(axis_name)), out_specs=P(axis_name)
    )
    return jax.jit(per_device)


def make_parallel_eval_step(
    mesh: Mesh, *, axis_name: str = DATA_AXIS
) -> Callable[[TrainState, jax.Array, jax.Array], Metrics]:
    """Jit-compiled per-device eval step; the summed loss and correct count of the batch."""
    step = training.eval_step_fn(axis_name=axis_name)
    per_device = jax.shard_map(
        step, mesh=mesh, in_specs=(P(), P(axis_name), P(axis_name)), out_specs=P()
    )
    return jax.jit(per_device)


_COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)"
                         r"(?:-start)?\(")


def collectives(jitted: Callable[..., Any], *args: Any) -> dict[str, int]:
    """Count the collective ops in the compiled program of ``jitted(*args)``.

    For checking how XLA partitioned a step: e.g. ``all-gather`` in a GSPMD ResNeXt step is
    the batch being gathered for grouped convolutions (openxla/xla#47945).
    """
    text = jitted.lower(*args).compile().as_text()
    return dict(collections.Counter(m.group(1) for m in _COLLECTIVE.finditer(text)))
