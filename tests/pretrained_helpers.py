"""Shared helpers for the pretrained-weights, preprocessing, inference and CLI tests: local
torchvision-named weight files (random weights, no download) and scikit-learn's photographs."""

from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np
import torch
from PIL import Image
from torchvision.models import get_model_weights


def sample_image_paths() -> list[str]:
    """The two JPEG photographs scikit-learn ships (china.jpg 640x427, flower.jpg 640x427)."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().filenames)


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def save_torchvision_file(
    model: torch.nn.Module, directory: pathlib.Path, arch: str
) -> pathlib.Path:
    """Save `model`'s state dict under torchvision's naming rule, ``<arch>-<sha256[:8]>.pth``,
    with the prefix of *this* file's hash (the real file names carry the real files' hashes)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{arch}.tmp"
    torch.save(model.state_dict(), tmp)
    path = directory / f"{arch}-{sha256(tmp)[:8]}.pth"
    tmp.rename(path)
    return path


def torchvision_pipeline(
    model: torch.nn.Module, arch: str, paths: list[str], tag: str = "DEFAULT"
) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's own pipeline: ``weights.transforms()`` on PIL images, then the model.
    Returns (NCHW float32 inputs, logits)."""
    weights = get_model_weights(arch)[tag]
    transform = weights.transforms()
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        logits = model(batch)
    return batch.numpy(), logits.numpy()


def torch_top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's softmax + topk: (probabilities, indices), best first."""
    probs = torch.softmax(torch.from_numpy(logits), dim=-1)
    top = torch.topk(probs, k, dim=-1)
    return top.values.numpy(), top.indices.numpy()
