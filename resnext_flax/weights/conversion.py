"""torchvision checkpoint file -> verified Flax checkpoint file (the library side of
``convert/``)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from resnext_flax.compilation import report_compilation
from resnext_flax.errors import WeightsError
from resnext_flax.models.functional import pure_forward
from resnext_flax.models.resnet import ResNet
from resnext_flax.models.variants import find_variant
from resnext_flax.outputs import check_output_path, weight_source_files
from resnext_flax.weights.checkpoint import save_checkpoint
from resnext_flax.weights.files import WeightFileError
from resnext_flax.weights.loading import CONVERTED_LAYOUT, load_model_with_report
from resnext_flax.weights.torch_port import normalize_state_dict, to_torch_state_dict


@dataclasses.dataclass(frozen=True)
class ParityReport:
    """Logits agreement between the Flax model and torchvision on one probe batch."""

    max_abs_error: float
    relative_error: float
    top1_agreement: float

    def __str__(self) -> str:
        return (
            f"max-abs error {self.max_abs_error:.3e}, relative error "
            f"{self.relative_error:.3e}, top-1 agreement {self.top1_agreement:.0%}"
        )


def _torch_compatible(value: Any) -> np.ndarray:
    """numpy has no bfloat16 torch accepts (safetensors files read as ml_dtypes.bfloat16);
    float32 holds every bfloat16 value exactly, and torch casts into its float32 parameters."""
    array = np.asarray(value)
    return array.astype(np.float32) if array.dtype.name == "bfloat16" else array


@contextlib.contextmanager
def _steps(total: int, enabled: bool) -> Iterator[Any]:
    """The converter's progress on stderr: a bar over its steps, each named (``bar.step``)
    as it starts; nothing without `enabled`."""
    from tqdm import tqdm

    with tqdm(total=total, desc="convert", unit="step", disable=not enabled, file=sys.stderr,
              bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}]{postfix}") as bar:

        @contextlib.contextmanager
        def step(name: str) -> Iterator[None]:
            bar.set_postfix_str(name)
            yield
            bar.update(1)

        bar.step = step
        yield bar
        bar.set_postfix_str("done")


def verify_against_torchvision(
    model: ResNet, state_dict: Any, name: str, *, probe_shape=(2, 224, 224), seed: int = 0,
    progress: bool = False,
) -> ParityReport:
    """Run torchvision's `name` with the same state dict and this model on one random NHWC
    probe batch (float32, highest matmul precision) and compare the logits (the pooled
    features of a headless model). A head the state dict lacks (freshly initialized) is
    copied from the model; everything else comes from `state_dict`. With `progress`, says on
    stderr what it runs (the JAX side compiles first)."""
    batch, height, width = probe_shape
    images = np.random.default_rng(seed).standard_normal((batch, height, width, 3))
    images = images.astype(np.float32)
    with _steps(2, progress) as steps:
        with steps.step(f"torchvision's {name} on a {batch}x{height}x{width} probe batch"):
            expected = _torchvision_logits(model, state_dict, name, images)
        with steps.step(f"this library's {name} on the same batch"), \
                report_compilation(f"{name} for {batch}x{height}x{width}", enabled=progress):
            forward, variables = pure_forward(model)
            with jax.default_matmul_precision("highest"):
                actual = np.asarray(jax.jit(forward)(variables, images))
    diff = actual.astype(np.float64) - expected
    return ParityReport(
        max_abs_error=float(np.abs(diff).max()),
        relative_error=float(np.linalg.norm(diff) / np.linalg.norm(expected)),
        top1_agreement=float(np.mean(actual.argmax(-1) == expected.argmax(-1))),
    )


def _torchvision_logits(model: ResNet, state_dict: Any, name: str,
                        images: np.ndarray) -> np.ndarray:
    import torch
    import torchvision

    state_dict = normalize_state_dict(state_dict)
    if model.num_classes and "fc.weight" not in state_dict:
        head = to_torch_state_dict(model)
        state_dict = {**state_dict, "fc.weight": head["fc.weight"], "fc.bias": head["fc.bias"]}
    reference = torchvision.models.get_model(name, weights=None,
                                             num_classes=model.num_classes or 1)
    if not model.num_classes:
        reference.fc = torch.nn.Identity()
    reference.load_state_dict({k: torch.as_tensor(_torch_compatible(v)) for k, v in
                               state_dict.items()}, strict=True)
    reference.eval()
    with torch.no_grad():
        return reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def _check_options(source, output, probe_shape, tolerance) -> None:
    check_output_path(output, weight_source_files(source), what="the output")
    if len(probe_shape) != 3 or not all(isinstance(n, int) and n >= 1 for n in probe_shape):
        raise ValueError(f"the probe batch and size must be positive integers, got "
                         f"{tuple(probe_shape)}")
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"the tolerance must be a positive finite number, got {tolerance!r}")


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    name: str | None = None,
    verify: bool = True,
    probe_shape: tuple[int, int, int] = (2, 224, 224),
    tolerance: float = 1e-4,
    prefix: str | None = None,
    ema: bool = False,
    key: str | None = None,
    num_classes: int | None = None,
    trust_pickle: bool = False,
    progress: bool = False,
) -> ParityReport | None:
    """Convert a checkpoint as it comes (any layout ``load_model`` reads, with the same
    options) into a Flax checkpoint.

    The output is written (atomically) only after the strict load and, with `verify`, only if
    the logits agree with torchvision's within relative `tolerance`. What the loaded model
    records (``pretrained_cfg``: class names from transformers' ``id2label``...) goes into
    the output's header. The output is checked before anything is read
    (:func:`~resnext_flax.outputs.check_output_path`): one of the files the input is read
    through (a Hugging Face folder's weight file or ``config.json``), a folder, or a path in a
    missing or read-only folder is refused. With `progress`, says on stderr what it does while
    it reads and verifies.
    """
    _check_options(source, output, probe_shape, tolerance)
    if progress:
        print(f"resnext-flax: reading {os.fspath(source)}", file=sys.stderr, flush=True)
    model, resolved = load_model_with_report(source, name, prefix=prefix, ema=ema, key=key,
                                             num_classes=num_classes,
                                             trust_pickle=trust_pickle)
    if resolved.layout == CONVERTED_LAYOUT:
        raise WeightFileError(
            f"{resolved.source} is a converted resnext_flax checkpoint, not a torchvision "
            "state dict: load it with resnext_flax.load_checkpoint(path)")
    name = find_variant(model.spec)
    report = None
    if verify:
        if progress:
            print(f"resnext-flax: verifying {name} against torchvision", file=sys.stderr,
                  flush=True)
        report = verify_against_torchvision(model, resolved.state_dict, name,
                                            probe_shape=probe_shape, progress=progress)
        if not report.relative_error <= tolerance:
            raise WeightsError(
                f"converted {name} does not match torchvision ({report}); "
                f"tolerance {tolerance:g}; nothing written"
            )
    metadata = {"source": os.path.basename(os.path.normpath(os.fspath(source)))}
    save_checkpoint(model, output, metadata=metadata)
    return report
