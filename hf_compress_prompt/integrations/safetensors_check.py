"""Reading safetensors headers without loading tensors, to reject a truncated or incomplete checkpoint with an
error that names the file and the tensor, before transformers starts loading."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from ..errors import UserInputError

__all__ = ["CheckpointError", "read_header", "checkpoint_tensors"]

_DTYPE_NAMES = {"I32": "int32", "U8": "uint8", "I8": "int8", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
                "I64": "int64", "I16": "int16", "F64": "float64", "BOOL": "bool"}


class CheckpointError(UserInputError):
    """A checkpoint file is damaged or does not match its config."""


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """Tensor name -> ``{"dtype", "shape"}`` of a safetensors file; a truncated or corrupt file is an error naming it."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header); save it again")
        (length,) = struct.unpack("<Q", raw)
        if 8 + length > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header says {length} bytes, file has {size}); save it again")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise CheckpointError(f"{path}: corrupt safetensors header; save it again") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + length + end > size:
        last = max(header, key=lambda k: header[k]["data_offsets"][1])
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, its tensors need {8 + length + end}; "
            f"tensor {last!r} is cut off); save it again"
        )
    return {name: {"dtype": _DTYPE_NAMES.get(info["dtype"], info["dtype"]), "shape": tuple(info["shape"])}
            for name, info in header.items()}


def checkpoint_tensors(files: list[str | os.PathLike]) -> dict[str, dict]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, with its file."""
    tensors: dict[str, dict] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise CheckpointError(f"{file}: compressed checkpoints are safetensors only (no pickle files)")
        for name, info in read_header(file).items():
            tensors[name] = {**info, "file": str(file)}
    return tensors
