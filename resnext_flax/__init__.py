"""torchvision's ResNet family (ResNet, ResNeXt, Wide ResNet) in JAX / Flax NNX, with an exact
weight port from PyTorch.

The top level holds what a user types: the constructors, ``create_model``/``list_models``,
weight loading and saving, ``optimize_for_inference`` with its ``ConvPolicy``, ``Predictor``
and ``FeatureExtractor``, and ``enable_compilation_cache``. Training, data, evaluation,
fine-tuning, data parallelism and multi-process runs live in their modules
(``resnext_flax.training``, ``.optim``, ``.mixing``, ``.ema``, ``.sampling``, ``.schedules``,
``.datasets``, ``.pipeline``, ``.augment``, ``.evaluation``, ``.finetuning``, ``.recipes``,
``.parallel``, ``.distributed``), imported on first use: ``import resnext_flax`` loads neither
optax, Grain, Orbax nor torch.

Layout, lowest layer first (each imports only the ones before it; ``tests/test_layout.py``):
``errors`` and ``metadata``; ``nn`` (layers, the conv policy, the optional CPU lowerings);
``models``; ``weights`` and ``compilation``; ``preprocess``/``augment``/``datasets``/
``sampling``/``schedules``/``run_log``; ``inference``/``training``/``optim``/``mixing``/``ema``/
``pipeline``; ``parallel``/``distributed``; ``builders``; ``evaluation``/``finetuning``/
``recipes``; ``cli``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it; resolved on first access (PEP 562), so importing
# the package costs only what a name actually used needs.
_EXPORTS = {
    **{name: "resnext_flax.builders" for name in (
        "create_model", "list_models", "resnet18", "resnet34", "resnet50", "resnet101",
        "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
        "resnext101_32x16d", "resnext101_32x32d", "resnext101_32x48d", "wide_resnet50_2",
        "wide_resnet101_2")},
    "ResNet": "resnext_flax.models.resnet",
    "optimize_for_inference": "resnext_flax.models.folding",
    "ConvPolicy": "resnext_flax.nn.policy",
    "Predictor": "resnext_flax.inference",
    "FeatureExtractor": "resnext_flax.inference",
    "from_pretrained": "resnext_flax.weights.pretrained",
    "list_weight_sets": "resnext_flax.weights.catalog",
    "load_model": "resnext_flax.weights.loading",
    "inspect_checkpoint": "resnext_flax.weights.loading",
    "read_state_dict": "resnext_flax.weights.loading",
    "load_torch_state_dict": "resnext_flax.weights.loading",
    "to_torch_state_dict": "resnext_flax.weights.torch_port",
    "load_checkpoint": "resnext_flax.weights.checkpoint",
    "save_checkpoint": "resnext_flax.weights.checkpoint",
    "ResnextFlaxError": "resnext_flax.errors",
    "enable_compilation_cache": "resnext_flax.compilation",
}

_SUBMODULES = frozenset({
    "augment", "autoaugment", "builders", "cli", "compilation", "datasets", "distributed",
    "ema", "errors", "evaluation", "export", "finetuning", "inference", "metadata", "mixing",
    "models", "nn", "optim", "parallel", "pipeline", "preprocess", "recipes", "run_log",
    "sampling", "schedules", "training", "weights",
})

__all__ = [
    "ConvPolicy",
    "FeatureExtractor",
    "Predictor",
    "ResNet",
    "ResnextFlaxError",
    "create_model",
    "enable_compilation_cache",
    "from_pretrained",
    "inspect_checkpoint",
    "list_models",
    "list_weight_sets",
    "load_checkpoint",
    "load_model",
    "load_torch_state_dict",
    "optimize_for_inference",
    "read_state_dict",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_32x16d",
    "resnext101_32x32d",
    "resnext101_32x48d",
    "resnext101_64x4d",
    "save_checkpoint",
    "to_torch_state_dict",
    "wide_resnet50_2",
    "wide_resnet101_2",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({"__version__", *_EXPORTS, *_SUBMODULES})


if TYPE_CHECKING:  # what IDEs and type checkers see
    from resnext_flax.builders import (
        create_model,
        list_models,
        resnet18,
        resnet34,
        resnet50,
        resnet101,
        resnet152,
        resnext50_32x4d,
        resnext101_32x8d,
        resnext101_32x16d,
        resnext101_32x32d,
        resnext101_32x48d,
        resnext101_64x4d,
        wide_resnet50_2,
        wide_resnet101_2,
    )
    from resnext_flax.compilation import enable_compilation_cache
    from resnext_flax.errors import ResnextFlaxError
    from resnext_flax.inference import FeatureExtractor, Predictor
    from resnext_flax.models.folding import optimize_for_inference
    from resnext_flax.models.resnet import ResNet
    from resnext_flax.nn.policy import ConvPolicy
    from resnext_flax.weights.catalog import list_weight_sets
    from resnext_flax.weights.checkpoint import load_checkpoint, save_checkpoint
    from resnext_flax.weights.loading import (
        inspect_checkpoint,
        load_model,
        load_torch_state_dict,
        read_state_dict,
    )
    from resnext_flax.weights.pretrained import from_pretrained
    from resnext_flax.weights.torch_port import to_torch_state_dict
