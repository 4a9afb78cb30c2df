"""Checking a checkpoint's safetensors files without loading tensors, to reject a damaged or incomplete checkpoint
with one line that names the file (and the tensor) and the fix, before transformers starts loading.

:func:`read_header` gives a file's tensors as torch dtype names and shapes (parsed and checked by
:func:`~hf_compress_prompt.formats.safetensors_header.parse_header`), :func:`checkpoint_tensors` reads every file
of a checkpoint, :func:`check_tensors` checks the tensors a config expects against what those files hold, and
:func:`check_folder` checks a saved folder's layout (``model.safetensors`` or ``model.safetensors.index.json`` and
every shard it lists).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..formats.safetensors_header import SAVE_AGAIN as _SAVE_AGAIN
from ..formats.safetensors_header import CheckpointError, parse_header

__all__ = ["INDEX_NAME", "WEIGHTS_NAME", "CheckpointError", "check_folder", "check_tensors",
           "checkpoint_location", "checkpoint_tensors", "read_header"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD = re.compile(r".*-\d{5}-of-\d{5}\.safetensors$")

_DTYPE_NAMES = {"I32": "int32", "U8": "uint8", "I8": "int8", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
                "I64": "int64", "I16": "int16", "F64": "float64", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
                "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """Tensor name -> ``{"dtype", "shape"}`` (torch dtype names: ``"bfloat16"``) of a safetensors file; a missing,
    truncated or corrupt file is an error naming it (and the tensor)."""
    return {name: {"dtype": _DTYPE_NAMES.get(entry.dtype, entry.dtype), "shape": entry.shape}
            for name, entry in parse_header(path).tensors.items()}


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
