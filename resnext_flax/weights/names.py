"""The names a ResNet trunk's weights come under, and torchvision's, which this library maps.

torchvision's keys (``layer1.0.conv2.weight``) are the reference: their shapes for every
architecture (:func:`torchvision_shapes`), the architecture a state dict was saved from
(:func:`infer_spec`), and the wrapper prefixes of DataParallel and ``torch.compile``. Other
projects' names are renamed to torchvision's here: ``nn.Sequential(*list(resnet.children()))``
indices and Hugging Face transformers' ``ResNetModel`` modules. Which trunk to take from a file
is ``weights.resolve``'s business.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from resnext_flax.models.variants import ModelSpec, find_variant

IGNORED_SUFFIXES = ("num_batches_tracked",)  # torch's BN step counter; no Flax counterpart
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile
TRUNK_CHILDREN = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
_BN_LEAVES = ("weight", "bias", "running_mean", "running_var")
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


# ---- torchvision's names ---------------------------------------------------------------------


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Strip DataParallel/DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes and
    drop ``num_batches_tracked``; values are left as they are."""
    out = {}
    for key, value in state_dict.items():
        key = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key.endswith(IGNORED_SUFFIXES):
            continue
        out[key] = value
    return out


def torchvision_shapes(spec: ModelSpec, num_classes: int = 0) -> dict[str, tuple[int, ...]]:
    """Every key of torchvision's state dict for `spec` (without ``num_batches_tracked``)
    and its shape; ``fc`` only if `num_classes` > 0. Lets a file be checked for a complete
    trunk without building a model."""
    def bn(name: str, n: int) -> dict[str, tuple[int, ...]]:
        return {f"{name}.{leaf}": (n,) for leaf in _BN_LEAVES}

    basic = spec.block == "basic"
    expansion = 1 if basic else 4
    shapes = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), spec.layers,
                                                 strict=True), start=1):
        stride = 1 if stage == 1 else 2
        width, out = (planes if basic else spec.block_width(planes)), planes * expansion
        for b in range(blocks):
            p, cin = f"layer{stage}.{b}.", inplanes if b == 0 else out
            if basic:
                convs = [(width, cin, 3), (out, width, 3)]
            else:
                convs = [(width, cin, 1), (width, width // spec.groups, 3), (out, width, 1)]
            for i, (o, c, k) in enumerate(convs, start=1):
                shapes[f"{p}conv{i}.weight"] = (o, c, k, k)
                shapes.update(bn(f"{p}bn{i}", o))
            if b == 0 and (stride != 1 or inplanes != out):
                shapes[f"{p}downsample.0.weight"] = (out, inplanes, 1, 1)
                shapes.update(bn(f"{p}downsample.1", out))
        inplanes = out
    if num_classes:
        shapes.update({"fc.weight": (num_classes, inplanes), "fc.bias": (num_classes,)})
    return shapes


def infer_spec(state_dict: Mapping[str, Any]) -> tuple[ModelSpec, int] | None:
    """The architecture and class count (0: no linear ``fc``) a torchvision-named state dict
    was saved from, or None if its keys do not describe a ResNet-family model."""
    sd = normalize_state_dict(state_dict)
    try:
        blocks = []
        for stage in range(1, 5):
            indices = {int(m.group(1)) for k in sd
                       if (m := re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", k))}
            blocks.append(len(indices))
        bottleneck = "layer1.0.conv3.weight" in sd
        conv2 = tuple(sd["layer1.0.conv2.weight"].shape)
        fc = sd.get("fc.weight")
        num_classes = int(fc.shape[0]) if fc is not None and len(fc.shape) == 2 else 0
        if not all(blocks):
            return None
        if bottleneck:
            width, per_group = conv2[0], conv2[1]
            spec = ModelSpec("bottleneck", tuple(blocks), groups=width // per_group,
                             width_per_group=per_group)
        else:
            spec = ModelSpec("basic", tuple(blocks))
    except (KeyError, AttributeError, IndexError, TypeError, ValueError, ZeroDivisionError):
        return None
    return spec, num_classes


def infer_architecture(state_dict: Mapping[str, Any]) -> str | None:
    """torchvision's name for the architecture of a state dict, or None if not one of ours."""
    inferred = infer_spec(state_dict)
    return find_variant(inferred[0]) if inferred else None


def arch_phrase(spec: ModelSpec | None) -> str:
    """``"resnet50"``, or what else `spec` is, for messages."""
    if spec is None:
        return "an unknown architecture"
    return find_variant(spec) or f"an unlisted ResNet ({spec})"


def describe(state_dict: Mapping[str, Any]) -> str:
    """One phrase for messages: which architecture the state dict looks like."""
    inferred = infer_spec(state_dict)
    if inferred is None:
        return "it does not look like a torchvision ResNet-family state dict"
    spec, num_classes = inferred
    return f"it looks like {arch_phrase(spec)} with num_classes={num_classes}"


# ---- other projects' names -----------------------------------------------------------------


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


