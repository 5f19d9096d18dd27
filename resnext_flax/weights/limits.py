"""Bounds on what a weight file may ask of the reader, checked before the file is trusted.

A file's own fields decide how much a reader parses and inflates: the entries of a
``.safetensors`` header, the sizes a ``.pth`` zip archive's central directory declares. Each
check reads only those fields, against a limit derived from the architectures this library
builds, and returns what is wrong (naming the file, the field, the value and the limit) or None;
``weights.files`` raises it as a ``WeightFileError``.
"""

from __future__ import annotations

import os
import zipfile

#: The most tensors a ``.safetensors`` file may hold. The table's largest state dict
#: (resnet152, with ``num_batches_tracked``) has about 930 and the deepest architecture
#: ``models.variants``' limits allow about 1,850; the bound leaves room for five of those (EMA
#: copies, MoCo's two encoders). Checked before the file's tensors are read.
MAX_SAFETENSORS_TENSORS = 10_000
#: The largest ``.safetensors`` header (the JSON after the 8-byte length) read: room for
#: ``MAX_SAFETENSORS_TENSORS`` entries and a converted checkpoint's class names. Checked on the
#: length field, before any of the header is parsed.
MAX_SAFETENSORS_HEADER_BYTES = 32 * 2**20
#: The largest member a ``.pth`` zip archive may inflate to: one storage, a tensor or a flat
#: buffer of all of a model's (the table's largest, resnext101_32x48d, holds 828 M values, about
#: 6.6 GB in float64). Checked on the zip's central directory before ``torch.load``.
MAX_ZIP_MEMBER_BYTES = 16 * 2**30
#: The most all members of a ``.pth`` zip archive may inflate to together (a training checkpoint
#: holds the model, optimizer state and EMA copies: four copies of the largest model in float64).
MAX_ZIP_TOTAL_BYTES = 64 * 2**30
#: The most a compressed zip member may inflate relative to its stored size (``torch.save``
#: stores members uncompressed; float weights deflate to about 0.9 of their size, while a
#: decompression bomb of zeros reaches 1000x). Members under ``ZIP_RATIO_EXEMPT_BYTES`` are not
#: checked: they inflate harmlessly whatever their ratio.
MAX_ZIP_RATIO = 20
#: See ``MAX_ZIP_RATIO``.
ZIP_RATIO_EXEMPT_BYTES = 2**20
#: The largest Hugging Face ``config.json`` read beside a weight file: a few KB in practice, a
#: transformers config with 1000 ``id2label`` entries about 50 KB. Checked on the file's size
#: before it is parsed.
MAX_CONFIG_BYTES = 16 * 2**20


def config_size_problem(path: str) -> str | None:
    """A ``config.json`` larger than ``MAX_CONFIG_BYTES``, or None."""
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        return (f"{path!r} is {size:,} bytes, more than a model configuration needs "
                f"({MAX_CONFIG_BYTES:,}: MAX_CONFIG_BYTES)")
    return None


def safetensors_header_problem(path: str) -> str | None:
    """A header longer than ``MAX_SAFETENSORS_HEADER_BYTES`` or with more entries than
    ``MAX_SAFETENSORS_TENSORS``, found before the safetensors parser reads it (its cost grows
    with the entries; every entry has one ``"data_offsets"`` field, counted in the raw bytes)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None  # the parser names what is wrong with it
        size = int.from_bytes(head, "little")
        if size > MAX_SAFETENSORS_HEADER_BYTES:
            return (f"{path!r}: its safetensors header length field declares {size:,} bytes, "
                    f"above {MAX_SAFETENSORS_HEADER_BYTES:,} (MAX_SAFETENSORS_HEADER_BYTES)")
        entries = f.read(size).count(b'"data_offsets"')
    return tensor_count_problem(path, entries)


def tensor_count_problem(path: str, count: int) -> str | None:
    """More tensors than ``MAX_SAFETENSORS_TENSORS`` (also checked on the parsed header:
    escaped field names escape the byte count)."""
    if count > MAX_SAFETENSORS_TENSORS:
        return (f"{path!r}: its safetensors header lists {count:,} tensors, above "
                f"{MAX_SAFETENSORS_TENSORS:,} (MAX_SAFETENSORS_TENSORS)")
    return None


def zip_members_problem(path: str) -> str | None:
    """A zip archive (``torch.save``'s format) whose central directory declares members that
    would inflate beyond ``MAX_ZIP_MEMBER_BYTES`` each, ``MAX_ZIP_TOTAL_BYTES`` together, or
    ``MAX_ZIP_RATIO`` times their stored size; found before ``torch.load`` inflates any."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None  # not a zip (a legacy pickle), or a broken one: torch.load names it
    total = 0
    for member in members:
        size, stored = member.file_size, member.compress_size
        where = f"{path!r}: zip member {member.filename!r} declares {size:,} bytes"
        if size > MAX_ZIP_MEMBER_BYTES:
            return f"{where}, above {MAX_ZIP_MEMBER_BYTES:,} (MAX_ZIP_MEMBER_BYTES)"
        if (size > ZIP_RATIO_EXEMPT_BYTES and size > MAX_ZIP_RATIO * stored
                and member.compress_type != zipfile.ZIP_STORED):
            return (f"{where} compressed to {stored:,}, more than {MAX_ZIP_RATIO}x "
                    "(MAX_ZIP_RATIO): a decompression bomb, not tensors")
        total += size
    if total > MAX_ZIP_TOTAL_BYTES:
        return (f"{path!r}: its zip members declare {total:,} bytes together, above "
                f"{MAX_ZIP_TOTAL_BYTES:,} (MAX_ZIP_TOTAL_BYTES)")
    return None
