"""Weight decay per parameter group, as torchvision's classification reference groups the
parameters (``set_weight_decay`` with ``--norm-weight-decay`` and ``--bias-weight-decay``)."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import resnext_flax as rf
from resnext_flax import training
from resnext_flax.weights.torch_port import torch_variables

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def reference_groups(model, weight_decay, norm_weight_decay, bias_weight_decay):
    """torch parameter name -> decay, by the reference's ``set_weight_decay`` rules: custom
    keys (``bias``) first, then normalization layers, then the rest."""
    norm_classes = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm,
                    torch.nn.GroupNorm)
    out = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if bias_weight_decay is not None and name == "bias":
                out[full] = bias_weight_decay
            elif norm_weight_decay is not None and isinstance(module, norm_classes):
                out[full] = norm_weight_decay
            else:
                out[full] = weight_decay
    return out


SETTINGS = [(1e-4, None, None), (2e-5, 0.0, None), (1e-4, 0.0, 0.0), (3e-5, 1e-3, 5e-6)]


@pytest.mark.parametrize("weight_decay,norm,bias", SETTINGS)
def test_groups_equal_torchvision_reference(weight_decay, norm, bias):
    expected = reference_groups(torchvision.models.resnet18(num_classes=5), weight_decay,
                                norm, bias)
    model = rf.resnet18(num_classes=5)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    groups = training.decay_groups(params, weight_decay=weight_decay, norm_weight_decay=norm,
                                   bias_weight_decay=bias)
    ours = {}
    for key, (_, variable) in torch_variables(model).items():
        if isinstance(variable, nnx.Param):
            path = key.split(".")[:-1]
            node = groups
            for part in path:
                node = node[int(part)] if part.isdigit() else node[part]
            leaf = {"weight": ("kernel", "scale"), "bias": ("bias",)}[key.split(".")[-1]]
            ours[key] = next(node[name] for name in leaf if name in node)
    assert ours == expected


def test_the_update_adds_each_groups_decay_times_the_parameter():
    params = {"conv": {"kernel": np.ones((2, 2), np.float32)},
              "bn": {"scale": np.full(2, 2.0, np.float32), "bias": np.full(2, 3.0, np.float32)},
              "fc": {"kernel": np.ones(2, np.float32), "bias": np.full(2, 4.0, np.float32)}}
    grads = jax.tree_util.tree_map(np.zeros_like, params)
    tx = optax.chain(training.grouped_weight_decay(0.1, 0.01, None), optax.sgd(1.0))
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(updates["conv"]["kernel"][0, 0]) == pytest.approx(-0.1)
    assert float(updates["bn"]["scale"][0]) == pytest.approx(-0.02)
    assert float(updates["bn"]["bias"][0]) == pytest.approx(-0.03)
    assert float(updates["fc"]["bias"][0]) == pytest.approx(-0.4)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(grads, tx.init(params))
    with pytest.raises(ValueError, match="norm_weight_decay must be a finite number"):
        training.grouped_weight_decay(0.1, float("nan"), None)
