"""The float32 floor of a short training run, and the bound a float32 implementation is held
to against it.

A randomly initialized ResNet trained in train mode on a few small images is chaotic: rounding
grows from step to step, by amounts that depend on the CPU's kernels, so no fixed tolerance
fits every machine. The floor is measured where the test runs: how far torch's own float32 run
drifts from torch float64, in two layouts (NCHW and channels_last run different kernels: two
samples of float32 rounding), the larger of the two per step and per kind.

A float32 run may drift from torch float64 by at most FLOOR_MULTIPLE times the floor, plus
FLOOR_ABSOLUTE. Two float32 implementations of a chaotic run drift by amounts that differ by a
factor: measured on an AVX2 machine, torch's two layouts by up to 2.6x (resnext50_32x4d, loss
at step 3) and the library vs torch by up to 2.3x (resnet18, loss at step 3). 4x covers that
spread; a real float32 defect stays far outside it (the BatchNorm cancellation bug found
earlier was ~2600x).
"""

from __future__ import annotations

import numpy as np
from torch_reference import relative_error

FLOOR_MULTIPLE = 4.0
FLOOR_ABSOLUTE = 1e-6

#: The loss of a step and the float64 state dict (torch names) after it.
Snapshot = tuple[float, dict[str, np.ndarray]]


def drift(run: list[Snapshot], exact: list[Snapshot]) -> list[dict[str, float]]:
    """Per step: relative error of the loss, the worst parameter and the worst statistic."""
    out = []
    for (loss, sd), (loss0, sd0) in zip(run, exact, strict=True):
        errors = {k: relative_error(v, sd0[k]) for k, v in sd.items()}
        out.append({
            "loss": abs(loss - loss0) / abs(loss0),
            "parameters": max(v for k, v in errors.items() if "running" not in k),
            "statistics": max(v for k, v in errors.items() if "running" in k),
        })
    return out


def floors(runs: list[list[Snapshot]], exact: list[Snapshot]) -> list[dict[str, float]]:
    """Per step and kind, the largest drift of the float32 `runs` from `exact`."""
    drifts = [drift(run, exact) for run in runs]
    return [{kind: max(d[kind] for d in step) for kind in step[0]}
            for step in zip(*drifts, strict=True)]


def bound(floor: float) -> float:
    """How far a float32 run may drift where torch's float32 runs drift by `floor`."""
    return FLOOR_MULTIPLE * floor + FLOOR_ABSOLUTE
