"""torchvision reference models for parity tests: random weights *and* random BatchNorm
statistics and affine parameters (torch's defaults of 0/1 would hide a swapped or dropped
statistic)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torchvision
from torchvision.models.resnet import Bottleneck, ResNet

import resnext_flax
from resnext_flax.models.variants import get_spec

#: The weakly supervised ResNeXt-101s torchvision does not list, as its ``ResNet`` class builds
#: them (the reference, written out here rather than read from the library's table): the
#: ``width_per_group`` of a 32-group Bottleneck ResNet of depth (3, 4, 23, 3).
WSL_WIDTHS = {"resnext101_32x16d": 16, "resnext101_32x32d": 32, "resnext101_32x48d": 48}
WSL_LAYERS = (3, 4, 23, 3)
#: Tests with real weights build those at this depth (194-828 M parameters in full): every
#: grouped-conv width and stride of the full model, one stride-1 block after a downsampling one.
SHRUNK_LAYERS = (1, 1, 2, 1)
#: A case name ``"<model>" + SHRUNK`` stands for the model at ``SHRUNK_LAYERS``.
SHRUNK = "@shrunk"


def shrunk(name: str) -> str:
    """The case name of model `name` at ``SHRUNK_LAYERS``."""
    return name + SHRUNK


def real_weight_cases() -> list[str]:
    """Every model as a case for tests with real weights: the WSL ResNeXts shrunk."""
    return [shrunk(n) if n in WSL_WIDTHS else n for n in resnext_flax.list_models()]


def torch_architecture(case: str, *, num_classes: int = 1000) -> torch.nn.Module:
    """The torch reference of `case` (a model name, or a :func:`shrunk` one) with torch's own
    initialization, on torch's current default device (``torch.device("meta")``: shapes only).
    """
    name, _, shrink = case.partition("@")
    if name in WSL_WIDTHS:
        layers = SHRUNK_LAYERS if shrink else WSL_LAYERS
        return ResNet(Bottleneck, list(layers), groups=32, width_per_group=WSL_WIDTHS[name],
                      num_classes=num_classes)
    if shrink:
        raise ValueError(f"only the WSL ResNeXts have a shrunk test form, not {name!r}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def flax_architecture(case: str, **options) -> resnext_flax.ResNet:
    """The library's model of `case` (``create_model``'s `options`), built as ``ResNet`` from
    the table's spec at ``SHRUNK_LAYERS`` for a shrunk case."""
    from flax import nnx

    name, _, shrink = case.partition("@")
    if not shrink:
        return resnext_flax.create_model(name, **options)
    spec = dataclasses.replace(get_spec(name), layers=SHRUNK_LAYERS)
    return resnext_flax.ResNet(spec, rngs=nnx.Rngs(0), **options)


def randomize_batchnorm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every BatchNorm random running statistics, scale and bias, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                module.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


def torch_model(name: str, *, seed: int = 0, num_classes: int = 1000) -> torch.nn.Module:
    """A torchvision model (a case of :func:`torch_architecture`) in eval mode with random
    weights and random BN statistics."""
    torch.manual_seed(seed)
    model = torch_architecture(name, num_classes=num_classes)
    return randomize_batchnorm(model, seed).eval()


def flax_model_from_torch(
    name: str, model: torch.nn.Module, *, dtype=None
) -> resnext_flax.ResNet:
    """The library's model of the same architecture (eval mode), loaded from the torch model's
    weights."""
    from flax import nnx

    num_classes = model.fc.out_features
    abstract = nnx.eval_shape(
        lambda: flax_architecture(name, num_classes=num_classes, dtype=dtype))
    flax_model = resnext_flax.load_torch_state_dict(abstract, model.state_dict())
    flax_model.eval()
    return flax_model


def random_images(batch: int, height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """Normalized-image-like NHWC float32 input."""
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(
        np.float32
    )


def torch_stages(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """torchvision's outputs at the library's ``FEATURE_NAMES`` (plus logits), NHWC numpy."""
    with torch.no_grad():
        out = {"stem": model.maxpool(model.relu(model.bn1(model.conv1(x))))}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(model, name)(out["stem"] if name == "layer1" else x)
            out[name] = x
        out["pre_logits"] = torch.flatten(model.avgpool(x), 1)
        out["logits"] = model.fc(out["pre_logits"])
    return {k: (v.permute(0, 2, 3, 1) if v.ndim == 4 else v).numpy() for k, v in out.items()}


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
