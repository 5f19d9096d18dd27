"""ONNX export: the BatchNorm-folded module tree written as an ONNX graph, node by node.

A folded ResNet is only convs with a bias, ReLU, residual adds, one max-pool, a global mean and
a linear head, all of which ONNX has as standard operators (opset >= 17): the graph is emitted
here from the module tree with the ``onnx`` package's helpers rather than traced through a
converter, so each conv keeps its exact kernel, padding and groups and the file holds nothing
but standard operators. Conv + Add + ReLU stay separate nodes: ONNX Runtime's graph optimizer
fuses them.

``onnx`` and ``onnxruntime`` are optional dependencies (``pip install 'resnext-flax[onnx]'``),
imported only when a function here is called.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnext_flax.export.metadata import producer_version
from resnext_flax.models.folding import fold_batchnorm, is_folded
from resnext_flax.models.functional import CompiledModel
from resnext_flax.models.fused import FusedBlock
from resnext_flax.models.resnet import BasicBlock, Bottleneck, ResNet
from resnext_flax.nn.layers import BatchNorm, Conv, Identity, Linear

INSTALL_HINT = "pip install 'resnext-flax[onnx]'"
LAYOUTS = ("NHWC", "NCHW")
#: The oldest opset accepted: every operator used here has had its current form since 13;
#: 17 is what torchvision's export and current runtimes agree on.
MIN_OPSET = 17
INPUT_NAME = "images"
# ResNet.stem's max-pool (torch's nn.MaxPool2d(3, 2, 1)): ONNX MaxPool with explicit pads and
# ceil_mode=0 ignores the padding (as -inf does) and rounds the output size down, as JAX's
# reduce_window with explicit padding and torch do. Default attributes are spelled out, as
# torch.onnx.export spells them, so the two exports' nodes compare equal.
_STEM_POOL = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 0,
              "dilations": [1, 1]}
_BLOCKS = (BasicBlock, Bottleneck, FusedBlock)
_CONV_NAMES = ("conv1", "conv2", "conv3")


def _require(package: str) -> Any:
    """The optional `package`, or an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ImportError(f"ONNX export needs the {package!r} package, which is not installed; "
                          f"install it with: {INSTALL_HINT}") from error


def _folded(model: Any) -> ResNet:
    """The module tree of `model` with its BatchNorms folded (a copy where folding is
    needed; `model` is not changed)."""
    if isinstance(model, CompiledModel):
        model = model.module()
    if not isinstance(model, ResNet):
        raise TypeError(f"to_onnx takes a resnext_flax ResNet or optimize_for_inference's "
                        f"result, got {type(model).__name__}")
    if model.dtype not in (None, jnp.float32):
        raise ValueError(f"ONNX export writes float32 graphs; this model computes in "
                         f"{jnp.dtype(model.dtype).name}: build or load it with dtype=None "
                         "(float32) to export it")
    folded = model if is_folded(model) else fold_batchnorm(model)
    left = [path for path, m in nnx.iter_graph(folded) if isinstance(m, BatchNorm)]
    if left:
        raise ValueError(f"cannot export: BatchNorms left unfolded at {left[:3]}")
    return folded


def _float32(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


Dim = int | str


def _strided(size: Dim, kernel: int, stride: int, padding: int) -> Dim:
    """A conv's or pool's output size along one axis (floor mode), as a number or, for a
    symbolic input, a name that equal sizes share: ``floor((h + 2p - k) / 2) + 1`` with
    ``2p - k == -1`` (every stride-2 conv and pool of a ResNet) is ``ceil(h/2)``, and twice
    that is ``ceil(h/4)``. ONNX Runtime's optimizer fuses a residual Add only where it can
    tell both inputs have one shape; these names tell it."""
    if isinstance(size, int):
        return (size + 2 * padding - kernel) // stride + 1
    if stride == 1 and 2 * padding - kernel + 1 == 0:
        return size
    if stride == 2 and 2 * padding - kernel == -1:
        base, _, divisor = size.removeprefix("ceil(").removesuffix(")").partition("/")
        if size.startswith("ceil("):
            return f"ceil({base}/{int(divisor) * 2})"
        return f"ceil({size}/2)"
    return f"floor(({size} + {2 * padding - kernel}) / {stride}) + 1"


class _Graph:
    """ONNX nodes and initializers in the making, named after the module paths, with every
    intermediate tensor's NCHW shape (symbolic dimensions named) for the graph's
    ``value_info``."""

    def __init__(self, onnx: Any):
        self.helper = onnx.helper
        self.numpy_helper = onnx.numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self.shapes: dict[str, list[Dim]] = {}

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, output: str | None = None,
             shape: list[Dim] | None = None, **attributes: Any) -> str:
        """Append one node; returns its output's name (`output`, or the node's name), whose
        shape is `shape` (default: its first input's)."""
        output = output or name
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=name, **attributes))
        self.shapes[output] = list(self.shapes[inputs[0]] if shape is None else shape)
        return output

    def value_info(self, float32: int, skip: set[str]) -> list:
        """Every tensor's shape but those of `skip` (the graph's inputs and outputs)."""
        return [self.helper.make_tensor_value_info(name, float32, shape)
                for name, shape in self.shapes.items() if name not in skip]

    def conv(self, conv: Conv, x: str, name: str) -> str:
        """`conv` with its bias; the kernel goes from the library's HWIO (I = in/groups, as
        torch and ONNX store it too) to ONNX's OIHW."""
        kernel = _float32(conv.kernel.get_value())
        if conv.bias is None:
            bias = np.zeros(kernel.shape[-1], np.float32)
        else:
            bias = _float32(conv.bias.get_value())
        size = list(kernel.shape[:2])
        batch, _, height, width = self.shapes[x]
        shape = [batch, kernel.shape[-1], *(_strided(d, k, conv.stride, conv.padding)
                                            for d, k in zip((height, width), size, strict=True))]
        return self.node(
            "Conv",
            [x, self.weight(f"{name}.weight", np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))),
             self.weight(f"{name}.bias", bias)],
            name, shape=shape, kernel_shape=size, strides=[conv.stride] * 2,
            pads=[conv.padding] * 4, dilations=[1, 1], group=conv.groups)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x], f"{x}.relu")


