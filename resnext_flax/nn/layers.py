"""Layers with torch's semantics: Conv (HWIO kernel, symmetric padding, a ``ConvPolicy``
choosing its lowering), BatchNorm (torch momentum, unbiased running variance) and Linear,
initialized the way torchvision initializes; Identity stands in for a BatchNorm folded into its
conv."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnext_flax.nn import ops
from resnext_flax.nn.init import (
    abstract_value,
    conv_kernel_init,
    linear_bias_init,
    linear_kernel_init,
)
from resnext_flax.nn.policy import DEFAULT_POLICY, ConvPolicy


def _constant(value: float, size: int, dtype) -> jax.Array | jax.ShapeDtypeStruct:
    """A filled vector, made on the host and put on the device: an eager jnp.full (or
    jnp.asarray) would compile a program once per size. (Its shape alone in
    ``nn.init.abstract_model``.)"""
    abstract = abstract_value((size,), dtype)
    if abstract is not None:
        return abstract
    return jax.device_put(np.full((size,), value, dtype=jnp.dtype(dtype)))


class PreparedKernel(nnx.Variable):
    """A conv kernel precomputed for its lowerings (``nn.lowering.conv.prepare_kernel``:
    lowering -> array); not a parameter: derived from the kernel, for inference only."""


def _on_cpu_lowerings(policy: ConvPolicy) -> bool:
    """Whether a conv may run through ``nn.lowering`` (imported only then): on the CPU, under a
    policy other than XLA's own conv."""
    return policy.lowering != "xla" and jax.default_backend() == "cpu"


