"""torchvision's initializers, and a batched path that builds a model's random weights fast.

Built eagerly, a model's initialization dispatches one small XLA program per parameter, and
every new parameter shape compiles a new program, so building a model would be dominated by
compilation. Inside :func:`batched_init`, the initializers below only record
what they would draw (the key, the shape, the distribution); :func:`materialize` then draws
every parameter through one compiled program that produces fixed-size chunks of the same
random stream, batched over parameters. ``jax.random`` with the (default) partitionable
Threefry draws element ``i`` of an array from the key and ``i`` alone, so a chunk at offset
``i`` holds exactly the elements ``jax.random.normal(key, shape)`` would hold there: the
values are bit-identical to the eager initializers' (tested), only the compilations are shared.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.random import threefry2x32_p

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated normal.
_conv_kernel_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear: kaiming_uniform_(a=sqrt(5)) is uniform(+-1/sqrt(fan_in)).
_linear_kernel_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


M = TypeVar("M", bound=nnx.Module)


@dataclasses.dataclass(frozen=True)
class Deferred:
    """A parameter to be drawn later: ``uniform(key, shape, minval, maxval) * scale``, or
    ``normal(key, shape) * scale`` when `normal` (float32)."""

    key: jax.Array
    shape: tuple[int, ...]
    normal: bool
    minval: float = -1.0
    maxval: float = 1.0
    scale: np.float32 | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


_recording: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "resnext_flax_batched_init", default=False)
_abstract: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "resnext_flax_abstract_init", default=False)


def abstract_value(shape: Sequence[int], dtype) -> jax.ShapeDtypeStruct | None:
    """Inside :func:`abstract_model`, what an initializer returns instead of drawing (None
    outside it)."""
    if not _abstract.get():
        return None
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _defer(key: jax.Array, shape: Sequence[int], dtype) -> bool:
    """Whether to record instead of drawing: inside batched_init, float32, Threefry keys."""
    return (_recording.get() and jnp.dtype(dtype) == jnp.float32
            and not isinstance(key, jax.core.Tracer)  # nnx.eval_shape, jit: nothing to draw
            and jax.config.jax_threefry_partitionable
            and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
            and str(jax.random.key_impl(key)) == "threefry2x32")


def _fans(shape: Sequence[int]) -> tuple[int, int]:
    """(fan_in, fan_out) as jax.nn.initializers computes them (in axis -2, out axis -1)."""
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def conv_kernel_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32):
    """kaiming-normal, fan_out (torchvision's conv init) for an HWIO kernel."""
    if (abstract := abstract_value(shape, dtype)) is not None:
        return abstract
    if not _defer(key, shape, dtype):
        return _conv_kernel_init(key, shape, dtype)
    # The float32 variance and its (correctly rounded) square root, as the eager init has them.
    scale = np.sqrt(np.float32(2.0 / _fans(shape)[1]))
    return Deferred(key, tuple(shape), normal=True, scale=scale)


def linear_kernel_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32):
    """torch.nn.Linear's weight init, uniform(+-1/sqrt(fan_in)), for an (in, out) kernel."""
    if (abstract := abstract_value(shape, dtype)) is not None:
        return abstract
    if not _defer(key, shape, dtype):
        return _linear_kernel_init(key, shape, dtype)
    variance = np.float32((1.0 / 3.0) / _fans(shape)[0])
    return Deferred(key, tuple(shape), normal=False, scale=np.sqrt(np.float32(3) * variance))


