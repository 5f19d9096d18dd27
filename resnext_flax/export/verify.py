"""Verification of an exported artifact: run it on random images and compare it with the
model, at several batch sizes from one artifact. Imports of JAX stay inside the functions: the
package's top level is read before JAX is imported (the command's output checks)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from resnext_flax.errors import ExportError

#: Verification runs the artifact at these batch sizes besides the probe batch's: a symbolic
#: batch dimension must give the same rows at every size.
CHECKED_BATCHES = (1, 3)


def relative_error(actual: Any, expected: Any) -> float:
    """``max|actual - expected| / max|expected|`` in float64 (the absolute error where the
    expected values are all zero)."""
    import numpy as np

    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return math.inf
    scale = np.abs(expected).max(initial=0.0)
    diff = np.abs(actual - expected).max(initial=0.0)
    return float(diff / scale if scale > 0 else diff)


def reference(model: Any, images: Any) -> Any:
    """The model's outputs (eval mode, float32 at 'highest' precision) on `images`."""
    import jax
    import numpy as np

    from resnext_flax.models.functional import CompiledModel, pure_forward

    with jax.default_matmul_precision("highest"):
        if isinstance(model, CompiledModel):
            return np.asarray(model(images))
        forward, variables = pure_forward(model)
        return np.asarray(jax.jit(forward)(variables, images))


def verify_artifact(run: Callable[[Any], Any], model: Any, probe_shape: tuple[int, int, int],
                    tolerance: float, what: str) -> dict[int, float]:
    """`run` (the artifact, NHWC images in) against the model on random images at the probe
    batch size and :data:`CHECKED_BATCHES`; batch size -> relative error. ExportError where
    one exceeds `tolerance`."""
    import numpy as np

    batch, height, width = probe_shape
    sizes = sorted({batch, *CHECKED_BATCHES})
    images = np.random.default_rng(0).standard_normal((max(sizes), height, width, 3))
    images = images.astype(np.float32)
    expected = reference(model, images)
    errors = {n: relative_error(run(images[:n]), expected[:n]) for n in sizes}
    failed = {n: e for n, e in errors.items() if not e <= tolerance}
    if failed:
        where = ", ".join(f"{e:.3e} at batch {n}" for n, e in failed.items())
        raise ExportError(f"the {what} does not match the model ({height}x{width} images): "
                          f"relative error {where}; tolerance {tolerance:g}; nothing written")
    return errors


def verification_devices(platforms: Sequence[str]) -> list[Any]:
    """One device of each of `platforms` this process has (the CPU first): the artifact is
    checked on each, since each platform has its own lowering of the program."""
    import jax

    devices = []
    for platform in sorted(platforms, key=lambda p: p != "cpu"):
        try:
            devices.append(jax.devices(platform)[0])
        except RuntimeError:
            continue
    if not devices:
        raise ExportError(f"cannot verify: this process has no device for "
                          f"{', '.join(platforms)}; export with verify=False (--no-verify) or "
                          "add cpu to the platforms")
    return devices
