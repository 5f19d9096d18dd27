"""ResNet, ResNeXt and Wide ResNet as Flax NNX modules, NHWC, mirroring torchvision.

Attribute names equal torchvision's state-dict names (``conv1``, ``bn1``, ``layer1``…,
``downsample``, ``fc``) so the weight map is structural (see ``resnext_flax.weights.torch_port``).
The forward pass is the plain ``relu(bn(conv(x)) + shortcut)``; how each conv is computed is
its ``ConvPolicy``'s business (``nn.policy``), and inference fusion (BatchNorm folded, bias,
residual and ReLU in the conv's epilogue) is applied by ``models.folding`` in the same module
tree.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from resnext_flax.metadata import PretrainedCfg
from resnext_flax.models import programs
from resnext_flax.models.variants import ModelSpec
from resnext_flax.nn import ops
from resnext_flax.nn.init import batched_init, materialize
from resnext_flax.nn.layers import BatchNorm, Conv, Identity, Linear

#: Names of the intermediate outputs returned by :meth:`ResNet.forward_features`.
FEATURE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4", "pre_logits")


class BasicBlock(nnx.Module):
    """Two 3x3 convs and a residual shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int = 1,
        downsample: nnx.List | None = None,
        spec: ModelSpec,
        zero_init_residual: bool = False,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if spec.groups != 1 or spec.width_per_group != 64:
            raise ValueError("BasicBlock only supports groups=1 and width_per_group=64")
        conv = functools.partial(Conv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = functools.partial(BatchNorm, dtype=dtype, param_dtype=param_dtype)
        self.conv1 = conv(inplanes, planes, 3, stride=stride, padding=1)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, padding=1)
        self.bn2 = norm(planes, zero_init=zero_init_residual)
        self.downsample = downsample

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.downsample is None else sequential(self.downsample, x)
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        return jax.nn.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nnx.Module):
    """1x1 conv, grouped 3x3 conv (stride here, as torchvision's ResNet V1.5), 1x1 conv.

    The 3x3 conv has ``feature_group_count = groups`` and width
    ``int(planes * width_per_group / 64) * groups``; output channels are ``planes * 4``.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int = 1,
        downsample: nnx.List | None = None,
        spec: ModelSpec,
        zero_init_residual: bool = False,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        width = spec.block_width(planes)
        conv = functools.partial(Conv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = functools.partial(BatchNorm, dtype=dtype, param_dtype=param_dtype)
        self.conv1 = conv(inplanes, width, 1)
        self.bn1 = norm(width)
        self.conv2 = conv(width, width, 3, stride=stride, padding=1, groups=spec.groups)
        self.bn2 = norm(width)
        self.conv3 = conv(width, planes * self.expansion, 1)
        self.bn3 = norm(planes * self.expansion, zero_init=zero_init_residual)
        self.downsample = downsample

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.downsample is None else sequential(self.downsample, x)
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        return jax.nn.relu(self.bn3(self.conv3(out)) + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def sequential(layers: nnx.List, x: jax.Array) -> jax.Array:
    """The layers applied in order (a ``downsample`` or a stage)."""
    for layer in layers:
        x = layer(x)
    return x


def check_input(x: jax.Array, in_channels: int = 3, *, hint: str = "") -> None:
    """Raise a clear ValueError for inputs the model cannot take (checked on static shapes,
    so it costs nothing under jit); `hint` is appended to the message."""
    shape = tuple(getattr(x, "shape", ()))
    dtype = getattr(x, "dtype", None)
    expected = f"a floating-point array of shape (N, H, W, {in_channels}) (NHWC)"
    problem = None
    if not hasattr(x, "shape"):
        problem = (f"got a {type(x).__name__}, not an array; convert it with np.asarray(...) "
                   "(and .astype(np.float32))")
    elif len(shape) != 4:
        problem = f"got an array of rank {len(shape)}: {shape}"
    elif shape[-1] != in_channels:
        problem = f"got shape {shape} with {shape[-1]} channels last"
        if shape[1] == in_channels:
            problem += "; this looks like NCHW, transpose it with x.transpose(0, 2, 3, 1)"
    elif any(n < 1 for n in shape[:3]):  # each alone: decidable for symbolic dims too
        problem = f"got shape {shape}: N, H and W must be at least 1"
    elif dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        problem = (f"got dtype {dtype}; convert images with resnext_flax preprocessing or "
                   "x.astype(jnp.float32)")
    if problem:
        raise ValueError(f"expected {expected}, {problem}{hint}")


#: The most classes a head may have: a head of N classes holds N x 2048 weights (8 GB at this
#: bound); a larger count is a typo, and XLA would abort the process allocating it.
MAX_CLASSES = 1_000_000


def check_num_classes(num_classes: object) -> None:
    """A ValueError naming the problem unless `num_classes` is an int in [0, MAX_CLASSES]."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not (
            0 <= num_classes <= MAX_CLASSES):
        raise ValueError(f"num_classes must be an int from 0 (headless) to {MAX_CLASSES:,}, "
                         f"got {num_classes!r}")


