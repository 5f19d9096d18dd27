"""Inference-time fusion inside the module tree: every BatchNorm folded into its conv.

In eval mode BatchNorm is an affine map per channel, ``y = conv(x, k) * m + b`` with
``m = scale / sqrt(var + eps)`` and ``b = bias - mean * m``; folding ``m`` into the kernel
(``k * m`` along O) leaves a conv with a bias. :func:`fold_batchnorm` returns the *same*
``ResNet`` module tree with biased convs and :class:`~resnext_flax.nn.layers.Identity` in place
of each BatchNorm, so it runs through the plain ``ResNet.__call__``;
:func:`optimize_for_inference` also sets a ``ConvPolicy`` on every conv, swaps each block for
its fused inference block (``models.fused``) and wraps the result for a hot loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnext_flax.models.functional import CompiledModel
from resnext_flax.models.fused import fuse_blocks
from resnext_flax.models.resnet import ResNet
from resnext_flax.nn import heap
from resnext_flax.nn.layers import BatchNorm, Conv, Identity, set_conv_policy
from resnext_flax.nn.policy import DEFAULT_POLICY, ConvPolicy

# Folding and kernel preparation compile a program per distinct kernel shape (and two over
# every BatchNorm's concatenated vectors), not per operation and shape as eager arithmetic
# does, so their count does not grow with depth and a second model of an architecture compiles
# nothing (JAX's persistent cache keeps them too). Products and the sums after them are
# separate programs: within one program the compiler may contract a product and the sum after
# it into one fma, which rounds once where the separate operations round twice. Pure relayouts
# (concatenating, splitting, the compiled kernel's layout) run on the host.


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


@jax.jit
def _multipliers(scale: jax.Array, var: jax.Array, mean: jax.Array, conv_bias: jax.Array,
                 epsilon: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``m = scale / sqrt(var + eps)`` per channel and ``(mean - conv_bias) * m``, what the
    folded bias subtracts from the BatchNorm's bias (float32), over every BatchNorm's
    concatenated vectors at once."""
    multiplier = _f32(scale) * jax.lax.rsqrt(_f32(var) + epsilon)
    return multiplier, (_f32(mean) - _f32(conv_bias)) * multiplier


@jax.jit
def _scaled(kernel: jax.Array, multiplier: jax.Array) -> jax.Array:
    """The folded kernel, ``kernel * m`` along O (float32)."""
    return _f32(kernel) * multiplier


@jax.jit
def _differences(minuends: jax.Array, subtrahends: jax.Array) -> jax.Array:
    """The folded biases, ``bias - (mean - conv_bias) * m`` (float32)."""
    return _f32(minuends) - subtrahends


def _channels(bn: BatchNorm) -> int:
    return bn.scale.get_value().shape[-1]


def _concatenated(vectors: list) -> np.ndarray:
    return np.concatenate([np.asarray(v) for v in vectors])


def _fold_convs(convs: list[tuple[Conv, BatchNorm | None]], prepare: bool) -> None:
    """Fold each pair's BatchNorm into its conv and (if `prepare`) prepare every conv's
    kernel, in place."""
    folds = [(conv, bn) for conv, bn in convs if bn is not None]
    if folds:
        bns = [bn for _, bn in folds]
        multipliers, shifts = _multipliers(
            *(_concatenated([getattr(bn, name).get_value() for bn in bns])
              for name in ("scale", "var", "mean")),
            _concatenated([np.zeros(_channels(bn), np.float32) if conv.bias is None
                           else conv.bias.get_value() for conv, bn in folds]),
            np.concatenate([np.full(_channels(bn), bn.epsilon, np.float32) for bn in bns]))
        biases = np.asarray(_differences(_concatenated([bn.bias.get_value() for bn in bns]),
                                         shifts))
        splits = np.cumsum([_channels(bn) for bn in bns])[:-1]
        multipliers = np.split(np.asarray(multipliers), splits)
        for (conv, _), multiplier, bias in zip(folds, multipliers, np.split(biases, splits),
                                               strict=True):
            conv.kernel.set_value(_scaled(conv.kernel.get_value(), multiplier))
            bias = jax.device_put(bias)
            if conv.bias is None:
                conv.bias = nnx.data(nnx.Param(bias))
            else:
                conv.bias.set_value(bias)
            conv.use_prepared(None)  # forms of the earlier kernel are stale
    if prepare:
        for conv, _ in convs:
            conv.prepare_for_inference()


def fold_conv_bn(conv: Conv, bn: BatchNorm) -> Conv:
    """One conv (float32 kernel and bias) computing ``bn(conv(x))`` in eval mode (a bias
    the conv has is folded in too)."""
    fused = nnx.clone(conv)
    _fold_convs([(fused, bn)], prepare=False)
    return fused


# (conv, BatchNorm) attribute pairs of the stem and of each block.
_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def check_not_optimized(model: Any, what: str) -> None:
    """TypeError if `model` is ``optimize_for_inference``'s result, which `what` (a function
    that starts from an unfolded model) cannot take."""
    if isinstance(model, CompiledModel):
        raise TypeError(f"{what}: this model is already optimized for inference (its "
                        "BatchNorms are folded into its convs); pass the model it was made "
                        "from, e.g. to choose another policy")


