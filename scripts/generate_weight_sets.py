"""Regenerate the weight-set tables of ``resnext_flax/weights/catalog.py``.

- no option: torchvision's rows from its weight enums. Run once per torchvision release and
  paste the printed ``_ROWS`` block into ``resnext_flax/weights/catalog.py``; it also rewrites
  ``resnext_flax/data/imagenet_categories.txt``.
- ``--costs``: parameters and GFLOPS (multiply-adds at 224x224, counted as torchvision counts
  them: torch's FlopCounterMode on the meta device, nothing allocated) of the models
  torchvision publishes no weights for, as ``_COSTS_BEYOND_TORCHVISION``.
- ``--markdown``: the table of weight sets beyond torchvision's (``data/weight_sets.csv``, as
  the catalog reads it) for ``docs/weight_sets.md``.

The library never imports torchvision at run time; ``tests/test_weight_sets.py`` checks the
pasted tables against the installed torchvision.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
import torchvision
from torchvision.models import get_model_weights
from torchvision.transforms import InterpolationMode

import resnext_flax

CATEGORIES = pathlib.Path(resnext_flax.__file__).parent / "data" / "imagenet_categories.txt"


def _q(text: str) -> str:
    return json.dumps(text)


def torchvision_rows() -> None:
    categories = None
    rows = []
    for name in resnext_flax.list_models():
        if name not in torchvision.models.list_models():
            continue  # the wider WSL ResNeXts: see --costs
        enum = get_model_weights(name)
        for weights in enum:
            meta, transform = weights.meta, weights.transforms()
            if categories is None:
                categories = list(meta["categories"])
            if list(meta["categories"]) != categories:
                raise SystemExit(f"{name}.{weights.name}: categories differ from the others")
            if (transform.interpolation != InterpolationMode.BILINEAR or not transform.antialias
                    or transform.mean != [0.485, 0.456, 0.406]
                    or transform.std != [0.229, 0.224, 0.225]):
                raise SystemExit(f"{name}.{weights.name}: preprocessing is not the ImageNet one")
            metrics = meta["_metrics"]["ImageNet-1K"]
            rows.append(
                f"    ({_q(name)}, {_q(weights.name)}, {weights == enum.DEFAULT!r},\n"
                f"     {_q(weights.url)},\n"
                f"     {transform.resize_size[0]}, {transform.crop_size[0]}, "
                f"{metrics['acc@1']!r}, {metrics['acc@5']!r}, {meta['num_params']:_}, "
                f"{meta['_ops']!r}, {meta['_file_size']!r},\n"
                f"     {_q(meta['recipe'])}),"
            )
    CATEGORIES.write_text("\n".join(categories) + "\n", encoding="utf-8")
    print("_ROWS = (\n" + "\n".join(rows) + "\n)")


def costs() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from resnext_flax.models.variants import get_spec

    lines = []
    for name in resnext_flax.list_models():
        if name in torchvision.models.list_models():
            continue
        spec = get_spec(name)
        with torch.device("meta"):
            model = torchvision.models.ResNet(
                torchvision.models.resnet.Bottleneck, list(spec.layers), groups=spec.groups,
                width_per_group=spec.width_per_group).eval()
            with FlopCounterMode(display=False) as flops:
                model(torch.empty(1, 3, 224, 224))
        params = sum(p.numel() for p in model.parameters())
        lines.append(f"    {_q(name)}: ({params:_}, {round(flops.get_total_flops() / 2e9, 3)!r}),")
    print("_COSTS_BEYOND_TORCHVISION = {\n" + "\n".join(lines) + "\n}")


def markdown() -> None:
    from resnext_flax.weights.catalog import list_weight_sets

    print("| weight set | source | license | acc@1 | acc@5 | resize/crop, interpolation | "
          "Hub repository |")
    print("|---|---|---|---|---|---|---|")
    for ws in list_weight_sets():
        if ws.source == "torchvision":
            continue
        pre = ws.preprocessing
        acc = ["-" if a is None else format(a, "g") for a in (ws.acc1, ws.acc5)]
        default = " (DEFAULT)" if ws.is_default else ""
        print(f"| `{ws.name}`{default} | {ws.source} | {ws.license} | {acc[0]} | {acc[1]} | "
              f"{pre.resize_size}/{pre.crop_size}, {pre.interpolation} | `{ws.hub_id}` |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--costs", action="store_true", help="the wider models' costs")
    group.add_argument("--markdown", action="store_true", help="the docs' table")
    args = parser.parse_args()
    if args.costs:
        costs()
    elif args.markdown:
        markdown()
    else:
        torchvision_rows()


if __name__ == "__main__":
    main()
