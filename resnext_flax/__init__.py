"""torchvision's ResNet family (ResNet, ResNeXt, Wide ResNet) in JAX / Flax NNX, with an exact
weight port from PyTorch.

Layout, lowest layer first (each imports only the ones before it):

- ``nn``: convolution lowerings, pooling and the layers with torch's semantics;
- ``models``: the variant table, the NNX ResNet, pure/compiled forms, BatchNorm folding;
- ``weights``: the torch port, weight files, converted checkpoints, the weight-set catalog,
  the download cache and pretrained loading;
- ``preprocess``, ``inference``, ``training``, ``parallel``: images, prediction and feature
  extraction, fine-tuning, many devices;
- ``datasets``, ``augment``, ``pipeline``: image folders and list files, torchvision's
  training augmentation, the Grain input pipeline;
- ``builders`` (``create_model``, ``list_models``, one constructor per variant);
- ``evaluation``, ``finetuning``: accuracy on a folder, fine-tuning on a folder;
- ``commands`` and ``cli``: the ``resnext-flax`` command.
"""

from resnext_flax.augment import Augmentation
from resnext_flax.builders import (
    CONSTRUCTORS,
    ModelOptions,
    create_model,
    list_models,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
from resnext_flax.datasets import (
    DatasetError,
    ImageDataset,
    image_folder,
    load_dataset,
    read_list_file,
)
from resnext_flax.evaluation import EvaluationResult, evaluate, evaluate_pretrained
from resnext_flax.finetuning import FinetuneConfig, FinetuneResult, finetune
from resnext_flax.inference import FeatureExtractor, Predictions, Predictor
from resnext_flax.metadata import Preprocessing, imagenet_categories, imagenet_wnids
from resnext_flax.models.folding import FoldedResNet, fold_batchnorm, optimize_for_inference
from resnext_flax.models.resnet import (
    FEATURE_NAMES,
    BasicBlock,
    Bottleneck,
    ResNet,
    replace_head,
)
from resnext_flax.models.variants import VARIANTS, ModelSpec
from resnext_flax.pipeline import LoaderOptions
from resnext_flax.preprocess import load_image, preprocess, preprocess_image
from resnext_flax.training import TrainState, create_train_state, make_train_step
from resnext_flax.weights.cache import ChecksumError, WeightsUnavailableError
from resnext_flax.weights.catalog import WEIGHT_SETS, WeightSet, get_weight_set, list_weight_sets
from resnext_flax.weights.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from resnext_flax.weights.files import UntrustedPickleError
from resnext_flax.weights.loading import (
    inspect_checkpoint,
    load_model,
    load_model_with_report,
    load_torch_state_dict,
    read_state_dict,
)
from resnext_flax.weights.pretrained import download_pretrained, from_pretrained
from resnext_flax.weights.resolve import CheckpointLayoutError, CheckpointReport
from resnext_flax.weights.torch_port import (
    StateDictMismatchError,
    StateDictReport,
    compare_state_dict,
    infer_architecture,
    to_torch_state_dict,
)

__version__ = "0.1.0"

__all__ = [
    "CONSTRUCTORS",
    "FEATURE_NAMES",
    "VARIANTS",
    "WEIGHT_SETS",
    "Augmentation",
    "BasicBlock",
    "Bottleneck",
    "CheckpointError",
    "CheckpointLayoutError",
    "CheckpointReport",
    "ChecksumError",
    "DatasetError",
    "EvaluationResult",
    "FeatureExtractor",
    "FinetuneConfig",
    "FinetuneResult",
    "FoldedResNet",
    "ImageDataset",
    "LoaderOptions",
    "ModelOptions",
    "ModelSpec",
    "Predictions",
    "Predictor",
    "Preprocessing",
    "ResNet",
    "StateDictMismatchError",
    "StateDictReport",
    "TrainState",
    "UntrustedPickleError",
    "WeightSet",
    "WeightsUnavailableError",
    "compare_state_dict",
    "create_model",
    "create_train_state",
    "download_pretrained",
    "evaluate",
    "evaluate_pretrained",
    "finetune",
    "fold_batchnorm",
    "from_pretrained",
    "get_weight_set",
    "image_folder",
    "imagenet_categories",
    "imagenet_wnids",
    "infer_architecture",
    "inspect_checkpoint",
    "list_models",
    "list_weight_sets",
    "load_checkpoint",
    "load_dataset",
    "load_image",
    "load_model",
    "load_model_with_report",
    "load_torch_state_dict",
    "make_train_step",
    "optimize_for_inference",
    "preprocess",
    "preprocess_image",
    "read_list_file",
    "read_state_dict",
    "replace_head",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "save_checkpoint",
    "to_torch_state_dict",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
