"""Weights from the Hugging Face Hub: ``hf-hub:<owner>/<repository>[@<revision>]``.

timm publishes its weights (and its copies of Facebook's WSL and SSL/SWSL weights) as Hub
repositories holding ``config.json`` and ``model.safetensors``; for the architectures this
library builds, timm's keys are torchvision's. Files are fetched through ``huggingface_hub``
(the ``hub`` extra), so its cache (``HF_HOME``, ``HF_HUB_CACHE``), token (``HF_TOKEN`` or
``hf auth login``), endpoint (``HF_ENDPOINT``) and offline mode (``HF_HUB_OFFLINE``) apply, as
does this library's ``RESNEXT_FLAX_OFFLINE``. A repository already in the cache is used as it
is, without asking the Hub (so a load needs no network, and no request is made); only
``config.json`` and ``model.safetensors`` are fetched, and the weights are then read as any
local timm folder is (``weights.files``), without torch.

timm's ``config.json`` names the architecture (``architecture``), the classes
(``num_classes``, ``label_names``) and the preprocessing (``pretrained_cfg``: ``input_size``,
``crop_pct``, ``interpolation``, ``mean``, ``std``, ``license``); :func:`read_hub_config`
reads it. The preprocessing is timm's default evaluation transform (``input_size``, not
``test_input_size``): resize the shorter side to ``floor(size / crop_pct)``, center-crop.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from resnext_flax.errors import UnknownModelError, WeightsError, WeightsUnavailableError, short_repr
from resnext_flax.metadata import INTERPOLATIONS, Preprocessing
from resnext_flax.models.variants import VARIANTS
from resnext_flax.weights.cache import OFFLINE_ENV
from resnext_flax.weights.catalog import WeightSet, find_hub_weight_set, list_weight_sets

#: What marks a weights string as a Hub repository (timm's spelling).
HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "config.json"
#: The only weight file fetched: safetensors reads without torch and runs no code.
WEIGHTS_FILE = "model.safetensors"
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
INSTALL_HINT = "pip install 'resnext-flax[hub]' (or pip install huggingface_hub)"


@dataclasses.dataclass(frozen=True)
class HubConfig:
    """What a timm ``config.json`` says about its weights (None: it does not say)."""

    architecture: str
    num_classes: int
    class_names: tuple[str, ...] | None
    preprocessing: Preprocessing | None
    license: str | None
    tag: str | None


def is_hub_id(value: object) -> bool:
    """Whether `value` is a string naming a Hub repository (``hf-hub:...``)."""
    return isinstance(value, str) and value.startswith(HUB_PREFIX)


def parse_hub_id(text: str) -> tuple[str, str | None]:
    """``"hf-hub:timm/resnet50.a1_in1k@rev"`` -> (``"timm/resnet50.a1_in1k"``, ``"rev"``);
    the prefix is optional. ValueError for anything but ``owner/repository[@revision]``."""
    body = text[len(HUB_PREFIX):] if text.startswith(HUB_PREFIX) else text
    repo, at, revision = body.partition("@")
    if not _REPO.fullmatch(repo) or (at and not revision):
        raise WeightsError(f"{text!r} is not a Hub repository: expected "
                           f"{HUB_PREFIX}<owner>/<repository>[@<revision>], e.g. "
                           f"{HUB_PREFIX}timm/resnet50.a1_in1k")
    return repo, revision or None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _preprocessing(cfg: Mapping[str, Any], where: str) -> Preprocessing | None:
    """timm's default evaluation transform as a :class:`Preprocessing` (None where timm
    crops otherwise than from the center: ``crop_mode`` squash or border)."""
    if cfg.get("crop_mode", "center") != "center":
        return None
    size = cfg.get("input_size", [3, 224, 224])
    crop_pct = cfg.get("crop_pct", 0.875)
    if not (isinstance(size, list) and len(size) == 3 and all(_int(v) for v in size)
            and size[0] == 3 and size[1] == size[2]):
        raise WeightsError(f"{where}: pretrained_cfg.input_size must be [3, N, N], got "
                           f"{short_repr(size)}")
    if not (isinstance(crop_pct, int | float) and not isinstance(crop_pct, bool)
            and 0 < crop_pct <= 1):
        raise WeightsError(f"{where}: pretrained_cfg.crop_pct must be in (0, 1], got "
                           f"{short_repr(crop_pct)}")
    interpolation = cfg.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise WeightsError(f"{where}: pretrained_cfg.interpolation {short_repr(interpolation)}"
                           f" is none of {', '.join(INTERPOLATIONS)}")
    try:
        return Preprocessing(
            resize_size=math.floor(size[1] / crop_pct), crop_size=size[1],
            interpolation=interpolation,
            **{k: tuple(cfg[k]) for k in ("mean", "std") if isinstance(cfg.get(k), list)})
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{where}: pretrained_cfg: {err}") from None


def read_hub_config(config: Mapping[str, Any], where: str = CONFIG_FILE) -> HubConfig:
    """The architecture, classes, preprocessing and license a timm ``config.json`` records.
    :class:`~resnext_flax.errors.WeightsError` for a config that is not timm's or whose
    architecture this library does not build (timm's ``resnet50d``, ``seresnext...``)."""
    arch = config.get("architecture")
    if not isinstance(arch, str):
        raise WeightsError(f"{where} names no 'architecture': not a timm model repository "
                           "(transformers' ResNets load from a local folder: "
                           "resnext_flax.load_model)")
    if arch not in VARIANTS:
        raise WeightsError(f"{where}: timm's architecture {arch!r} is not one this library "
                           f"builds (torchvision's stem and blocks: {', '.join(VARIANTS)})")
    cfg = config.get("pretrained_cfg", {})
    cfg = cfg if isinstance(cfg, Mapping) else {}
    num_classes = config.get("num_classes", cfg.get("num_classes", 1000))
    if not (_int(num_classes) and num_classes >= 0):
        raise WeightsError(f"{where}: num_classes must be a count, got "
                           f"{short_repr(num_classes)}")
    labels = config.get("label_names")
    names = (tuple(labels) if isinstance(labels, list) and len(labels) == num_classes
             and all(isinstance(n, str) for n in labels) else None)
    license_ = cfg.get("license", config.get("license"))
    tag = cfg.get("tag")
    return HubConfig(arch, num_classes, names, _preprocessing(cfg, where),
                     license_ if isinstance(license_, str) else None,
                     tag if isinstance(tag, str) else None)


def _huggingface_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(f"loading weights from the Hugging Face Hub needs huggingface_hub: "
                          f"{INSTALL_HINT}") from None
    return huggingface_hub


def _silent_bar() -> type:
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

    return Silent


def fetch_hub_file(repo_id: str, filename: str, revision: str | None = None, *,
                   cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """`filename` of Hub repository `repo_id` in huggingface_hub's cache: the cached copy
    if there is one (no request), else downloaded (unless offline). Raises
    :class:`~resnext_flax.errors.WeightsUnavailableError` (offline, unreachable, no such
    repository or revision) or :class:`~resnext_flax.errors.WeightsError` (no such file)."""
    hub = _huggingface_hub()
    from huggingface_hub import errors

    where = f"{HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    options = {"revision": revision, "cache_dir": cache_dir}
    try:
        return Path(hub.hf_hub_download(repo_id, filename, local_files_only=True, **options))
    except errors.LocalEntryNotFoundError:
        pass
    if os.environ.get(OFFLINE_ENV, "").strip() not in ("", "0"):
        raise WeightsUnavailableError(f"{filename} of {where} is not in the Hub cache and "
                                      f"${OFFLINE_ENV} is set; no download attempted")
    bar = None if progress else _silent_bar()
    try:
        return Path(hub.hf_hub_download(repo_id, filename, tqdm_class=bar, **options))
    except errors.GatedRepoError as err:
        raise WeightsUnavailableError(f"{where} is gated: accept its terms on the Hub and log "
                                      f"in (HF_TOKEN or `hf auth login`) ({err})") from None
    except errors.RepositoryNotFoundError:
        raise WeightsUnavailableError(
            f"no repository {repo_id} on the Hub (or it is private: set HF_TOKEN or run "
            "`hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise WeightsUnavailableError(f"{repo_id} has no revision {revision!r}") from None
    except errors.RemoteEntryNotFoundError:
        raise WeightsError(f"{where} has no {filename}: only timm repositories with "
                           f"{CONFIG_FILE} and {WEIGHTS_FILE} load (safetensors, no torch)"
                           ) from None
    except errors.LocalEntryNotFoundError as err:  # offline mode, or the Hub unreachable
        raise WeightsUnavailableError(
            f"{filename} of {where} is not in the Hub cache and could not be downloaded "
            f"(HF_HUB_OFFLINE set, or no connection): {err}") from None
    except (errors.HfHubHTTPError, OSError) as err:
        raise WeightsUnavailableError(f"could not download {filename} of {where}: {err}"
                                      ) from None


def _read_config(path: Path, where: str) -> HubConfig:
    """The config of a snapshot folder, read as a local timm folder's is (same bounds)."""
    from resnext_flax.weights.files import _read_hf_config

    config = _read_hf_config(os.fspath(path.parent / WEIGHTS_FILE))
    if config is None:
        raise WeightsError(f"{where}: not found in {path.parent}")
    return read_hub_config(config, where)


def hub_config(text: str, *, cache_dir: str | os.PathLike | None = None,
               progress: bool = True) -> HubConfig:
    """The :class:`HubConfig` of Hub repository `text` (``hf-hub:owner/repository``),
    fetching only its ``config.json``."""
    repo_id, revision = parse_hub_id(text)
    path = fetch_hub_file(repo_id, CONFIG_FILE, revision, cache_dir=cache_dir,
                          progress=progress)
    return _read_config(path, f"{HUB_PREFIX}{repo_id}'s {CONFIG_FILE}")


def hub_weight_set(text: str, *, cache_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> WeightSet:
    """The weight set Hub repository `text` holds: the catalog's where the table lists the
    repository (its published accuracy and license), else one described by its
    ``config.json`` alone. Fetches ``config.json`` (not the weights)."""
    repo_id, revision = parse_hub_id(text)
    config = hub_config(text, cache_dir=cache_dir, progress=progress)
    hub_id = repo_id + (f"@{revision}" if revision else "")
    known = find_hub_weight_set(repo_id)
    if known is not None:
        if known.model != config.architecture:
            raise WeightsError(f"{HUB_PREFIX}{repo_id} holds {config.architecture}, but the "
                               f"catalog lists it as {known.name}")
        return dataclasses.replace(known, hub_id=hub_id)
    same = list_weight_sets(config.architecture)
    tag = config.tag or repo_id.rsplit("/", 1)[-1].rpartition(".")[2]
    imagenet = config.num_classes == 1000 and (tag.endswith("in1k") or repo_id.endswith("in1k"))
    return WeightSet(
        model=config.architecture, tag=tag, url="",
        preprocessing=config.preprocessing or Preprocessing(), acc1=None, acc5=None,
        num_params=same[0].num_params if same and config.num_classes == 1000 else None,
        gflops=same[0].gflops if same else None, file_size_mb=None,
        recipe=f"https://huggingface.co/{repo_id}", num_classes=config.num_classes,
        source="hf-hub", license=config.license or "unknown", hub_id=hub_id,
        class_names=config.class_names or (None if imagenet else ()),
    )


def resolve_hub_weights(name: str | None, text: str, **options: Any) -> WeightSet:
    """:func:`hub_weight_set`, checked to be of model `name` (None: any)."""
    ws = hub_weight_set(text, **options)
    if name is not None and ws.model != name:
        raise UnknownModelError(f"{text} holds {ws.model} weights, not {name}'s; ask for "
                                f"{ws.model}")
    return ws


def download_hub_weights(ws: WeightSet, *, cache_dir: str | os.PathLike | None = None,
                         progress: bool = True) -> tuple[Path, HubConfig]:
    """The cached ``model.safetensors`` of Hub weight set `ws` (its ``config.json`` beside
    it, as in every Hub snapshot folder), and that config, checked to describe `ws`' model."""
    repo_id, revision = parse_hub_id(ws.hub_id or "")
    where = f"{HUB_PREFIX}{repo_id}'s {CONFIG_FILE}"
    config = _read_config(fetch_hub_file(repo_id, CONFIG_FILE, revision, cache_dir=cache_dir,
                                         progress=progress), where)
    if config.architecture != ws.model:
        raise WeightsError(f"{where} names {config.architecture}, not {ws.model}")
    path = fetch_hub_file(repo_id, WEIGHTS_FILE, revision, cache_dir=cache_dir,
                          progress=progress)
    return path, config


def hub_source(path: Path, repo_id: str) -> tuple[str, str | None]:
    """Where a cached Hub file came from (its repository, commit and name) and its sha256,
    which huggingface_hub's cache names its large-file blobs by (None where not)."""
    commit = path.parent.name
    blob = os.path.basename(os.path.realpath(path))
    return (f"https://huggingface.co/{repo_id}/blob/{commit}/{path.name}",
            blob if _SHA256.fullmatch(blob) else None)


__all__ = [
    "HUB_PREFIX",
    "HubConfig",
    "download_hub_weights",
    "fetch_hub_file",
    "hub_config",
    "hub_source",
    "hub_weight_set",
    "is_hub_id",
    "parse_hub_id",
    "read_hub_config",
    "resolve_hub_weights",
]
