"""The documentation runs as written: every fenced ``python`` block of README.md and docs/*.md,
each page's blocks in order as one script in a fresh process, in an empty folder.

What a reader's machine would supply is staged there instead, generically, never per block:
the files the docs name (photographs, torchvision and converted checkpoints of the named
architectures with random weights, an image folder) and a library cache that already holds
every weight set the docs load, so ``weights="DEFAULT"`` resolves with the network off.
A block is left out only behind a ``<!-- docs-test: skip: <why> -->`` line right above it, for
what no single CPU process can run at all (a multi-host launch); those blocks are listed in
:data:`NOT_RUN` and counted, so none is dropped silently.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from folder_helpers import learnable_folder, photo_crop, write_image
from limits import CHILD_TIMEOUT

import resnext_flax
from resnext_flax.metadata import imagenet_wnids
from resnext_flax.weights.cache import CACHE_ENV, OFFLINE_ENV, cached_checkpoint_path
from resnext_flax.weights.catalog import get_weight_set

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md"))]

#: Blocks that are not run, by page and first line: each needs machines a test does not have.
NOT_RUN = {
    ("docs/distributed.md", "jax.distributed.initialize(coordinator_address=\"node0:1234\", "
                         "num_processes=N, process_id=i)"),
}
#: Folders the docs name by the absolute path a reader's own data would have, and the staged
#: stand-in (relative to the run's folder) the script reads instead.
USER_PATHS = {"/data/imagenet/val": "imagenet/val"}
#: Weight sets the docs load by name; the staged cache holds them (random weights).
WEIGHT_SETS = [("resnet18", "DEFAULT"), ("resnet50", "IMAGENET1K_V1"),
               ("resnet50", "IMAGENET1K_V2"), ("resnext50_32x4d", "DEFAULT")]
#: Weight files the docs open by name: (file, architecture, classes).
FILES = [("checkpoint.pth", "resnet50", 1000), ("resnet50-11ad3fa6.pth", "resnet50", 1000),
         ("finetuned.pth", "resnet18", 10)]

#: Images per class of the staged ``photos/`` folder (three classes): a fine-tune with the
#: default batch size (64) and 10% held out needs more than one training batch.
PHOTOS_PER_CLASS = 25

_FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.S | re.M)
_MARKER = re.compile(r"<!--\s*docs-test:\s*skip:\s*(.+?)\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the block's first code line in the page
    code: str
    skip: str | None  # why it is not run, from its marker


def page_blocks(page: str) -> list[Block]:
    """The ``python`` blocks of `page`, with the skip marker each has on the line above."""
    text = (ROOT / page).read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        if match.group(1) != "python":
            continue
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        blocks.append(Block(page, text.count("\n", 0, match.start()) + 2, match.group(2),
                            marker.group(1) if marker else None))
    return blocks


def page_script(page: str) -> str:
    """The page's runnable blocks as one script whose line numbers are the page's own, so a
    traceback points into the Markdown; the user paths replaced by their stand-ins."""
    lines = [""] * (ROOT / page).read_text().count("\n")
    for block in page_blocks(page):
        if block.skip is None:
            for i, line in enumerate(block.code.splitlines()):
                lines[block.line - 1 + i] = line
    script = "\n".join(lines) + "\n"
    for path, stand_in in USER_PATHS.items():
        script = script.replace(f'"{path}', f'"{stand_in}')
    return script


def test_every_python_block_is_found_and_only_the_listed_ones_are_not_run():
    blocks = [b for page in PAGES for b in page_blocks(page)]
    text = "\n".join((ROOT / page).read_text() for page in PAGES)
    assert len(blocks) == text.count("```python"), "a ```python fence the parser missed"
    skipped = {(b.page, b.code.splitlines()[0]) for b in blocks if b.skip is not None}
    assert skipped == NOT_RUN
    assert len(blocks) - len(skipped) >= 20  # the run covers the docs, not a few blocks


def _torch_file(path: pathlib.Path, arch: str, num_classes: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    torch.save(model.state_dict(), path)


@pytest.fixture(scope="module")
def reader_folder(tmp_path_factory) -> pathlib.Path:
    return stage_reader_folder(tmp_path_factory.mktemp("docs"))


def stage_reader_folder(root: pathlib.Path) -> pathlib.Path:
    """Fill `root` with what the pages' readers would have, and the library cache."""
    for name, which in (("cat.jpg", 0), ("dog.jpg", 1)):
        write_image(root / name, photo_crop(which, np.random.default_rng(which), 120, 300))
    for name, arch, classes in FILES:
        _torch_file(root / name, arch, classes)
    cache = root / "cache"
    for arch, tag in WEIGHT_SETS:
        ws = get_weight_set(arch, tag)
        _torch_file(root / "source.pth", arch, ws.num_classes)
        dest = cached_checkpoint_path(ws, cache)
        dest.parent.mkdir(parents=True, exist_ok=True)
        resnext_flax.save_checkpoint(
            resnext_flax.load_model(root / "source.pth", arch), dest,
            metadata={"weights": ws.name, "source_url": ws.url,
                      "source_sha256": ws.sha256_prefix.ljust(64, "0")},
            classes=ws.categories, preprocessing=ws.preprocessing)
    (root / "source.pth").unlink()
    os.link(cached_checkpoint_path(get_weight_set("resnext50_32x4d", "DEFAULT"), cache),
            root / "resnext50.safetensors")
    learnable_folder(root / "photos", per_class=PHOTOS_PER_CLASS)
    for i, wnid in enumerate(imagenet_wnids()[:3]):
        for j in range(2):
            write_image(root / USER_PATHS["/data/imagenet/val"] / wnid / f"{j}.jpg",
                        photo_crop((i + j) % 2, np.random.default_rng(10 * i + j)))
    return root


