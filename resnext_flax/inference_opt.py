"""Inference-only rewrite of a ResNet: BatchNorm folded into the convs, a pure jittable apply.

In eval mode BatchNorm is an affine map per channel, ``y = conv(x, k) * m + b`` with
``m = scale / sqrt(var + eps)`` and ``b = bias - mean * m``; folding ``m`` into the kernel
(``k * m`` along O) leaves a conv plus a bias that XLA fuses with the ReLU and the residual
add. On CPU that saves little time (XLA already fused the BN affine into that elementwise loop;
docs/performance.md); the point is the form: a pytree of arrays
(``FoldedResNet.params``) plus a static, hashable structure (the ``ModelSpec``), so one
``jax.jit`` compiles it once per input shape, and the NNX module graph is never walked per
call (PITFALLS 18).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from resnext_flax import ops
from resnext_flax.layers import BatchNorm, Conv
from resnext_flax.model import FEATURE_NAMES, ResNet, check_input
from resnext_flax.variants import ModelSpec

Params = dict[str, Any]
_STAGES = ("layer1", "layer2", "layer3", "layer4")


def fold_conv_bn(conv: Conv, bn: BatchNorm) -> dict[str, jax.Array]:
    """The kernel (HWIO, float32) and bias of ``bn(conv(x))`` in eval mode, as one conv."""
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    multiplier = f32(bn.scale.get_value()) * jax.lax.rsqrt(f32(bn.var.get_value()) + bn.epsilon)
    bias = f32(bn.bias.get_value()) - f32(bn.mean.get_value()) * multiplier
    kernel = f32(conv.kernel.get_value()) * multiplier
    return {"kernel": kernel, "bias": bias}


def _fold_block(block: nnx.Module) -> Params:
    pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    out = {c: fold_conv_bn(getattr(block, c), getattr(block, b))
           for c, b in pairs if hasattr(block, c)}
    if block.downsample is not None:
        conv, bn = block.downsample
        out["downsample"] = fold_conv_bn(conv, bn)
    return out


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class FoldedResNet:
    """A ResNet with BatchNorm folded away: ``params`` (arrays) + ``spec`` (static).

    Call it on NHWC images for logits (jitted per input shape), or use
    :meth:`forward_features`; both equal the eval-mode model's outputs up to float rounding
    (relative ~1e-7 in float32). It is a pytree, so it can also be passed through your own
    ``jax.jit`` as an argument. ``dtype`` is the compute dtype (None: the input's dtype);
    folded parameters stay float32 and are cast at use, as the model's ``Conv`` does.
    """

    params: Params
    spec: ModelSpec
    dtype: Any = None

    def tree_flatten(self):
        return (self.params,), (self.spec, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits (N, num_classes) for NHWC images (N, H, W, 3)."""
        check_input(x)
        return _jit_logits(self.params, x, spec=self.spec, dtype=self.dtype)

    def forward_features(self, x: jax.Array) -> dict[str, jax.Array]:
        """The model's ``forward_features`` outputs (stem, layer1-4, pre_logits)."""
        check_input(x)
        return _jit_features(self.params, x, spec=self.spec, dtype=self.dtype)


def optimize_for_inference(model: ResNet) -> FoldedResNet:
    """Fold every BatchNorm of `model` into its conv (eval-mode statistics) for fast inference.

    The model itself is not changed, and neither are its results: ``folded(x)`` equals
    ``model.eval(); model(x)`` to float rounding. Training-mode behaviour (batch statistics)
    is not represented: fold again after further training.
    """
    params: Params = {"conv1": fold_conv_bn(model.conv1, model.bn1)}
    for name in _STAGES:
        params[name] = [_fold_block(block) for block in getattr(model, name)]
    params["fc"] = {
        "kernel": model.fc.kernel.get_value().astype(jnp.float32),
        "bias": model.fc.bias.get_value().astype(jnp.float32),
    }
    return FoldedResNet(params, model.spec, model.dtype)


def _conv(p: Params, x: jax.Array, *, stride: int = 1, groups: int = 1) -> jax.Array:
    kernel = p["kernel"].astype(x.dtype)
    y = ops.conv2d(x, kernel, stride=stride, padding=kernel.shape[0] // 2, groups=groups)
    return y + p["bias"].astype(x.dtype)


def _block(p: Params, x: jax.Array, *, stride: int, spec: ModelSpec) -> jax.Array:
    identity = x if "downsample" not in p else _conv(p["downsample"], x, stride=stride)
    if spec.block == "basic":
        out = jax.nn.relu(_conv(p["conv1"], x, stride=stride))
        out = _conv(p["conv2"], out)
    else:
        out = jax.nn.relu(_conv(p["conv1"], x))
        out = jax.nn.relu(_conv(p["conv2"], out, stride=stride, groups=spec.groups))
        out = _conv(p["conv3"], out)
    return jax.nn.relu(out + identity)


def apply_features(
    params: Params, x: jax.Array, *, spec: ModelSpec, dtype: Any = None
) -> dict[str, jax.Array]:
    """Pure function: folded params and NHWC images -> ``forward_features``' dict."""
    x = x.astype(dtype or x.dtype)
    out = jax.nn.relu(_conv(params["conv1"], x, stride=2))
    out = ops.max_pool(out, window=3, stride=2, padding=1)
    features = {"stem": out}
    for index, name in enumerate(_STAGES):
        for b, block in enumerate(params[name]):
            stride = 2 if index > 0 and b == 0 else 1
            out = _block(block, out, stride=stride, spec=spec)
        features[name] = out
    features["pre_logits"] = jnp.mean(out.astype(jnp.float32), axis=(1, 2)).astype(out.dtype)
    assert tuple(features) == FEATURE_NAMES
    return features


def apply_logits(params: Params, x: jax.Array, *, spec: ModelSpec, dtype: Any = None):
    """Pure function: folded params and NHWC images -> logits (N, num_classes)."""
    pre_logits = apply_features(params, x, spec=spec, dtype=dtype)["pre_logits"]
    fc = params["fc"]
    return pre_logits @ fc["kernel"].astype(pre_logits.dtype) + fc["bias"].astype(
        pre_logits.dtype
    )


_jit_logits = jax.jit(apply_logits, static_argnames=("spec", "dtype"))
_jit_features = jax.jit(apply_features, static_argnames=("spec", "dtype"))

