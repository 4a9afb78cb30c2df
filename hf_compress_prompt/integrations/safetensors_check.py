"""Reading safetensors headers without loading tensors, to reject a damaged or incomplete checkpoint with one line
that names the file (and the tensor) and the fix, before transformers starts loading.

:func:`read_header` checks a header the way the safetensors loader will (a JSON object of entries with a known
``dtype``, a ``shape`` and ``data_offsets`` that tile the data section exactly), :func:`checkpoint_tensors` reads
every file of a checkpoint, :func:`check_tensors` checks the tensors a config expects against what those files
hold, and :func:`check_folder` checks a saved folder's layout (``model.safetensors`` or
``model.safetensors.index.json`` and every shard it lists).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

from ..errors import UserInputError

__all__ = ["INDEX_NAME", "WEIGHTS_NAME", "CheckpointError", "check_folder", "check_tensors",
           "checkpoint_location", "checkpoint_tensors", "read_header"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SAVE_AGAIN = "save the model again (or copy the whole folder again)"
_SHARD = re.compile(r".*-\d{5}-of-\d{5}\.safetensors$")

_DTYPE_NAMES = {"I32": "int32", "U8": "uint8", "I8": "int8", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
                "I64": "int64", "I16": "int16", "F64": "float64", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
                "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class CheckpointError(UserInputError):
    """A checkpoint file is damaged or does not match its config."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, name: str, info) -> tuple[str, tuple[int, ...], int, int]:
    """``(dtype, shape, start, end)`` of one header entry; anything malformed is an error naming the tensor."""
    where = f"{path}: tensor {name!r} in the safetensors header"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where} is a {type(info).__name__}, not an object; the header is corrupt, {_SAVE_AGAIN}")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        raise CheckpointError(f"{where} has no {'/'.join(missing)}; the header is corrupt, {_SAVE_AGAIN}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where} has dtype {dtype!r}, not a safetensors dtype name; {_SAVE_AGAIN}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where} has shape {shape!r}, not a list of sizes; the header is corrupt, {_SAVE_AGAIN}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where} has data_offsets {offsets!r}, not [start, end] with 0 <= start <= end; "
                              f"the header is corrupt, {_SAVE_AGAIN}")
    start, end = offsets
    itemsize = _DTYPE_BYTES.get(dtype)
    if itemsize is not None and end - start != math.prod(shape) * itemsize:
        raise CheckpointError(f"{where}: {dtype} {shape} needs {math.prod(shape) * itemsize} bytes, its data_offsets "
                              f"{offsets} hold {end - start}; the header is corrupt, {_SAVE_AGAIN}")
    return dtype, tuple(shape), start, end


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """Tensor name -> ``{"dtype", "shape"}`` of a safetensors file; a missing, truncated or corrupt file is an error
    naming it (and the tensor)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; {_SAVE_AGAIN}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header); {_SAVE_AGAIN}")
        (length,) = struct.unpack("<Q", raw)
        if 8 + length > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header says {length} bytes, file has {size}); "
                                  f"{_SAVE_AGAIN}")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON); {_SAVE_AGAIN}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object of "
                              f"tensors; the file is corrupt, {_SAVE_AGAIN}")
    header.pop("__metadata__", None)
    entries = {name: _entry(path, name, info) for name, info in header.items()}
    data = size - 8 - length  # bytes after the header
    for name, (_, _, start, end) in entries.items():
        if end > data:
            raise CheckpointError(
                f"{path}: truncated safetensors file ({size} bytes, its tensors need {8 + length + end}; tensor "
                f"{name!r} at data_offsets [{start}, {end}] is cut off); {_SAVE_AGAIN}"
            )
    # the loader needs the tensors to tile the data section: sorted by start, each begins where the previous ends
    previous, position = None, 0
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if start != position:
            what = (f"overlaps tensor {previous!r} (which ends at {position})" if start < position
                    else f"leaves a gap after {'tensor ' + repr(previous) if previous else 'the header'} (which ends "
                         f"at {position})")
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets [{start}, {end}], which {what}; the "
                                  f"header is corrupt, {_SAVE_AGAIN}")
        previous, position = name, end
    if position < data:
        raise CheckpointError(f"{path}: {data - position} bytes after the last tensor that no header entry describes; "
                              f"the file is corrupt, {_SAVE_AGAIN}")
    return {name: {"dtype": _DTYPE_NAMES.get(dtype, dtype), "shape": shape} for name, (dtype, shape, _, _) in entries.items()}


def checkpoint_tensors(files: list[str | os.PathLike]) -> dict[str, dict]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, with its file."""
    tensors: dict[str, dict] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise CheckpointError(f"{file}: compressed checkpoints are safetensors only (no pickle files)")
        if not Path(file).is_file():
            index = Path(file).parent / INDEX_NAME
            listed = f", listed in {index}," if index.is_file() else ""
            raise CheckpointError(f"checkpoint shard {file}{listed} is missing; {_SAVE_AGAIN}")
        for name, info in read_header(file).items():
            tensors[name] = {**info, "file": str(file)}
    return tensors


