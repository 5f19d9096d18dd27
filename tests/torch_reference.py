"""torchvision reference models for parity tests: random weights *and* random BatchNorm
statistics and affine parameters (torch's defaults of 0/1 would hide a swapped or dropped
statistic)."""

from __future__ import annotations

import numpy as np
import torch
import torchvision

import resnext_flax


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
    """A torchvision model in eval mode with random weights and random BN statistics."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return randomize_batchnorm(model, seed).eval()


def flax_model_from_torch(
    name: str, model: torch.nn.Module, *, dtype=None
) -> resnext_flax.ResNet:
    """The library's model of the same architecture (eval mode), loaded from the torch model's
    weights."""
    from flax import nnx

    num_classes = model.fc.out_features
    abstract = nnx.eval_shape(
        lambda: resnext_flax.create_model(name, num_classes=num_classes, dtype=dtype))
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
