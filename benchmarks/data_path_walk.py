"""How far a value travels through the package: the stops (calls of a library function that
receive it as an argument), the files they are in, and the returns to a file already left.

A design measure, not a speed one: a value resolved once and carried by the model makes few
stops in few files; a value re-resolved by every consumer makes many, back and forth.

    python benchmarks/data_path_walk.py            # both walks, a table
    python benchmarks/data_path_walk.py --verbose  # and every stop

Walks (offline: a converted checkpoint is placed in a temporary weight cache first):
- ``create_model``: ``create_model("resnet18", weights="DEFAULT")``, following the name and
  the tag;
- ``finetune``: one epoch of ``finetune`` on a 2-class, 16-image folder from the same
  weights, following the config object and its model name and weight tag.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

PACKAGE = "resnext_flax"


@dataclasses.dataclass
class Walk:
    stops: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, function)

    @property
    def files(self) -> int:
        return len({f for f, _ in self.stops})

    @property
    def returns(self) -> int:
        seen, previous, count = set(), None, 0
        for file, _ in self.stops:
            if file != previous:
                count += file in seen
                seen.add(file)
                previous = file
        return count


def _package_root() -> str:
    import resnext_flax

    return str(pathlib.Path(resnext_flax.__file__).parent)


def _derived(value: Any) -> bool:
    """Values that carry what was resolved (names, tags, paths, weight sets, metadata), not
    models or arrays, which every later function receives anyway."""
    if value is None or isinstance(value, bool | int | float):
        return False
    module = type(value).__module__
    if module.startswith(("jax", "flax", "numpy", "optax")) or hasattr(value, "shape"):
        return False
    return not any(c.__module__.startswith("flax") for c in type(value).__mro__)


def _matches(value: Any, tracked: list[Any]) -> bool:
    for target in tracked:
        if value is target:
            return True
        if isinstance(target, str) and isinstance(value, str) and value == target:
            return True
    return False


@contextlib.contextmanager
def following(values: tuple[Any, ...]) -> Iterator[Walk]:
    """Record every call of a package function that gets one of `values`, or a value a
    recorded call returned (see ``_derived``), as an argument."""
    root = _package_root()
    walk = Walk()
    tracked = list(values)
    stop_frames: set[int] = set()

    def profile(frame, event, arg):
        if not frame.f_code.co_filename.startswith(root):
            return
        if event == "return" and id(frame) in stop_frames:
            stop_frames.discard(id(frame))
            if _derived(arg) and not _matches(arg, tracked):
                tracked.append(arg)
            return
        if event != "call":
            return
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        if any(_matches(frame.f_locals.get(n), tracked) for n in names):
            rel = os.path.relpath(code.co_filename, os.path.dirname(root))
            walk.stops.append((rel, code.co_qualname))
            stop_frames.add(id(frame))

    sys.setprofile(profile)
    try:
        yield walk
    finally:
        sys.setprofile(None)


def _forge_cache(cache: pathlib.Path) -> None:
    """A converted resnet18 in the cache, recorded as converted from the DEFAULT file."""
    import resnext_flax
    from resnext_flax.weights import cache as weight_cache

    ws = _default_weight_set()
    model = resnext_flax.create_model("resnet18")
    path = weight_cache.cached_checkpoint_path(ws, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = ws.sha256_prefix.ljust(64, "0")
    _save_converted(model, path, ws, digest)


def _default_weight_set() -> Any:
    try:
        from resnext_flax.weights.catalog import get_weight_set
    except ImportError:  # moved by a later layout
        from resnext_flax.weights import get_weight_set
    return get_weight_set("resnet18", "DEFAULT")


def _save_converted(model: Any, path: pathlib.Path, ws: Any, digest: str) -> None:
    from resnext_flax.weights.checkpoint import save_checkpoint

    save_checkpoint(model, path, metadata={"source_sha256": digest, "weights": ws.name},
                    classes=ws.categories, preprocessing=ws.preprocessing)


def _folder(root: pathlib.Path) -> pathlib.Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def walk_create_model() -> Walk:
    import resnext_flax

    with following(("resnet18", "DEFAULT")) as walk:
        resnext_flax.create_model("resnet18", weights="DEFAULT")
    return walk


def walk_finetune(tmp: pathlib.Path) -> Walk:
    from resnext_flax.finetuning import FinetuneConfig, finetune

    data = _folder(tmp / "data")
    config = FinetuneConfig(model="resnet18", weights="DEFAULT", epochs=1, batch_size=8,
                            resize_size=16, crop_size=16, val_split=0.25)
    with following((config, "resnet18", "DEFAULT")) as walk:
        finetune(data, config, tmp / "run", progress=False, log=lambda _: None)
    return walk


WALKS: dict[str, Callable[[pathlib.Path], Walk]] = {
    "create_model": lambda tmp: walk_create_model(),
    "finetune": walk_finetune,
}


def main(argv: list[str] | None = None) -> dict[str, Walk]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--verbose", action="store_true", help="list every stop")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        os.environ["RESNEXT_FLAX_CACHE"] = str(tmp_path / "cache")
        os.environ["RESNEXT_FLAX_OFFLINE"] = "1"
        _forge_cache(tmp_path / "cache")
        for name, run in WALKS.items():
            results[name] = run(tmp_path)
    print("| walk | stops | files | returns to a file already left |")
    print("|---|---|---|---|")
    for name, walk in results.items():
        print(f"| {name} | {len(walk.stops)} | {walk.files} | {walk.returns} |")
    if args.verbose:
        for name, walk in results.items():
            print(f"\n{name}:")
            for file, function in walk.stops:
                print(f"  {file}: {function}")
    return results


if __name__ == "__main__":
    main()
