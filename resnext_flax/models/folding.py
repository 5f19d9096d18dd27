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
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from resnext_flax.models.functional import CompiledModel
from resnext_flax.models.fused import fuse_blocks
from resnext_flax.models.resnet import ResNet
from resnext_flax.nn.layers import BatchNorm, Conv, Identity, set_conv_policy
from resnext_flax.nn.policy import DEFAULT_POLICY, ConvPolicy


def fold_conv_bn(conv: Conv, bn: BatchNorm) -> Conv:
    """One conv (float32 kernel and bias) computing ``bn(conv(x))`` in eval mode."""
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    multiplier = f32(bn.scale.get_value()) * jax.lax.rsqrt(f32(bn.var.get_value()) + bn.epsilon)
    bias = f32(bn.bias.get_value()) - f32(bn.mean.get_value()) * multiplier
    kernel = f32(conv.kernel.get_value()) * multiplier
    kh, _, per_group, out_channels = kernel.shape
    fused = nnx.eval_shape(lambda: Conv(
        per_group * conv.groups, out_channels, kh, stride=conv.stride, padding=conv.padding,
        groups=conv.groups, use_bias=True, policy=conv.policy, dtype=conv.dtype,
        rngs=nnx.Rngs(0)))
    fused.kernel.set_value(kernel)
    fused.bias.set_value(bias)
    return fused


# (conv, BatchNorm) attribute pairs of the stem and of each block.
_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def _fold_pairs(module: nnx.Module) -> None:
    for conv_name, bn_name in _PAIRS:
        bn = getattr(module, bn_name, None)
        if isinstance(bn, BatchNorm):
            setattr(module, conv_name, fold_conv_bn(getattr(module, conv_name), bn))
            setattr(module, bn_name, Identity())


def fold_batchnorm(model: ResNet) -> ResNet:
    """A copy of `model` with every BatchNorm folded into the conv before it (eval-mode
    statistics); `model` itself is not changed. The result is an ordinary ``ResNet`` whose
    outputs equal ``model.eval(); model(x)`` up to float rounding.
    Training-mode behaviour (batch statistics) is gone: fold again after further training.
    """
    folded = nnx.clone(model)
    _fold_pairs(folded)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(folded, stage):
            _fold_pairs(block)
            if block.downsample is not None and isinstance(block.downsample[1], BatchNorm):
                conv, bn = block.downsample
                block.downsample = nnx.List([fold_conv_bn(conv, bn), Identity()])
    return folded


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class FoldedResNet(CompiledModel):
    """A BatchNorm-folded ResNet split once into a static structure and arrays.

    Call it on NHWC images for logits, or use ``forward_features``; each is one ``jax.jit``
    per input shape that merges the module inside the trace, so no module graph is walked per
    call. It is a pytree, so it also passes through your own ``jax.jit`` as an argument.
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
    again instead."""
    if isinstance(model, FoldedResNet):
        raise TypeError("this model is already optimized for inference; pass the model it "
                        "was made from to choose another policy")
    folded = set_conv_policy(fold_batchnorm(model), policy)
    if policy.fuse:
        fuse_blocks(folded)
    for _, module in nnx.iter_graph(folded):
        if isinstance(module, Conv):
            module.prepare_for_inference()
    return FoldedResNet.from_module(folded)
