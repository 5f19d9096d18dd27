"""Pretrained models: ``from_pretrained(name, weights)`` with a cache of converted checkpoints.

Every entry point (``from_pretrained``, the constructors' ``weights=``, the command's
``--weights``/``--checkpoint``) takes the weights one way (:func:`split_weights`): `weights` is
a weight set (a tag or a :class:`WeightSet`), a Hugging Face Hub repository
(``"hf-hub:timm/resnet50.a1_in1k"``) or a local file; `checkpoint` is a local file loaded as
that weight set, which then only fills in what the file lacks.

Weight sets with a Hub repository (``WeightSet.hub_id``: the WSL, SSL/SWSL and timm sets, and
any ``hf-hub:`` string) come through huggingface_hub's cache (``weights.hub``): its
``model.safetensors`` is read in place, without torch. torchvision's sets (a ``.pth`` URL):

Lookup order, first hit wins:

1. ``checkpoint=`` (or a file as ``weights=``) — a local torchvision ``.pth`` /
   ``.safetensors`` file or a converted resnext_flax checkpoint; never touches the network.
2. This library's cache (``$RESNEXT_FLAX_CACHE``, else ``$XDG_CACHE_HOME/resnext_flax``, else
   ``~/.cache/resnext_flax``): ``<torchvision file stem>.safetensors``, loaded without torch.
3. torch hub's checkpoint folder (``torch.hub.get_dir()/checkpoints``): the ``.pth`` a
   torchvision user already downloaded; its sha256 prefix is checked, then it is converted
   into the cache.
4. Download the ``.pth`` (urllib; ``file://`` URLs work, ``$RESNEXT_FLAX_BASE_URL`` names a
   mirror), check its sha256 prefix, convert it into the cache and discard the ``.pth``.

Converting a ``.pth`` needs torch (``torch.load``); every later load reads the converted
safetensors file and needs neither torch nor the network. Cache writes go through a
temporary file and a rename, so a failed or interrupted download never leaves a partial file:
Ctrl-C and SIGTERM clean up before the process ends, and what a killed process (SIGKILL) left
is removed on the next access to the cache (``cache.remove_stale_leftovers``). A download has
an overall deadline (``cache.DOWNLOAD_DEADLINE_SECONDS``) besides its per-read timeout.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

from resnext_flax.errors import Fix, Message, Placeholder, UnknownModelError, WeightsError
from resnext_flax.models.resnet import ResNet
from resnext_flax.models.variants import get_spec
from resnext_flax.weights.cache import (
    OFFLINE_ENV,
    ChecksumError,
    WeightsUnavailableError,
    cached_checkpoint_path,
    check_cache_dir,
    check_hash,
    download,
    download_folder_prefix,
    remove_stale_leftovers,
    sha256_file,
    torch_hub_checkpoint_dir,
    unavailable_message,
    weights_url,
)
from resnext_flax.weights.catalog import (
    WeightSet,
    get_weight_set,
    resolve_weights,
    warn_license,
)
from resnext_flax.weights.checkpoint import CheckpointError, save_checkpoint
from resnext_flax.weights.files import read_weight_file, sigterm_as_interrupt
from resnext_flax.weights.hub import (
    download_hub_weights,
    hub_source,
    hub_weight_set,
    is_hub_id,
    parse_hub_id,
    resolve_hub_weights,
)
from resnext_flax.weights.loading import load_model

#: Endings that make a ``weights`` string a local file rather than a weight-set tag.
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
#: How a fix names the local file a user passes instead of downloading.
LOCAL_FILE_FIX = Fix.of(checkpoint=Placeholder("PATH"))


def _names_a_file(name: str, weights: object) -> bool:
    if isinstance(weights, os.PathLike):
        return True
    if not isinstance(weights, str):
        return False
    if "/" in weights or os.sep in weights or weights.lower().endswith(WEIGHT_FILE_SUFFIXES):
        return True
    if not os.path.exists(weights):
        return False
    try:  # a tag wins over a file of the same name in the working folder
        get_weight_set(name, weights)
    except ValueError:
        return True
    return False


def split_weights(
    name: str,
    weights: str | os.PathLike | WeightSet | None,
    checkpoint: str | os.PathLike | None = None,
) -> tuple[WeightSet, str | os.PathLike | None]:
    """The weight set and the local file (None: none) that `weights` and `checkpoint` ask for,
    as every entry point reads them.

    `weights`: a weight set (``"DEFAULT"``, a tag such as ``"IMAGENET1K_V1"``, a
    :class:`WeightSet`, a Hub repository ``"hf-hub:owner/repository[@revision]"``, whose
    ``config.json`` is fetched to describe it) or a local file (a path object, or a string
    with a path separator or a weight-file ending, or naming an existing file that is no tag).
    `checkpoint`: a local file
    loaded as the weight set `weights` (``DEFAULT`` when None), which then only fills in what
    the file lacks (class names, preprocessing). A file as `weights` means ``checkpoint=`` that
    file with ``DEFAULT``; giving a file both ways is an error.
    """
    get_spec(name)  # a clear error for unknown model names first
    if is_hub_id(weights):
        return resolve_hub_weights(name, weights), checkpoint
    if _names_a_file(name, weights):
        if checkpoint is not None:
            raise WeightsError(f"weights={os.fspath(weights)!r} and checkpoint="
                               f"{os.fspath(checkpoint)!r} both name a local file; pass one")
        return resolve_weights(name, "DEFAULT"), weights
    if weights is None and checkpoint is not None:
        weights = "DEFAULT"
    try:
        return resolve_weights(name, weights), checkpoint
    except UnknownModelError as err:
        if not isinstance(weights, str):
            raise
        raise UnknownModelError(f"{err}; weights= also takes a local weight file, and there "
                                f"is no file {weights!r}") from None


def check_file_options(prefix: str | None, ema: bool, key: str | None,
                       trust_pickle: bool) -> None:
    """Refuse the options that say how to read a local file when no file is given."""
    if prefix is not None or ema or key is not None or trust_pickle:
        raise WeightsError("prefix, ema, key and trust_pickle apply to checkpoint= files only "
                           "(they say how to read a local file)")


def _convert_into_cache(
    weights: WeightSet, pth: str | os.PathLike, dest: Path, *, source_url: str, digest: str
) -> None:
    model = load_model(pth, weights.model)
    save_checkpoint(model, dest, metadata={
        "weights": weights.name,
        "source_url": source_url,
        "source_sha256": digest,
        "license": weights.license,
    }, classes=weights.categories, preprocessing=weights.preprocessing)


def _require_torch(weights: WeightSet) -> None:
    if importlib.util.find_spec("torch") is None:
        raise ImportError(Message(
            f"converting {weights.filename} (a PyTorch file) needs torch once: "
            "pip install 'resnext-flax[torch]'; or pass a converted .safetensors file: ",
            LOCAL_FILE_FIX))


def download_pretrained(
    name: str,
    weights: str | WeightSet = "DEFAULT",
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    url: str | None = None,
    download_deadline: float | None = None,
) -> Path:
    """Make sure the converted checkpoint of ``name`` / `weights` is in the cache; return its
    path. Uses the cache, then torch hub's folder, then downloads (see the module docstring).

    **Arguments:**
    - `weights`: a tag (``"DEFAULT"``, ``"IMAGENET1K_V1"``…), a :class:`WeightSet` or a Hub
      repository (``"hf-hub:..."``); a set with a Hub repository returns the cached
      ``model.safetensors`` in huggingface_hub's cache.
    - `cache_dir`: overrides ``$RESNEXT_FLAX_CACHE`` / ``~/.cache/resnext_flax`` (for Hub
      repositories: huggingface_hub's cache folder, ``$HF_HUB_CACHE``).
    - `progress`: show a tqdm progress bar while downloading.
    - `url`: download the ``.pth`` from here instead (a mirror or a ``file://`` URL; for a
      Hub set, instead of its repository); the file must still carry the weight set's
      sha256 prefix.
    - `download_deadline`: seconds the whole download may take (default
      ``$RESNEXT_FLAX_DOWNLOAD_DEADLINE``, else ``cache.DOWNLOAD_DEADLINE_SECONDS``).
    """
    ws = (resolve_hub_weights(name, weights, cache_dir=cache_dir, progress=progress)
          if is_hub_id(weights) else resolve_weights(name, weights))
    if ws.hub_id and not url:
        return download_hub_weights(ws, cache_dir=cache_dir, progress=progress)[0]
    return _download(ws, cache_dir, progress, url, download_deadline)


def _download(ws: WeightSet, cache_dir: str | os.PathLike | None, progress: bool,
              url: str | None, deadline: float | None = None) -> Path:
    dest = cached_checkpoint_path(ws, cache_dir)
    remove_stale_leftovers(dest.parent)  # on every access: a hit never writes, so never cleans
    if dest.is_file():
        return dest
    check_cache_dir(dest.parent)
    hub_file = torch_hub_checkpoint_dir() / ws.filename
    if hub_file.is_file():
        _require_torch(ws)
        digest = sha256_file(hub_file)
        check_hash(digest, ws, f"{hub_file} (torch hub's copy; delete it to re-download)")
        _convert_into_cache(ws, hub_file, dest, source_url=hub_file.as_uri(), digest=digest)
        return dest
    source = weights_url(ws, url)
    if os.environ.get(OFFLINE_ENV, "").strip() not in ("", "0"):
        raise WeightsUnavailableError(
            unavailable_message(ws, source, f"${OFFLINE_ENV} is set; no download attempted")
        )
    _require_torch(ws)
    # Ctrl-C and SIGTERM remove the folder (and the converted file's temporary) on their way
    # out; the process then ends as SIGTERM's own handler would have ended it.
    with sigterm_as_interrupt(then_default=True), tempfile.TemporaryDirectory(
            prefix=download_folder_prefix(), dir=dest.parent) as tmp:
        pth = Path(tmp, ws.filename)
        digest = download(source, pth, ws, progress=progress, deadline=deadline)
        _convert_into_cache(ws, pth, dest, source_url=source, digest=digest)
    return dest


def from_pretrained(
    name: str,
    weights: str | os.PathLike | WeightSet = "DEFAULT",
    *,
    checkpoint: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    url: str | None = None,
    download_deadline: float | None = None,
    dtype: Any = None,
    prefix: str | None = None,
    ema: bool = False,
    key: str | None = None,
    num_classes: int | None = None,
    trust_pickle: bool = False,
) -> ResNet:
    """A pretrained model as a Flax model, in eval mode.

    **Arguments:**
    - `name`: a model name (``resnext_flax.list_models()``), or a Hub repository
      (``"hf-hub:timm/resnext101_32x16d.fb_wsl_ig1b_ft_in1k"``), whose ``config.json``
      names the model (then `weights` stays ``"DEFAULT"``).
    - `weights`: ``"DEFAULT"`` (torchvision's choice), a tag such as ``"IMAGENET1K_V1"`` or
      ``"fb_swsl_ig1b_ft_in1k"`` (``resnext_flax.list_weight_sets()``), a :class:`WeightSet`,
      a Hub repository (``"hf-hub:owner/repository[@revision]"``, downloaded through
      huggingface_hub: its cache, token and offline mode apply), or a local file (the same as
      ``checkpoint=`` that file; see :func:`split_weights`). Weights under a non-commercial
      license (the WSL and SSL/SWSL sets) say so once per process (a ``LicenseWarning``).
    - `checkpoint`: a local checkpoint as it comes (a torchvision, timm, Lightning, MoCo,
      Hugging Face... ``.pth`` / ``.bin`` / ``.ckpt`` / ``.safetensors`` file or model folder,
      see ``docs/checkpoints.md``) or a converted resnext_flax checkpoint; loaded strictly
      through :func:`~resnext_flax.load_model`, no network. Its class count is kept (e.g. a
      fine-tuned head).
    - `prefix`, `ema`, `key`, `trust_pickle`: how to read `checkpoint` (see
      :func:`~resnext_flax.load_model`); only with `checkpoint`.
    - `num_classes`: None keeps the weights' head; 0 headless; N a fresh N-class head
      (unless the weights' head has N classes).
    - `cache_dir`, `progress`, `url`, `download_deadline`: see :func:`download_pretrained`.
    - `dtype`: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.

    The model's ``pretrained_cfg`` records the weight set (its class names, preprocessing and
    source file hash); a `checkpoint` keeps what its file records and takes the class names
    and preprocessing it lacks from the weight set (class names only if the class count
    matches), but is never recorded as the weight set itself.
    """
    if is_hub_id(name):
        if weights != "DEFAULT":
            raise WeightsError(f"from_pretrained({name!r}) takes its weights from the Hub "
                               f"repository; weights={weights!r} asks for others")
        weights = hub_weight_set(name, cache_dir=cache_dir, progress=progress)
        name = weights.model
    elif is_hub_id(weights):
        weights = resolve_hub_weights(name, weights, cache_dir=cache_dir, progress=progress)
    ws, checkpoint = split_weights(name, weights, checkpoint)
    return load_weight_set(ws, checkpoint=checkpoint, cache_dir=cache_dir, progress=progress,
                           url=url, download_deadline=download_deadline, dtype=dtype,
                           prefix=prefix, ema=ema, key=key, num_classes=num_classes,
                           trust_pickle=trust_pickle)


def load_weight_set(
    weights: WeightSet,
    *,
    checkpoint: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    url: str | None = None,
    download_deadline: float | None = None,
    dtype: Any = None,
    prefix: str | None = None,
    ema: bool = False,
    key: str | None = None,
    num_classes: int | None = None,
    trust_pickle: bool = False,
) -> ResNet:
    """The model of a resolved :class:`WeightSet` (through the cache, see
    :func:`download_pretrained`), or of the local `checkpoint` read as that weight set (see
    :func:`from_pretrained`), in eval mode, with its ``pretrained_cfg``."""
    ws = weights
    if checkpoint is not None:
        model = load_model(checkpoint, ws.model, dtype=dtype, prefix=prefix, ema=ema, key=key,
                           num_classes=num_classes, trust_pickle=trust_pickle)
        model.pretrained_cfg = model.pretrained_cfg.fill(
            class_names=ws.categories, preprocessing=ws.preprocessing)
        return model
    check_file_options(prefix, ema, key, trust_pickle)
    warn_license(ws)
    if ws.hub_id and not url:
        return _load_hub(ws, cache_dir, progress, dtype, num_classes)
    path = _download(ws, cache_dir, progress, url, download_deadline)
    try:
        weight_file = read_weight_file(path)
        if weight_file.kind != "converted":
            raise CheckpointError("not a resnext_flax checkpoint")
    except ValueError as err:
        raise CheckpointError(f"cached checkpoint {path} is unreadable; delete it to fetch it "
                              f"again ({err})") from err
    recorded = weight_file.metadata.get("source_sha256", "")
    if not recorded.startswith(ws.sha256_prefix):
        what = (f"was converted from a file with sha256 {recorded[:16]}..." if recorded
                else "records no source hash (not written by the download path)")
        raise ChecksumError(Message(
            f"cached checkpoint {path} {what}, not {ws.filename}; it is not trusted as "
            f"{ws.name}: delete it to fetch it again, or load it as a local file: ",
            LOCAL_FILE_FIX))
    model = load_model(weight_file, ws.model, dtype=dtype, num_classes=num_classes)
    same_head = model.num_classes == ws.num_classes
    model.pretrained_cfg = dataclasses.replace(
        model.pretrained_cfg, weights=ws.name if same_head else None,
        source=weight_file.metadata.get("source_url") or ws.url,
        sha256=recorded, license=ws.license).fill(class_names=ws.categories,
                                                  preprocessing=ws.preprocessing)
    return model


def _load_hub(ws: WeightSet, cache_dir: str | os.PathLike | None, progress: bool, dtype: Any,
              num_classes: int | None) -> ResNet:
    """A Hub weight set, read in place from huggingface_hub's cache. The repository's
    ``config.json`` is its publisher's word on the classes and preprocessing, so it wins over
    the catalog's copy."""
    path, config = download_hub_weights(ws, cache_dir=cache_dir, progress=progress)
    model = load_model(path, ws.model, dtype=dtype, num_classes=num_classes)
    source, digest = hub_source(path, parse_hub_id(ws.hub_id or "")[0])
    model.pretrained_cfg = dataclasses.replace(
        model.pretrained_cfg, weights=ws.name if model.num_classes == ws.num_classes else None,
        source=source, sha256=digest, license=config.license or ws.license,
    ).fill(class_names=config.class_names or ws.categories,
           preprocessing=config.preprocessing or ws.preprocessing)
    return model


__all__ = [
    "ChecksumError",
    "WeightsUnavailableError",
    "check_file_options",
    "download_pretrained",
    "from_pretrained",
    "load_weight_set",
    "split_weights",
]