def _block(graph: _Graph, block: nnx.Module, x: str, name: str) -> str:
    """A residual block, basic or bottleneck, folded or fused alike: every conv but the last
    followed by a ReLU, the last one's output added to the shortcut, then a ReLU."""
    if not isinstance(block, _BLOCKS):
        raise TypeError(f"cannot export {name}: a {type(block).__name__}, not a ResNet block")
    shortcut = x
    if block.downsample is not None:
        conv, rest = block.downsample[0], list(block.downsample)[1:]
        if not isinstance(conv, Conv) or not all(isinstance(m, Identity) for m in rest):
            raise TypeError(f"cannot export {name}.downsample: expected a folded conv")
        shortcut = graph.conv(conv, x, f"{name}.downsample.0")
    *inner, last = (getattr(block, n) for n in _CONV_NAMES if hasattr(block, n))
    out = x
    for index, conv in enumerate(inner, start=1):
        out = graph.relu(graph.conv(conv, out, f"{name}.conv{index}"))
    out = graph.conv(last, out, f"{name}.conv{len(inner) + 1}")
    return graph.relu(graph.node("Add", [out, shortcut], f"{name}.add"))


def _head(graph: _Graph, model: ResNet, x: str, output: str) -> str:
    """Global average pool, flatten and the linear classifier (none when headless)."""
    batch, channels = graph.shapes[x][:2]
    pooled = graph.node("GlobalAveragePool", [x], "avgpool", shape=[batch, channels, 1, 1])
    if isinstance(model.fc, Identity):
        return graph.node("Flatten", [pooled], "flatten", output, shape=[batch, channels],
                          axis=1)
    if not isinstance(model.fc, Linear):
        raise TypeError(f"cannot export fc: a {type(model.fc).__name__}, not Linear")
    flat = graph.node("Flatten", [pooled], "flatten", shape=[batch, channels], axis=1)
    weight = _float32(model.fc.kernel.get_value()).T  # (in, out) -> torch's (out, in)
    return graph.node("Gemm", [flat, graph.weight("fc.weight", np.ascontiguousarray(weight)),
                               graph.weight("fc.bias", _float32(model.fc.bias.get_value()))],
                      "fc", output, shape=[batch, weight.shape[0]], alpha=1.0, beta=1.0,
                      transB=1)


def _check_options(layout: str, opset: int, metadata: Mapping[str, str] | None,
                   newest: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(opset, int) or isinstance(opset, bool) or not (
            MIN_OPSET <= opset <= newest):
        raise ValueError(f"opset must be an int from {MIN_OPSET} to {newest} (the newest this "
                         f"onnx package knows), got {opset!r}")
    if metadata is not None and not (isinstance(metadata, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError("metadata must map str keys to str values (serialize others, e.g. "
                        "with json.dumps)")


#: A protobuf message, and so a single-file ONNX model, cannot exceed 2 GiB; the margin leaves
#: room for the graph around the weights.
MAX_ONNX_WEIGHT_BYTES = 2**31 - 2**24


def _check_size(folded: Any) -> None:
    """ValueError before any graph is built where the weights cannot fit one ONNX file."""
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(folded)))
    if size > MAX_ONNX_WEIGHT_BYTES:
        raise ValueError(f"this model's folded weights are {size / 2**30:.2f} GiB; one ONNX "
                         f"file holds at most {MAX_ONNX_WEIGHT_BYTES / 2**30:.2f} GiB (protobuf's "
                         "2 GiB limit): export it to StableHLO instead")


def _check_size_option(size: tuple[int, int] | None) -> tuple[int | str, int | str]:
    if size is None:
        return "height", "width"
    if not (isinstance(size, tuple | list) and len(size) == 2 and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in size)):
        raise ValueError(f"size must be None (symbolic) or two positive ints (height, width), "
                         f"got {size!r}")
    return int(size[0]), int(size[1])