class RecordSlot:
    """Holds a module's :class:`PretrainedCfg` as a static NNX attribute that never tells two
    graph definitions apart: every slot compares equal and hashes alike. The forward pass
    never reads the record, so models that differ only in where their weights came from share
    one compiled program (and jit never hashes a thousand class names per call)."""

    __slots__ = ("cfg",)

    def __init__(self, cfg: PretrainedCfg | None = None):
        if cfg is not None and not isinstance(cfg, PretrainedCfg):
            raise TypeError(f"pretrained_cfg must be a PretrainedCfg or None, got "
                            f"{type(cfg).__name__}")
        self.cfg = cfg

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecordSlot)

    def __hash__(self) -> int:
        return hash(RecordSlot)

    def __repr__(self) -> str:
        return f"RecordSlot({self.cfg!r})"


class ResNet(nnx.Module):
    """torchvision's ResNet family (ResNet, ResNeXt, Wide ResNet) in Flax NNX.

    **Arguments:**
    - `spec`: the architecture (see ``models.variants.VARIANTS``).
    - `num_classes`: size of the classifier head; 0 for a headless model whose output is the
      pooled features (``fc`` is then an identity).
    - `zero_init_residual`: zero the last BatchNorm scale of every block (torchvision's
      option of the same name).
    - `dtype`: compute dtype (e.g. ``jnp.bfloat16``); parameters stay in `param_dtype`.
    - `rngs`: random streams for initialization.

    Call it on NHWC images to get logits; :meth:`forward_features` returns the stem, every
    stage and the pooled pre-logits. ``model.eval()`` switches BatchNorm to running statistics,
    ``model.train()`` back to batch statistics.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_num_classes(num_classes)
        self.spec = spec
        self.num_classes = num_classes
        self.dtype = dtype
        # What the weights were loaded with (set by the loaders); None: random initialization.
        self._pretrained = RecordSlot()
        # Random weights are recorded, then drawn in one batched pass (nn.init): the same
        # values as drawing each eagerly, without compiling a program per parameter shape.
        with batched_init():
            self.conv1 = Conv(3, 64, 7, stride=2, padding=3, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
            self.bn1 = BatchNorm(64, dtype=dtype, param_dtype=param_dtype)
            make_stage = functools.partial(
                self._make_stage,
                zero_init_residual=zero_init_residual,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            inplanes = 64
            self.layer1, inplanes = make_stage(inplanes, 64, spec.layers[0], stride=1)
            self.layer2, inplanes = make_stage(inplanes, 128, spec.layers[1], stride=2)
            self.layer3, inplanes = make_stage(inplanes, 256, spec.layers[2], stride=2)
            self.layer4, inplanes = make_stage(inplanes, 512, spec.layers[3], stride=2)
            self.num_features = inplanes
            self.fc = _head(inplanes, num_classes, dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)
        materialize(self)

    def _make_stage(
        self, inplanes: int, planes: int, num_blocks: int, *, stride: int, **kwargs
    ) -> tuple[nnx.List, int]:
        block = BLOCKS[self.spec.block]
        outplanes = planes * block.expansion
        downsample = None
        if stride != 1 or inplanes != outplanes:
            conv_kwargs = {k: kwargs[k] for k in ("dtype", "param_dtype", "rngs")}
            downsample = nnx.List(
                [
                    Conv(inplanes, outplanes, 1, stride=stride, **conv_kwargs),
                    BatchNorm(outplanes, dtype=kwargs["dtype"],
                              param_dtype=kwargs["param_dtype"]),
                ]
            )
        blocks = [block(inplanes, planes, stride=stride, downsample=downsample,
                        spec=self.spec, **kwargs)]
        blocks += [block(outplanes, planes, spec=self.spec, **kwargs)
                   for _ in range(1, num_blocks)]
        return nnx.List(blocks), outplanes

    def stem(self, x: jax.Array) -> jax.Array:
        """conv1 (7x7/2), bn1, ReLU and the 3x3/2 max-pool (in the compiled kernel where
        conv1's policy runs convs there)."""
        if isinstance(self.bn1, Identity):  # folded: the ReLU goes with conv1's bias, one op
            x = self.conv1(x, relu=True)
        else:
            x = jax.nn.relu(self.bn1(self.conv1(x)))
        return ops.max_pool_under(self.conv1.policy, x, window=3, stride=2, padding=1)

    def forward_features(self, x: jax.Array) -> dict[str, jax.Array]:
        """Every intermediate output, keyed by ``FEATURE_NAMES``.

        Stage outputs are NHWC; ``pre_logits`` is the globally average-pooled ``layer4``
        output, shape (N, num_features).
        """
        check_input(x)
        compiled = programs.call_compiled(self, ResNet.forward_features, x)
        if compiled is not None:
            return compiled
        features = {"stem": self.stem(x)}
        out = features["stem"]
        for name in ("layer1", "layer2", "layer3", "layer4"):
            out = sequential(getattr(self, name), out)
            features[name] = out
        features["pre_logits"] = self.pool(out)
        return features

    def pool(self, x: jax.Array) -> jax.Array:
        """Global average pool, (N, H, W, C) -> (N, C), accumulated in float32 at least."""
        return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)),
                        axis=(1, 2)).astype(x.dtype)

    def forward_head(self, pre_logits: jax.Array) -> jax.Array:
        """The classifier: pooled features (N, num_features) -> logits (N, num_classes); the
        features themselves for a headless model (``num_classes=0``)."""
        return self.fc(pre_logits)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits (N, num_classes) for NHWC images (N, H, W, 3); pooled features
        (N, num_features) for a headless model.

        Called outside any JAX trace, the whole forward runs as one compiled program, cached
        per input shape and dtype, BatchNorm mode and conv policy (``models.programs``); in a
        trace (``jax.jit``, ``nnx.jit``, ``grad``...) or under ``jax.disable_jit()`` it runs
        as plain code. The same holds for :meth:`forward_features`."""
        check_input(x)
        compiled = programs.call_compiled(self, ResNet.__call__, x)
        if compiled is not None:
            return compiled
        return self.forward_head(self.forward_features(x)["pre_logits"])

    def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None) -> None:
        """Replace ``fc`` by a freshly initialized head of `num_classes` (0: headless), as
        torchvision's fine-tuning recipes do with ``model.fc = nn.Linear(...)``; every other
        weight and BatchNorm statistic is kept (and ``pretrained_cfg``, less what described the
        old head: its class names and weight set). ``rngs`` defaults to ``nnx.Rngs(0)``."""
        check_num_classes(num_classes)
        param_dtype = self.conv1.kernel.get_value().dtype
        self.fc = _head(self.num_features, num_classes, dtype=self.dtype,
                        param_dtype=param_dtype, rngs=rngs if rngs is not None else nnx.Rngs(0))
        self.num_classes = num_classes
        if self.pretrained_cfg is not None:
            self.pretrained_cfg = self.pretrained_cfg.with_head(num_classes)

    @property
    def pretrained_cfg(self) -> PretrainedCfg | None:
        """What the weights were loaded with (``metadata.PretrainedCfg``: architecture, source,
        class names, preprocessing...); None for random initialization."""
        return self._pretrained.cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: PretrainedCfg | None) -> None:
        self._pretrained = RecordSlot(cfg)


def _head(num_features: int, num_classes: int, **kwargs) -> nnx.Module:
    if num_classes == 0:
        return Identity()
    return Linear(num_features, num_classes, **kwargs)


def replace_head(model: ResNet, num_classes: int, *, rngs: nnx.Rngs) -> ResNet:
    """The functional form of :meth:`ResNet.reset_classifier`: a new ``fc`` for
    `num_classes` classes, initialized like torch's ``nn.Linear``; modifies `model` in place
    and returns it."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    model.reset_classifier(num_classes, rngs=rngs)
    return model
