"""Other projects' names for a ResNet trunk's weights, renamed to torchvision's (which
``weights.torch_port`` maps): ``nn.Sequential(*list(resnet.children()))`` indices and Hugging
Face transformers' ``ResNetModel`` modules, and the prefixes a trunk may sit under. Which trunk
to take from a file is ``foreign.resolve``'s business.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

TRUNK_CHILDREN = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
#: ``nn.Sequential(*list(resnet.children()))`` indices -> torchvision names (2: relu,
#: 3: maxpool, 8: avgpool hold no weights).
_SEQUENTIAL_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3",
                        "7": "layer4", "9": "fc"}
_TRANSFORMERS_STEM = "embedder.embedder."

KEY_STYLES = {
    "torchvision": "torchvision names",
    "sequential": "nn.Sequential(*list(resnet.children())) numbering (0=conv1, 1=bn1, "
                  "4..7=layer1..layer4)",
    "transformers": "Hugging Face transformers ResNet names",
}


def rename_sequential(keys: Collection[str]) -> dict[str, str]:
    """old -> new names for trunks saved as ``nn.Sequential(*list(resnet.children())...)``."""
    keys = set(keys)
    renames = {}
    for key in keys:
        m = re.match(r"(.*?)4\.0\.conv1\.weight$", key)
        if not m or (m.group(1) and not m.group(1).endswith(".")):
            continue
        prefix = m.group(1)
        if prefix + "0.weight" not in keys:
            continue
        for old in keys:
            parts = old[len(prefix):].split(".", 1)
            if old.startswith(prefix) and len(parts) == 2 and parts[0] in _SEQUENTIAL_CHILDREN:
                renames[old] = f"{prefix}{_SEQUENTIAL_CHILDREN[parts[0]]}.{parts[1]}"
    return renames


_TRANSFORMERS_BLOCK = re.compile(
    r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:layer\.(\d+)|(shortcut))\."
    r"(convolution|normalization)\.(.+)$")


def rename_transformers(keys: Collection[str]) -> dict[str, str]:
    """old -> new names for Hugging Face transformers' ``ResNetModel`` /
    ``ResNetForImageClassification`` keys (``resnet.embedder.embedder.convolution.weight``,
    ``resnet.encoder.stages.{i}.layers.{j}.layer.{k}.…``, ``classifier.1.weight``)."""
    keys = set(keys)
    renames = {}
    stems = {k[: -len(_TRANSFORMERS_STEM + "convolution.weight")] for k in keys
             if k.endswith(_TRANSFORMERS_STEM + "convolution.weight")}
    for prefix in stems:
        if prefix and not prefix.endswith("."):
            continue
        for old in keys:
            if not old.startswith(prefix):
                continue
            rest = old[len(prefix):]
            if rest.startswith(_TRANSFORMERS_STEM):
                module, _, leaf = rest[len(_TRANSFORMERS_STEM):].partition(".")
                name = {"convolution": "conv1", "normalization": "bn1"}.get(module)
                if name:
                    renames[old] = f"{prefix}{name}.{leaf}"
            elif m := _TRANSFORMERS_BLOCK.match(rest):
                stage, block, conv, shortcut, module, leaf = m.groups()
                conv_module = module == "convolution"
                if shortcut:
                    name = "downsample.0" if conv_module else "downsample.1"
                else:
                    name = f"{'conv' if conv_module else 'bn'}{int(conv) + 1}"
                renames[old] = f"{prefix}layer{int(stage) + 1}.{block}.{name}.{leaf}"
        # ResNetForImageClassification: the head sits beside ``resnet.``, as ``classifier.1``.
        if prefix.endswith("resnet."):
            outer = prefix[: -len("resnet.")]
            for leaf in ("weight", "bias"):
                if f"{outer}classifier.1.{leaf}" in keys:
                    renames[f"{outer}classifier.1.{leaf}"] = f"{prefix}fc.{leaf}"
    return renames


def trunk_prefixes(keys: Mapping[str, Any]) -> list[str]:
    """Prefixes under which torchvision-named trunk keys (``conv1.weight`` or
    ``layerS.B.conv1.weight``) sit, complete or not."""
    found = set()
    for key in keys:
        m = re.match(r"(.*?)(?:layer[1-4]\.\d+\.)?conv1\.weight$", key)
        if m and (not m.group(1) or m.group(1).endswith(".")):
            found.add(m.group(1))
    return sorted(p for p in found if any(k.startswith(p + "layer") for k in keys)
                  or p + "bn1.weight" in keys)


