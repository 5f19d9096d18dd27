"""Inference blocks: a residual block whose BatchNorms are folded into its convs, computing
``relu(conv(x) + bias + shortcut)`` with bias, residual and ReLU handed to each conv (one op
where the compiled kernel's GEMM runs it) and the block's output kept in memory once.

``optimize_for_inference`` swaps each block of a folded ResNet for one of these; they keep the
block's attribute names (``conv1``..``conv3``, ``downsample``), so the module tree and its
state keep torchvision's names.
"""

from __future__ import annotations

import jax
from flax import nnx

from resnext_flax.models.resnet import BasicBlock, Bottleneck, ResNet, sequential
from resnext_flax.nn.layers import BatchNorm, Conv, block_output


def _check_folded(block: nnx.Module) -> None:
    if any(isinstance(m, BatchNorm) for _, m in nnx.iter_graph(block)):
        raise ValueError("fuse only blocks whose BatchNorms are folded (models.folding."
                         "fold_batchnorm)")


class FusedBasicBlock(nnx.Module):
    """:class:`~resnext_flax.models.resnet.BasicBlock` with folded BatchNorms, fused."""

    expansion = BasicBlock.expansion

    def __init__(self, block: BasicBlock):
        _check_folded(block)
        self.conv1: Conv = block.conv1
        self.conv2: Conv = block.conv2
        self.downsample = block.downsample

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.downsample is None else sequential(self.downsample, x)
        out = self.conv1(x, relu=True)
        return block_output(self.conv2(out, residual=identity, relu=True), self.conv2.policy)


class FusedBottleneck(nnx.Module):
    """:class:`~resnext_flax.models.resnet.Bottleneck` with folded BatchNorms, fused."""

    expansion = Bottleneck.expansion

    def __init__(self, block: Bottleneck):
        _check_folded(block)
        self.conv1: Conv = block.conv1
        self.conv2: Conv = block.conv2
        self.conv3: Conv = block.conv3
        self.downsample = block.downsample

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.downsample is None else sequential(self.downsample, x)
        out = self.conv1(x, relu=True)
        out = self.conv2(out, relu=True)
        return block_output(self.conv3(out, residual=identity, relu=True), self.conv3.policy)


_FUSED = {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}


def fuse_blocks(model: ResNet) -> ResNet:
    """Swap every block of a BatchNorm-folded `model` for its inference block, in place;
    returns `model`."""
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        blocks = getattr(model, stage)
        setattr(model, stage, nnx.List([_FUSED[type(b)](b) if type(b) in _FUSED else b
                                        for b in blocks]))
    return model
