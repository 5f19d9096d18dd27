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
from resnext_flax.nn.layers import BatchNorm, block_output


def _check_folded(block: nnx.Module) -> None:
    if any(isinstance(m, BatchNorm) for _, m in nnx.iter_graph(block)):
        raise ValueError("fuse only blocks whose BatchNorms are folded (models.folding."
                         "fold_batchnorm)")


class FusedBlock(nnx.Module):
    """A :class:`~resnext_flax.models.resnet.BasicBlock` or
    :class:`~resnext_flax.models.resnet.Bottleneck` with folded BatchNorms, fused: every conv
    but the last applies its ReLU, the last adds the shortcut before its ReLU."""

    def __init__(self, block: BasicBlock | Bottleneck):
        _check_folded(block)
        self.expansion = block.expansion
        self.conv_names = tuple(n for n in ("conv1", "conv2", "conv3") if hasattr(block, n))
        for name in self.conv_names:
            setattr(self, name, getattr(block, name))
        self.downsample = block.downsample

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.downsample is None else sequential(self.downsample, x)
        *inner, last = (getattr(self, name) for name in self.conv_names)
        out = x
        for conv in inner:
            out = conv(out, relu=True)
        return block_output(last(out, residual=identity, relu=True), last.policy)


def fuse_blocks(model: ResNet) -> ResNet:
    """Swap every block of a BatchNorm-folded `model` for its inference block, in place;
    returns `model`."""
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        blocks = getattr(model, stage)
        setattr(model, stage, nnx.List([FusedBlock(b) if isinstance(b, BasicBlock | Bottleneck)
                                        else b for b in blocks]))
    return model