def _unfold_structure(model: ResNet) -> list[tuple[Conv, BatchNorm | None]]:
    """Swap every BatchNorm of `model` that follows a conv for an Identity, in place; returns
    every conv with the BatchNorm it had (None: none), for :func:`_fold_convs`."""
    pairs = {}

    def take(module: nnx.Module, conv_name: str, bn_name: str) -> None:
        bn = getattr(module, bn_name, None)
        if isinstance(bn, BatchNorm):
            pairs[id(getattr(module, conv_name))] = bn
            setattr(module, bn_name, Identity())

    for conv_name, bn_name in _PAIRS:
        take(model, conv_name, bn_name)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(model, stage):
            for conv_name, bn_name in _PAIRS:
                take(block, conv_name, bn_name)
            if block.downsample is not None and isinstance(block.downsample[1], BatchNorm):
                conv, bn = block.downsample
                pairs[id(conv)] = bn
                block.downsample = nnx.List([conv, Identity()])
    return [(conv, pairs.get(id(conv))) for _, conv in nnx.iter_graph(model)
            if isinstance(conv, Conv)]


def is_folded(model: Any) -> bool:
    """Whether `model` has its BatchNorms folded into its convs: ``optimize_for_inference``'s
    result, its ``module()``, or ``fold_batchnorm``'s result. Such a model has lost the
    BatchNorm statistics (they are now part of the kernels and biases): it can predict, but
    not be trained, unfolded or saved in torchvision's layout."""
    if isinstance(model, CompiledModel):
        return True
    return isinstance(model, ResNet) and not isinstance(model.bn1, BatchNorm)


def fold_batchnorm(model: ResNet) -> ResNet:
    """A copy of `model` with every BatchNorm folded into the conv before it (eval-mode
    statistics); `model` itself is not changed. The result is an ordinary ``ResNet`` whose
    outputs equal ``model.eval(); model(x)`` up to float rounding.
    Training-mode behaviour (batch statistics) is gone: fold again after further training.
    ``optimize_for_inference``'s result is refused (TypeError): there is nothing to fold.
    """
    check_not_optimized(model, "fold_batchnorm")
    folded = nnx.clone(model)
    _fold_convs(_unfold_structure(folded), prepare=False)
    return folded


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class FoldedResNet(CompiledModel):
    """A BatchNorm-folded ResNet split once into a static structure and arrays.

    Call it on NHWC images for logits, or use ``forward_features``; each runs the program
    every wrapper of an equal model shares (``models.programs``), compiled once per input shape
    and merging the module only inside the trace. It is a pytree, so it also passes through
    your own ``jax.jit`` as an argument.
    """

    @property
    def spec(self) -> Any:
        return self.module().spec

    @property
    def num_classes(self) -> int:
        return self.module().num_classes

    @property
    def pretrained_cfg(self) -> Any:
        """What the source model was loaded with (``metadata.PretrainedCfg``), or None."""
        return getattr(self.module(), "pretrained_cfg", None)


def optimize_for_inference(model: ResNet, *,
                           policy: ConvPolicy = DEFAULT_POLICY) -> FoldedResNet:
    """Fold every BatchNorm of `model` into its conv for fast inference, give every conv
    `policy`, fuse bias, residual and ReLU into the convs' epilogues (``policy.fuse``:
    inference blocks, ``models.fused``), and precompute each conv's kernel in the forms its
    lowerings consume (``Conv.prepare_for_inference``; on the CPU, Winograd-transformed tiles
    and the compiled kernel's blocked layout: more memory for those 3x3 kernels, no per-call
    transform). `model` itself is not changed, and ``folded(x)`` equals
    ``model.eval(); model(x)`` to float rounding.

    The result is for weights that no longer change: the prepared kernels are derived from the
    weights once, so parameters written into it afterwards (``nnx.update`` on its
    ``module()``, which shares its arrays) are not seen by them. Optimize the changed model
    again instead.

    On the CPU, under a policy that may run the compiled kernel, it also keeps freed large
    blocks in glibc's heap for the next call
    (``nn.heap.keep_freed_memory``: no page faults on fresh activations; the process keeps its
    peak memory), unless ``RESNEXT_FLAX_MALLOC_DEFAULTS=1``."""
    check_not_optimized(model, "optimize_for_inference")
    if jax.default_backend() == "cpu" and policy.uses_kernels:  # not for export's pure XLA
        heap.keep_freed_memory()
    folded = set_conv_policy(nnx.clone(model), policy)
    # Folding and kernel preparation: a few programs per distinct kernel shape.
    _fold_convs(_unfold_structure(folded), prepare=True)
    if policy.fuse:
        fuse_blocks(folded)
    return FoldedResNet.from_module(folded)


def with_prepared_kernels(model: nnx.Module) -> nnx.Module:
    """A copy of `model` (over the same arrays; BatchNorm not folded) whose convs hold their
    kernels prepared for their lowerings (``Conv.prepare_for_inference``), for a long run over
    fixed weights (``evaluate``): Winograd then runs where its policy chooses it, without
    transforming the kernel inside the program."""
    prepared = nnx.merge(*nnx.split(model))
    for _, module in nnx.iter_graph(prepared):
        if isinstance(module, Conv):
            module.prepare_for_inference()
    return prepared
