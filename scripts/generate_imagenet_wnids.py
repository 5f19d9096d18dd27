"""Write ``resnext_flax/data/imagenet_wnids.txt``: the 1000 ImageNet-1K WordNet ids, index by
index in the order of the class names (``imagenet_categories.txt``).

torchvision numbers ImageNet's classes by sorted WordNet id (its ``ImageNet`` dataset sorts the
devkit's ids), but it ships no list of the ids. They come from a source that is available
offline: the wheel of the ``timm`` package (``timm/data/_info/imagenet_synsets.txt`` and
``imagenet_synset_to_lemma.txt``), read from the wheel file without installing it:

    pip download timm --no-deps -d /tmp/timm       # or any timm wheel already on disk
    python scripts/generate_imagenet_wnids.py /tmp/timm/timm-*.whl

The script refuses to write unless the ids are 1000 distinct, sorted ``n########`` ids and
each of the library's 1000 class names is a lemma of the id at the same index (``RENAMED``:
the two names torchvision disambiguated).
"""

from __future__ import annotations

import pathlib
import re
import sys
import zipfile

import resnext_flax
from resnext_flax.metadata import imagenet_categories

OUTPUT = pathlib.Path(resnext_flax.__file__).parent / "data" / "imagenet_wnids.txt"
SYNSETS = "timm/data/_info/imagenet_synsets.txt"
LEMMAS = "timm/data/_info/imagenet_synset_to_lemma.txt"


#: torchvision's two disambiguated class names -> the lemma they stand for.
RENAMED = {"crane bird": "crane", "maillot tank suit": "tank suit"}


def _matches(category: str, lemmas: str) -> bool:
    names = [name.strip().lower() for name in lemmas.split(",")]
    return RENAMED.get(category, category).lower() in names


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as archive:
        wnids = archive.read(SYNSETS).decode().split()
        lemmas = dict(line.split("\t", 1) for line in archive.read(LEMMAS).decode().splitlines())
    if len(wnids) != 1000 or len(set(wnids)) != 1000 or wnids != sorted(wnids):
        raise SystemExit("expected 1000 distinct WordNet ids in sorted order")
    if not all(re.fullmatch(r"n\d{8}", w) for w in wnids):
        raise SystemExit("not every line is a WordNet id n########")
    categories = imagenet_categories()
    wrong = [(i, w, c) for i, (w, c) in enumerate(zip(wnids, categories, strict=True))
             if not _matches(c, lemmas[w])]
    if wrong:
        raise SystemExit(f"class names do not match the ids' lemmas: {wrong[:10]}")
    OUTPUT.write_text("\n".join(wnids) + "\n", encoding="utf-8")
    print(f"wrote {OUTPUT} (1000 ids, every class name matches its id's lemmas)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
