"""torchvision's ResNet family (ResNet, ResNeXt, Wide ResNet) in JAX / Flax NNX, with an exact
weight port from PyTorch."""

from resnext_flax.checkpoint import load_checkpoint, save_checkpoint
from resnext_flax.inference import Predictions, Predictor
from resnext_flax.inference_opt import FoldedResNet, optimize_for_inference
from resnext_flax.model import FEATURE_NAMES, BasicBlock, Bottleneck, ResNet
from resnext_flax.preprocess import load_image, preprocess, preprocess_image
from resnext_flax.pretrained import (
    ChecksumError,
    WeightsUnavailableError,
    download_pretrained,
    from_pretrained,
)
from resnext_flax.registry import CONSTRUCTORS, create_model, list_models
from resnext_flax.training import TrainState, create_train_state, make_train_step
from resnext_flax.transfer import FeatureExtractor, replace_head
from resnext_flax.variants import VARIANTS, ModelSpec
from resnext_flax.weight_sets import (
    WEIGHT_SETS,
    Preprocessing,
    WeightSet,
    get_weight_set,
    imagenet_categories,
    list_weight_sets,
)
from resnext_flax.weights import (
    StateDictMismatchError,
    StateDictReport,
    compare_state_dict,
    infer_architecture,
    load_torch_state_dict,
    read_state_dict,
    to_torch_state_dict,
)

globals().update(CONSTRUCTORS)

__version__ = "0.1.0"

__all__ = [
    "FEATURE_NAMES",
    "VARIANTS",
    "BasicBlock",
    "Bottleneck",
    "ModelSpec",
    "ResNet",
    "StateDictMismatchError",
    "StateDictReport",
    "compare_state_dict",
    "create_model",
    "infer_architecture",
    "list_models",
    "load_checkpoint",
    "load_torch_state_dict",
    "read_state_dict",
    "save_checkpoint",
    "to_torch_state_dict",
    # pretrained weights, preprocessing, inference, transfer learning
    "WEIGHT_SETS",
    "ChecksumError",
    "FeatureExtractor",
    "Predictions",
    "Predictor",
    "Preprocessing",
    "WeightSet",
    "WeightsUnavailableError",
    "download_pretrained",
    "from_pretrained",
    "get_weight_set",
    "imagenet_categories",
    "list_weight_sets",
    "load_image",
    "preprocess",
    "preprocess_image",
    "replace_head",
    # fast inference (BatchNorm folded)
    "FoldedResNet",
    "optimize_for_inference",
    # fine-tuning (resnext_flax.training, resnext_flax.parallel)
    "TrainState",
    "create_train_state",
    "make_train_step",
    *CONSTRUCTORS,
]
