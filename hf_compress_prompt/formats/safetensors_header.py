"""Reading a safetensors file's header, checked the way the safetensors loader will check it, without reading any
tensor: a missing, truncated or damaged file is one error naming the file (and the tensor) and the fix.

:func:`parse_header` gives each tensor's dtype, shape and byte range and where the data section starts; the
streaming reader (:func:`~hf_compress_prompt.formats.safetensors_stream.read_rows`) reads rows by it and the
load-time checks (``integrations.safetensors_check``) check checkpoints with it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError

__all__ = ["SAVE_AGAIN", "CheckpointError", "HeaderEntry", "SafetensorsHeader", "parse_header"]

SAVE_AGAIN = "save the model again (or copy the whole folder again)"
# bytes per element of safetensors' dtypes (the sub-byte float types are left out: their sizes are not checked)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class CheckpointError(UserInputError):
    """A checkpoint file is damaged or does not match its config."""


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors file: its safetensors dtype name (``"BF16"``), shape and byte range
    ``[start, end)`` within the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors file's tensors (in header order) and the file offset where its data section starts."""

    tensors: dict[str, HeaderEntry]
    data_start: int


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, name: str, info) -> HeaderEntry:
    """One header entry; anything malformed is an error naming the tensor."""
    where = f"{path}: tensor {name!r} in the safetensors header"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where} is a {type(info).__name__}, not an object; the header is corrupt, {SAVE_AGAIN}")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        raise CheckpointError(f"{where} has no {'/'.join(missing)}; the header is corrupt, {SAVE_AGAIN}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where} has dtype {dtype!r}, not a safetensors dtype name; {SAVE_AGAIN}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where} has shape {shape!r}, not a list of sizes; the header is corrupt, {SAVE_AGAIN}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where} has data_offsets {offsets!r}, not [start, end] with 0 <= start <= end; "
                              f"the header is corrupt, {SAVE_AGAIN}")
    start, end = offsets
    itemsize = _DTYPE_BYTES.get(dtype)
    if itemsize is not None and end - start != math.prod(shape) * itemsize:
        raise CheckpointError(f"{where}: {dtype} {shape} needs {math.prod(shape) * itemsize} bytes, its data_offsets "
                              f"{offsets} hold {end - start}; the header is corrupt, {SAVE_AGAIN}")
    return HeaderEntry(dtype, tuple(shape), start, end)


def parse_header(path: str | os.PathLike) -> SafetensorsHeader:
    """The header of the safetensors file at ``path``, checked: a JSON object of entries with a ``dtype``, a
    ``shape`` and ``data_offsets`` that hold the shape's bytes and tile the data section exactly (sorted by start,
    each begins where the one before ends, the last ends at the end of the file).

    Raises:
        CheckpointError: the file is missing, truncated or its header is corrupt; the message names the file, the
            tensor where there is one, and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; {SAVE_AGAIN}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header); {SAVE_AGAIN}")
        (length,) = struct.unpack("<Q", raw)
        if 8 + length > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header says {length} bytes, file has {size}); "
                                  f"{SAVE_AGAIN}")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON); {SAVE_AGAIN}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object of "
                              f"tensors; the file is corrupt, {SAVE_AGAIN}")
    header.pop("__metadata__", None)
    entries = {name: _entry(path, name, info) for name, info in header.items()}
    data = size - 8 - length  # bytes after the header
    for name, entry in entries.items():
        if entry.end > data:
            raise CheckpointError(
                f"{path}: truncated safetensors file ({size} bytes, its tensors need {8 + length + entry.end}; tensor "
                f"{name!r} at data_offsets [{entry.start}, {entry.end}] is cut off); {SAVE_AGAIN}"
            )
    # the loader needs the tensors to tile the data section: sorted by start, each begins where the previous ends
    previous, position = None, 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != position:
            what = (f"overlaps tensor {previous!r} (which ends at {position})" if entry.start < position
                    else f"leaves a gap after {'tensor ' + repr(previous) if previous else 'the header'} (which ends "
                         f"at {position})")
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets [{entry.start}, {entry.end}], which "
                                  f"{what}; the header is corrupt, {SAVE_AGAIN}")
        previous, position = name, entry.end
    if position < data:
        raise CheckpointError(f"{path}: {data - position} bytes after the last tensor that no header entry describes; "
                              f"the file is corrupt, {SAVE_AGAIN}")
    return SafetensorsHeader(entries, 8 + length)