def linear_bias_init(fan_in: int):
    """torch.nn.Linear's bias init: uniform(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32):
        if (abstract := abstract_value(shape, dtype)) is not None:
            return abstract
        if not _defer(key, shape, dtype):
            return jax.random.uniform(key, shape, dtype, -bound, bound)
        return Deferred(key, tuple(shape), normal=False, minval=-bound, maxval=bound)

    return init


@contextlib.contextmanager
def batched_init() -> Iterator[None]:
    """Inside the block, the initializers above record their draws (see the module
    docstring); call :func:`materialize` on the module built inside it."""
    token = _recording.set(True)
    try:
        yield
    finally:
        _recording.reset(token)


class _NoKeys:
    """Stands in for ``nnx.Rngs`` in :func:`abstract_model`: nothing is drawn there, so no key
    is made (making one compiles programs)."""

    def __getattr__(self, name: str) -> Callable[[], None]:
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda: None

    def __call__(self) -> None:
        return None


def abstract_model(build: Callable[[nnx.Rngs], M]) -> M:
    """``nnx.eval_shape(lambda: build(nnx.Rngs(0)))`` for a module whose arrays all come from
    the initializers here (and ``nn.layers``' constants): every parameter a
    ``jax.ShapeDtypeStruct``, nothing drawn, allocated or traced (tracing the initializers
    costs more than building the module), and `build` given random streams that make no key.
    A module that needs real keys or builds other arrays falls back to ``nnx.eval_shape``."""
    token = _abstract.set(True)
    try:
        module = build(_NoKeys())
    except Exception:
        module = None
    finally:
        _abstract.reset(token)
    if module is not None and all(
            isinstance(v.get_value(), jax.ShapeDtypeStruct)
            for _, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)):
        return module
    return nnx.eval_shape(lambda: build(nnx.Rngs(0)))


def materialize(module: nnx.Module) -> nnx.Module:
    """Draw every recorded parameter of `module` (built inside :func:`batched_init`), in place;
    returns `module`."""
    pending = [var for _, var in nnx.iter_graph(module)
               if isinstance(var, nnx.Variable) and isinstance(var.get_value(), Deferred)]
    if pending:
        values = _draw([var.get_value() for var in pending])
        for var, value in zip(pending, values, strict=True):
            var.set_value(jax.device_put(value))  # jnp.asarray compiles once per shape
    return module


# Elements per chunk, and chunks per compiled call (one program for every model).
_CHUNK = 1 << 14
_CHUNKS_PER_CALL = 64


def _draw(requests: list[Deferred]) -> list[np.ndarray]:
    # Key by key: stacking the keys would compile a program per parameter count.
    key_data = np.stack([np.asarray(jax.random.key_data(r.key)) for r in requests])
    rows = []  # (request index, offset) per chunk
    for index, request in enumerate(requests):
        rows += [(index, offset) for offset in range(0, request.size, _CHUNK)]
    columns = {
        "k1": np.array([key_data[i, 0] for i, _ in rows], np.uint32),
        "k2": np.array([key_data[i, 1] for i, _ in rows], np.uint32),
        "offset": np.array([o for _, o in rows], np.uint32),
        "normal": np.array([requests[i].normal for i, _ in rows]),
        "minval": np.array([requests[i].minval for i, _ in rows], np.float32),
        "maxval": np.array([requests[i].maxval for i, _ in rows], np.float32),
    }
    calls = []  # dispatched first, read back after: the draws run while Python goes on
    for start in range(0, len(rows), _CHUNKS_PER_CALL):
        part = {k: v[start:start + _CHUNKS_PER_CALL] for k, v in columns.items()}
        short = _CHUNKS_PER_CALL - len(part["k1"])
        part = {k: np.concatenate([v, np.repeat(v[-1:], short)]) for k, v in part.items()}
        calls.append((_draw_chunks(**part), _CHUNKS_PER_CALL - short))
    flat = np.concatenate([np.asarray(values)[:count] for values, count in calls])
    out, row = [], 0
    for request in requests:
        count = -(-request.size // _CHUNK)
        values = flat[row:row + count].reshape(-1)[:request.size].reshape(request.shape)
        row += count
        out.append(values if request.scale is None else values * request.scale)
    return out


@jax.jit
def _draw_chunks(k1, k2, offset, normal, minval, maxval) -> jax.Array:
    """(chunks, _CHUNK) float32: elements ``offset .. offset + _CHUNK`` of each chunk's key's
    stream, as ``jax.random.normal`` (where `normal`) or ``jax.random.uniform(minval, maxval)``
    would draw them: the same Threefry counters and the same float operations."""

    def chunk(k1, k2, offset, normal, minval, maxval):
        counts = offset + jax.lax.iota(np.uint32, _CHUNK)
        bits1, bits2 = threefry2x32_p.bind(k1, k2, jnp.zeros_like(counts), counts)
        bits = bits1 ^ bits2
        # jax.random.uniform: random mantissa with exponent 0, i.e. a float in [1, 2), minus 1.
        float_bits = jax.lax.shift_right_logical(bits, np.uint32(32 - 23)) | np.uint32(
            np.array(1.0, np.float32).view(np.uint32))
        floats = jax.lax.bitcast_convert_type(float_bits, jnp.float32) - np.float32(1.0)
        # jax.random.normal: uniform on (-1, 1), then sqrt(2) * erfinv.
        low = np.nextafter(np.float32(-1.0), np.float32(0.0))
        high = np.float32(1.0)
        u = jax.lax.max(low, floats * (high - low) + low)
        gaussian = jax.lax.mul(np.float32(np.sqrt(2)), jax.lax.erf_inv(u))
        uniform = jax.lax.max(minval, floats * (maxval - minval) + minval)
        return jnp.where(normal, gaussian, uniform)

    return jax.vmap(chunk)(k1, k2, offset, normal, minval, maxval)
