"""The one table of architectures: torchvision's ten ResNet-family models and the wider
ResNeXt-101s of the weakly supervised (Instagram) pre-training, which only change the width.

Pure data, kept apart from weight metadata (URLs, accuracies, preprocessing) and from code.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Literal

from resnext_flax.errors import UnknownModelError, short_repr

BlockKind = Literal["basic", "bottleneck"]

#: The most blocks one stage may have. The table's deepest stage has 36 (resnet152's layer3);
#: the bound leaves room for deeper relatives (ResNet-200/269: 36 and 48) while keeping what a
#: file's header can make the library build, and XLA compile, bounded.
MAX_BLOCKS_PER_STAGE = 64
#: The most blocks all four stages may have together: twice the table's deepest (resnet152's
#: 50), room for ResNet-200/269 (66 and 89). XLA's compile time grows faster than the block
#: count, so this keeps the first call of a model a file describes within minutes.
MAX_BLOCKS = 100
#: The most channels a block's grouped 3x3 conv may have (the last stage's
#: ``int(512 * width_per_group / 64) * groups``). The table's widest, resnext101_32x48d (the
#: widest published ResNeXt), has 12288; the bound leaves room for relatives a few times wider.
MAX_BLOCK_WIDTH = 65536


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Hyper-parameters that define one ResNet-family architecture (torchvision's names).

    **Arguments:**
    - `block`: "basic" (two 3x3 convs) or "bottleneck" (1x1, grouped 3x3, 1x1); the block
      classes in ``models.resnet`` carry their channel expansion (1 and 4).
    - `layers`: number of blocks in each of the four stages.
    - `groups`: cardinality of the grouped 3x3 conv (ResNeXt); 1 for plain ResNets.
    - `width_per_group`: torchvision's `base_width`; the bottleneck width is
      `int(planes * width_per_group / 64) * groups`.
    """

    block: BlockKind
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64

    def __post_init__(self) -> None:
        problems = []
        if self.block not in ("basic", "bottleneck"):
            problems.append(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        layers = self.layers
        if not (isinstance(layers, tuple) and len(layers) == 4
                and all(_positive_int(n) and n <= MAX_BLOCKS_PER_STAGE for n in layers)):
            problems.append(f"layers must be 4 ints from 1 to {MAX_BLOCKS_PER_STAGE} "
                            f"(MAX_BLOCKS_PER_STAGE), got {short_repr(layers)}")
        elif sum(layers) > MAX_BLOCKS:
            problems.append(f"layers must add up to at most {MAX_BLOCKS} blocks (MAX_BLOCKS), "
                            f"got {layers!r}: {sum(layers)}")
        widths = True
        for field in ("groups", "width_per_group"):
            if not _positive_int(getattr(self, field)):
                problems.append(f"{field} must be a positive int, got "
                                f"{short_repr(getattr(self, field))}")
                widths = False
        widest = self.groups * self.width_per_group * 512 // 64 if widths else 0  # exact ints
        if widest > MAX_BLOCK_WIDTH:
            problems.append(f"groups={short_repr(self.groups)} with width_per_group="
                            f"{short_repr(self.width_per_group)} makes the last stage's grouped "
                            f"conv {short_repr(widest)} channels wide, above {MAX_BLOCK_WIDTH} "
                            "(MAX_BLOCK_WIDTH)")
        if self.block == "basic" and (self.groups, self.width_per_group) != (1, 64):
            problems.append("a 'basic' block needs groups=1 and width_per_group=64")
        if problems:
            raise ValueError("invalid ModelSpec: " + "; ".join(problems))

    def block_width(self, planes: int) -> int:
        """Channels inside a block of `planes` (the grouped conv's width for bottlenecks)."""
        return int(planes * (self.width_per_group / 64.0)) * self.groups


VARIANTS: MappingProxyType[str, ModelSpec] = MappingProxyType(
    {
        "resnet18": ModelSpec("basic", (2, 2, 2, 2)),
        "resnet34": ModelSpec("basic", (3, 4, 6, 3)),
        "resnet50": ModelSpec("bottleneck", (3, 4, 6, 3)),
        "resnet101": ModelSpec("bottleneck", (3, 4, 23, 3)),
        "resnet152": ModelSpec("bottleneck", (3, 8, 36, 3)),
        "resnext50_32x4d": ModelSpec("bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4),
        "resnext101_32x8d": ModelSpec("bottleneck", (3, 4, 23, 3), groups=32, width_per_group=8),
        "resnext101_64x4d": ModelSpec("bottleneck", (3, 4, 23, 3), groups=64, width_per_group=4),
        "resnext101_32x16d": ModelSpec("bottleneck", (3, 4, 23, 3), groups=32, width_per_group=16),
        "resnext101_32x32d": ModelSpec("bottleneck", (3, 4, 23, 3), groups=32, width_per_group=32),
        "resnext101_32x48d": ModelSpec("bottleneck", (3, 4, 23, 3), groups=32, width_per_group=48),
        "wide_resnet50_2": ModelSpec("bottleneck", (3, 4, 6, 3), width_per_group=128),
        "wide_resnet101_2": ModelSpec("bottleneck", (3, 4, 23, 3), width_per_group=128),
    }
)


def get_spec(name: str) -> ModelSpec:
    """The spec for a torchvision model name; unknown names list the known ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(VARIANTS)}"
        ) from None


def find_variant(spec: ModelSpec) -> str | None:
    """The name of an architecture in the table, or None if it is not one of them."""
    return next((name for name, known in VARIANTS.items() if known == spec), None)