@pytest.mark.parametrize("page", [p for p in PAGES
                                  if any(b.skip is None for b in page_blocks(p))])
def test_page_runs_as_written(page: str, reader_folder: pathlib.Path):
    done = run_page(page, reader_folder)
    assert done.returncode == 0, (
        f"{page}: a block failed (line numbers are the page's)\n{done.stderr[-6000:]}")


def run_page(page: str, reader_folder: pathlib.Path) -> subprocess.CompletedProcess:
    """Run `page`'s script in a folder of its own that links the staged files."""
    run = reader_folder / "runs" / page.replace("/", "_").replace(".md", "")
    run.mkdir(parents=True, exist_ok=False)
    for entry in reader_folder.iterdir():
        if entry.name not in ("runs", "cache"):
            (run / entry.name).symlink_to(entry)
    script = run / (run.name + ".py")
    script.write_text(page_script(page))
    env = {**os.environ, CACHE_ENV: str(reader_folder / "cache"), OFFLINE_ENV: "1",
           "TORCH_HOME": str(run / "torch_home"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, script.name], cwd=run, env=env, text=True,
                          capture_output=True, timeout=CHILD_TIMEOUT)


def test_to_torch_state_dict_loads_into_torchvision_strictly():
    model = resnext_flax.resnet18(num_classes=10)
    tensors = resnext_flax.to_torch_state_dict(model, as_torch=True)
    reference = torchvision.models.resnet18(num_classes=10).state_dict()
    assert list(tensors) == list(reference)  # torchvision's keys, in its order
    for key, value in reference.items():
        assert isinstance(tensors[key], torch.Tensor), key
        assert tensors[key].dtype == value.dtype and tensors[key].shape == value.shape, key
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(tensors, strict=True)
    arrays = resnext_flax.to_torch_state_dict(model)  # numpy, without torch's step counters
    assert set(arrays) == {k for k in reference if not k.endswith("num_batches_tracked")}
    for key, array in arrays.items():
        torch.testing.assert_close(fresh.state_dict()[key], torch.from_numpy(array),
                                   rtol=0, atol=0)
    with pytest.raises(TypeError, match="convert the model it was made from"):
        resnext_flax.to_torch_state_dict(resnext_flax.optimize_for_inference(model))