def to_onnx(model: Any, *, layout: str = "NHWC", opset: int = 17,
            metadata: Mapping[str, str] | None = None,
            size: tuple[int, int] | None = None) -> bytes:
    """`model` (a ``ResNet``, folded or not, or ``optimize_for_inference``'s result) as a
    serialized ONNX ``ModelProto``, float32, BatchNorm folded into the convs.

    Input ``images``: ``[batch, height, width, 3]`` for ``layout="NHWC"`` (the library's
    layout; one Transpose to NCHW starts the graph) or ``[batch, 3, height, width]`` for
    ``"NCHW"`` (torchvision's); batch is symbolic, and so are height and width unless `size`
    fixes them (which lets ONNX Runtime fuse more: docs/deploy.md). Output ``logits``
    ``[batch, num_classes]``, or ``features`` ``[batch, num_features]`` for a headless model.
    `metadata` (str to str) goes into the model's ``metadata_props``. The model is checked
    with ``onnx.checker`` before it is returned. `model` is not changed."""
    onnx = _require("onnx")
    _check_options(layout, opset, metadata, onnx.defs.onnx_opset_version())
    height, width = _check_size_option(size)
    folded = _folded(model)
    _check_size(folded)
    graph = _Graph(onnx)
    x = INPUT_NAME
    nchw: list[Dim] = ["batch", 3, height, width]
    graph.shapes[x] = nchw if layout == "NCHW" else ["batch", height, width, 3]
    if layout == "NHWC":
        x = graph.node("Transpose", [x], "to_nchw", shape=nchw, perm=[0, 3, 1, 2])
    x = graph.relu(graph.conv(folded.conv1, x, "conv1"))
    batch, channels, *spatial = graph.shapes[x]
    x = graph.node("MaxPool", [x], "maxpool", shape=[batch, channels, *(
        _strided(d, 3, 2, 1) for d in spatial)], **_STEM_POOL)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for index, block in enumerate(getattr(folded, stage)):
            x = _block(graph, block, x, f"{stage}.{index}")
    headless = isinstance(folded.fc, Identity)
    output = "features" if headless else "logits"
    _head(graph, folded, x, output)

    float32 = onnx.TensorProto.FLOAT
    proto = onnx.helper.make_model_gen_version(
        onnx.helper.make_graph(
            graph.nodes, "resnext_flax", [onnx.helper.make_tensor_value_info(
                INPUT_NAME, float32, graph.shapes[INPUT_NAME])],
            [onnx.helper.make_tensor_value_info(output, float32, graph.shapes[output])],
            initializer=graph.initializers,
            value_info=graph.value_info(float32, {INPUT_NAME, output})),
        opset_imports=[onnx.helper.make_opsetid("", opset)],
        producer_name="resnext-flax", producer_version=producer_version())
    if metadata:
        onnx.helper.set_model_props(proto, dict(metadata))
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def onnx_session(model_bytes: bytes, *, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` of the serialized model in the CPU execution
    provider, all graph optimizations on (creating it is what optimizes the graph: keep it
    for several runs). `threads`: intra-op threads (None: ONNX Runtime's default)."""
    ort = _require("onnxruntime")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run_onnx(model: bytes | Any, images: np.ndarray, *, threads: int | None = None
             ) -> np.ndarray:
    """`images` (float32, in the layout the model was exported with) through `model`, a
    serialized ONNX model (run in a new :func:`onnx_session`) or a session; returns the first
    output."""
    images = np.asarray(images)
    if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be a 4-D floating-point array, got shape "
                         f"{images.shape} of dtype {images.dtype}")
    session = onnx_session(model, threads=threads) if isinstance(model, bytes | bytearray) else (
        model)
    expected = session.get_inputs()[0]
    static = [(axis, size) for axis, size in enumerate(expected.shape) if isinstance(size, int)]
    if any(images.shape[axis] != size for axis, size in static):
        raise ValueError(f"images of shape {images.shape} do not fit the model's input "
                         f"{expected.name} {expected.shape} (check the layout it was exported "
                         "with)")
    return session.run(None, {expected.name: np.ascontiguousarray(images, np.float32)})[0]