class Conv(nnx.Module):
    """2-D convolution, NHWC in and out, kernel stored HWIO; bias-free unless `use_bias`.

    The kernel's I axis is ``in_channels // groups`` exactly as torch's weight stores it, so
    grouped (ResNeXt) kernels map to torch by a plain transpose. torchvision's convs have no
    bias; a bias appears when a BatchNorm is folded into the conv (``models.folding``).
    `policy` (static, part of the graph definition) chooses how the conv is computed; every
    choice computes the same conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        use_bias: bool = False,
        policy: ConvPolicy = DEFAULT_POLICY,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"channels ({in_channels} in, {out_channels} out) must be divisible by "
                f"groups={groups}"
            )
        shape = (kernel_size, kernel_size, in_channels // groups, out_channels)
        self.kernel = nnx.Param(conv_kernel_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(_constant(0.0, out_channels, param_dtype)) if use_bias else None
        self.stride = stride
        self.padding = padding
        self.groups = groups
        self.dtype = dtype
        self.policy = _checked_policy(policy)
        # The kernel transformed for its lowerings, for inference (prepare_for_inference).
        self.prepared: PreparedKernel | None = nnx.data(None)

    @property
    def prepared_for(self) -> tuple[str, ...] | None:
        """The lowerings the kernel is prepared for (None: not prepared)."""
        return None if self.prepared is None else tuple(sorted(self.prepared.get_value()))

    @property
    def preparation(self) -> Preparation | None:
        """How this conv's kernel is prepared (static), or None where its lowerings have
        nothing to precompute: a compute dtype other than float32, or a policy that never runs
        ``nn.lowering``."""
        if self.dtype in (None, jnp.float32) and _on_cpu_lowerings(self.policy):
            return Preparation(self.stride, self.groups, self.policy)
        return None

    def prepare_for_inference(self) -> None:
        """Precompute the kernel in the forms its conv lowerings consume under its policy (on
        the CPU: Winograd's transform, by a compiled program per kernel shape; the compiled
        kernel's layout, a relayout, on the host), so a compiled inference program does not
        redo them on every call. Only for weights that no longer change: a changed kernel (or
        policy) must be prepared again."""
        preparation = self.preparation
        kernel = self.kernel.get_value()
        forms = () if preparation is None else preparation.forms(kernel.shape, kernel.dtype)
        prepared = {}
        if "ffi" in forms:
            prepared["ffi"] = jax.device_put(preparation.blocked(np.asarray(kernel)))
        if "winograd" in forms:
            prepared["winograd"] = preparation.winograd_tiles_jit(kernel)
        self.use_prepared(prepared)

    def use_prepared(self, forms: Mapping[str, Any] | None) -> None:
        """Attach kernel forms computed from this conv's current kernel (lowering -> array, as
        ``nn.lowering.conv.prepare_kernel`` gives them; None or empty: none)."""
        self.prepared = nnx.data(None if not forms else PreparedKernel(dict(forms)))

    def __call__(self, x: jax.Array, *, residual: jax.Array | None = None,
                 relu: bool = False) -> jax.Array:
        """The conv (plus bias); then ``+ residual`` and ReLU if asked: a conv with a folded
        BatchNorm applies what follows it in one op where the compiled kernel runs it."""
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        kernel = self.kernel.get_value().astype(dtype)
        bias = None if self.bias is None else self.bias.get_value().astype(dtype)
        if not _on_cpu_lowerings(self.policy):
            y = ops.conv_xla(x, kernel, self.stride, self.padding, self.groups)
            return ops.epilogue(y, bias, residual, relu)
        from resnext_flax.nn.lowering import conv

        return conv.conv_bias_act(
            x, kernel, bias, residual=residual, relu=relu, stride=self.stride,
            padding=self.padding, groups=self.groups, policy=self.policy,
            prepared=None if self.prepared is None else self.prepared.get_value())


@dataclasses.dataclass(frozen=True)
class Preparation:
    """The static arguments of a conv's kernel preparation, and its forms (``nn.lowering``
    is imported only here, when a kernel is prepared)."""

    stride: int
    groups: int
    policy: ConvPolicy

    def forms(self, kernel_shape: tuple[int, ...], dtype: Any) -> tuple[str, ...]:
        """The forms a kernel of this shape and dtype gets (static; see
        ``nn.lowering.conv.kernel_forms``)."""
        from resnext_flax.nn.lowering import conv

        return conv.kernel_forms(tuple(kernel_shape), dtype, stride=self.stride,
                                 groups=self.groups, policy=self.policy)

    def winograd_tiles_jit(self, kernel: jax.Array) -> tuple[jax.Array, ...]:
        """The "winograd" form alone, by a compiled program per kernel shape."""
        from resnext_flax.nn.lowering import conv

        return conv.winograd_kernel_jit(kernel, self.groups)

    def blocked(self, kernel: np.ndarray) -> np.ndarray:
        """The "ffi" form alone: a pure relayout, so it runs on the host, exactly."""
        from resnext_flax.nn.lowering import kernel as ffi

        return np.ascontiguousarray(ffi.block_kernel(kernel, self.groups))


def _checked_policy(policy: ConvPolicy) -> ConvPolicy:
    if not isinstance(policy, ConvPolicy):
        raise TypeError(f"policy must be a ConvPolicy, got {type(policy).__name__}")
    return policy


def set_conv_policy(module: nnx.Module, policy: ConvPolicy) -> nnx.Module:
    """Give every ``Conv`` of `module` `policy`, in place (kernels prepared for another policy
    are dropped: prepare them again); returns `module`."""
    policy = _checked_policy(policy)
    for _, conv in nnx.iter_graph(module):
        if isinstance(conv, Conv) and conv.policy != policy:
            conv.policy = policy
            conv.prepared = nnx.data(None)
    return module


def with_conv_policy(module: nnx.Module, policy: ConvPolicy) -> nnx.Module:
    """A copy of `module` whose convs all use `policy` (benchmarks, A/B runs, export)."""
    return set_conv_policy(nnx.clone(module), policy)


def block_output(x: jax.Array, policy: ConvPolicy) -> jax.Array:
    """A residual block's output, kept in memory once where `policy` fuses and the compiled
    kernel may run (XLA:CPU otherwise recomputes every earlier block's residual add inside each
    later one); `x` unchanged elsewhere."""
    if not (policy.fuse and policy.uses_kernels and _on_cpu_lowerings(policy)):
        return x
    from resnext_flax.nn.lowering import conv

    return conv.fusion_boundary(x)


class BatchNorm(nnx.Module):
    """BatchNorm over the channel (last) axis with torch's semantics.

    Training mode normalizes with the biased batch variance and updates the running
    statistics as torch does: ``new = (1 - momentum) * old + momentum * batch`` (torch's
    momentum, not Flax's inverted one), with the *unbiased* batch variance for ``var``.
    Statistics are computed in float32 whatever the (narrower) compute dtype, in float64 for
    float64 inputs.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.1,
        epsilon: float = 1e-5,
        zero_init: bool = False,
        use_running_average: bool = False,
        axis_name: str | None = None,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        # Statistics are kept in float32 at least (float64 with float64 parameters).
        stat_dtype = jnp.promote_types(param_dtype, jnp.float32)
        self.scale = nnx.Param(_constant(0.0 if zero_init else 1.0, num_features, param_dtype))
        self.bias = nnx.Param(_constant(0.0, num_features, param_dtype))
        self.mean = nnx.BatchStat(_constant(0.0, num_features, stat_dtype))
        self.var = nnx.BatchStat(_constant(1.0, num_features, stat_dtype))
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = use_running_average
        self.axis_name = axis_name
        self.dtype = dtype

    def _batch_statistics(self, x: jax.Array) -> tuple[jax.Array, jax.Array, int]:
        """Mean and biased variance over all but the channel axis (two-pass, float32 or wider)."""
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        axes = tuple(range(x.ndim - 1))
        count = math.prod(x.shape[:-1])
        mean = jnp.mean(xf, axis=axes)
        if self.axis_name is not None:
            # Per-device programs (shard_map): statistics of the global batch.
            mean = jax.lax.pmean(mean, self.axis_name)
            count *= jax.lax.axis_size(self.axis_name)
        var = jnp.mean(jnp.square(xf - mean), axis=axes)
        if self.axis_name is not None:
            var = jax.lax.pmean(var, self.axis_name)
        return mean, var, count

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        if self.use_running_average:
            mean, var = self.mean.get_value(), self.var.get_value()
        else:
            mean, var, count = self._batch_statistics(x)
            unbiased = var * (count / max(count - 1, 1))
            m = self.momentum
            self.mean.set_value((1.0 - m) * self.mean.get_value() + m * mean)
            self.var.set_value((1.0 - m) * self.var.get_value() + m * unbiased)
        acc = jnp.promote_types(x.dtype, jnp.float32)
        multiplier = self.scale.get_value().astype(acc) * jax.lax.rsqrt(var + self.epsilon)
        # Centered, not folded into x * multiplier + (bias - mean * multiplier): the folded
        # form's gradient for the scale is sum(g * x) - mean * sum(g), which cancels
        # catastrophically in float32 when |mean| >> std.
        centered = x.astype(acc) - mean
        return (centered * multiplier + self.bias.get_value().astype(acc)).astype(dtype)


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with torch.nn.Linear's initialization; kernel stored (in, out).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel = nnx.Param(linear_kernel_init(rngs.params(), (in_features, out_features),
                                                   param_dtype))
        self.bias = nnx.Param(linear_bias_init(in_features)(rngs.params(), (out_features,),
                                                           param_dtype))
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        kernel = self.kernel.get_value().astype(dtype)
        return x.astype(dtype) @ kernel + self.bias.get_value().astype(dtype)


class Identity(nnx.Module):
    """Returns its input: a folded BatchNorm, or the head of a headless model."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x
