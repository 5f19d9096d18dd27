"""StableHLO export: the BatchNorm-folded inference function serialized by ``jax.export``.

The program is the folded model under ``XLA_POLICY`` (XLA's own convolutions, no custom call
of the library's compiled CPU kernel), so it runs wherever JAX runs, without this library:

    import jax
    exported = jax.export.deserialize(open("model.stablehlo", "rb").read())
    logits = exported.call(images)  # float32 NHWC, normalized

The weights are constants inside the program; the batch dimension is symbolic, and so are
height and width unless a fixed size is asked for. Convolutions and matmuls are traced at
'highest' precision: an accelerator then computes float32 (no TF32), as the CPU does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnext_flax.errors import ExportError
from resnext_flax.models.folding import optimize_for_inference
from resnext_flax.models.functional import CompiledModel, apply
from resnext_flax.models.resnet import ResNet
from resnext_flax.nn.layers import with_conv_policy
from resnext_flax.nn.policy import XLA_POLICY

#: The platforms ``jax.export`` lowers for.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
#: The symbolic input dimensions (the same names as the ONNX graph's).
SYMBOLIC_DIMS = ("batch", "height", "width")


def portable_module(model: ResNet | CompiledModel) -> nnx.Module:
    """`model` with its BatchNorms folded and every conv on XLA's own lowering: a module whose
    program holds no custom call (`model` is not changed)."""
    if isinstance(model, CompiledModel):
        return with_conv_policy(model.module(), XLA_POLICY)
    return optimize_for_inference(model, policy=XLA_POLICY).module()


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    """`platforms` as a tuple of distinct known names; ExportError otherwise."""
    if isinstance(platforms, str):
        platforms = (platforms,)
    platforms = tuple(platforms)
    unknown = [p for p in platforms if p not in PLATFORMS]
    if not platforms or unknown or len(set(platforms)) != len(platforms):
        raise ExportError(f"platforms must be distinct names among {', '.join(PLATFORMS)}, "
                          f"got {list(platforms)}")
    return platforms


def input_shape(size: tuple[int, int] | None) -> tuple[int | str, ...]:
    """The input shape: symbolic batch, and height and width symbolic (`size` None) or
    fixed."""
    batch, height, width = SYMBOLIC_DIMS
    return (batch, height, width, 3) if size is None else (batch, *size, 3)


def export_stablehlo(model: ResNet | CompiledModel, *, platforms: Sequence[str] = ("cpu",
                                                                                    "cuda"),
                     size: tuple[int, int] | None = None) -> jax.export.Exported:
    """The folded forward pass of `model` (logits, or features for a headless model) as a
    ``jax.export.Exported`` for `platforms`, input float32 NHWC of :func:`input_shape`."""
    module = portable_module(model)
    graphdef, state = nnx.split(module)

    def forward(images: jax.Array) -> jax.Array:
        return apply(graphdef, state, images)

    spec = ", ".join(str(d) for d in input_shape(size))
    images = jax.ShapeDtypeStruct(jax.export.symbolic_shape(spec), jnp.float32)
    with jax.default_matmul_precision("highest"):
        return jax.export.export(jax.jit(forward), platforms=check_platforms(platforms))(images)


def custom_call_targets(exported: jax.export.Exported) -> set[str]:
    """The custom-call targets the exported program names (JAX's own shape checks
    included)."""
    import re

    return set(re.findall(r"custom_call @([\w.]+)", exported.mlir_module()))


def run_stablehlo(artifact: bytes | bytearray | jax.export.Exported, images: np.ndarray,
                  device: Any = None) -> np.ndarray:
    """The artifact (serialized, or deserialized once for several calls) run on `images` on
    `device` (default: the first CPU), as a deployment runs it."""
    if not isinstance(artifact, jax.export.Exported):
        artifact = jax.export.deserialize(bytearray(artifact))
    device = device or jax.devices("cpu")[0]
    return np.asarray(artifact.call(jax.device_put(np.asarray(images, np.float32), device)))