def checkpoint_location(found: dict[str, dict]) -> str:
    """The checkpoint as a message names it: its one file, or its folder and shard count (``found``: what
    :func:`checkpoint_tensors` returned)."""
    files = sorted({info["file"] for info in found.values()})
    if len(files) == 1:
        return files[0]
    return f"{Path(files[0]).parent if files else 'the checkpoint'} ({len(files)} shards)"


def check_tensors(expected: dict[str, tuple[tuple[int, ...], str | None]], found: dict[str, dict]) -> None:
    """Every expected tensor (name -> shape and dtype name, `None` when any) is in ``found`` (what
    :func:`checkpoint_tensors` returned) with its shape (and dtype, when fixed); errors name the tensor and file.

    Raises:
        CheckpointError: a tensor is missing or has another shape or dtype.
    """
    for name, (shape, dtype) in expected.items():
        info = found.get(name)
        if info is None:
            raise CheckpointError(f"compressed checkpoint {checkpoint_location(found)} is missing tensor {name!r}; the folder is "
                                  "incomplete, save the model again")
        if tuple(info["shape"]) != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} in {info['file']} has shape {list(info['shape'])}, the config says {list(shape)}; "
                "save the model again"
            )
        if dtype is not None and info["dtype"] != dtype:
            raise CheckpointError(f"tensor {name!r} in {info['file']} has dtype {info['dtype']}, the format needs "
                                  f"{dtype}; save the model again")


def _index_shards(index: Path) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` lists; an unreadable index is an error naming it."""
    try:
        data = json.loads(index.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index} is not valid JSON ({exc}); {_SAVE_AGAIN}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has no 'weight_map' object of tensor name -> shard file; {_SAVE_AGAIN}")
    shards = []
    for shard in dict.fromkeys(weight_map.values()):
        path = index.parent / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"{index} lists shard {shard!r} outside the folder; {_SAVE_AGAIN}")
        if not path.is_file():
            raise CheckpointError(f"{index} lists shard {shard!r}, which is missing from {index.parent}; {_SAVE_AGAIN}")
        shards.append(path)
    return shards


def check_folder(directory: str | os.PathLike) -> list[Path]:
    """Checks a saved folder's weight files before transformers resolves them: ``model.safetensors``, or
    ``model.safetensors.index.json`` and every shard it lists, each with a valid header. Returns the files.

    Raises:
        CheckpointError: no weights file, shards without their index, an unreadable index, a missing shard or a
            damaged header; the message names the file and the fix.
    """
    directory = Path(directory)
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = _index_shards(index)
    else:
        shards = sorted(p.name for p in directory.glob("*.safetensors") if _SHARD.match(p.name))
        if shards:
            raise CheckpointError(f"{directory} holds shards ({', '.join(shards[:2])}{', ...' if len(shards) > 2 else ''}) "
                                  f"but no {INDEX_NAME}, which says which tensor is in which shard; copy the index "
                                  f"file too, or {_SAVE_AGAIN}")
        if not any(directory.glob("*.safetensors")):
            pickles = sorted(p.name for p in directory.glob("*.bin"))
            if pickles:
                raise CheckpointError(f"{directory} holds only pickle weights ({', '.join(pickles[:2])}); compressed "
                                      "checkpoints are safetensors only: save the model again (safetensors)")
            raise CheckpointError(f"{directory} has no {WEIGHTS_NAME} (nor {INDEX_NAME}); {_SAVE_AGAIN}")
        return []  # a variant's file name (model.<variant>.safetensors): transformers picks it
    checkpoint_tensors(files)
    return files
