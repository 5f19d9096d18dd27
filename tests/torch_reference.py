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


def flax_model_from_torch(name: str, model: torch.nn.Module) -> resnext_flax.ResNet:
    """The library's model of the same architecture, loaded from the torch model's weights."""
    from flax import nnx

    num_classes = model.fc.out_features
    abstract = nnx.eval_shape(lambda: resnext_flax.create_model(name, num_classes=num_classes))
    flax_model = resnext_flax.load_torch_state_dict(abstract, model.state_dict())
    flax_model.eval()
    return flax_model


def random_images(batch: int, height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """Normalized-image-like NHWC float32 input."""
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(
        np.float32
    )


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
