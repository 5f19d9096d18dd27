"""Regenerate the weight-set table of ``resnext_flax/weights/catalog.py`` from torchvision's enums.

Run once per torchvision release and paste the printed ``_ROWS`` block into
``resnext_flax/weights/catalog.py``; it also rewrites ``resnext_flax/data/imagenet_categories.txt``.
The library never imports torchvision at run time; ``tests/test_weight_sets.py`` checks the
pasted table against the installed torchvision.
"""

from __future__ import annotations

import json
import pathlib

from torchvision.models import get_model_weights, list_models
from torchvision.transforms import InterpolationMode

import resnext_flax

CATEGORIES = pathlib.Path(resnext_flax.__file__).parent / "data" / "imagenet_categories.txt"


def _q(text: str) -> str:
    return json.dumps(text)


def main() -> None:
    categories = None
    rows = []
    for name in resnext_flax.list_models(include=list_models()):  # torchvision's models
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


if __name__ == "__main__":
    main()
