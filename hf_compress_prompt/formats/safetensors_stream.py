"""Writing a safetensors file one tensor at a time, byte for byte what ``safetensors.torch.save_file`` writes for
the same tensors (same order, header and padding), so a file assembled from tensors that never sit in memory
together equals the one the in-memory path saves.

``save_file`` lays the tensors out by dtype (widest first, in safetensors' own dtype order) and then by name, and
writes a compact JSON header (``__metadata__`` first, then the tensors in data order) padded with spaces to a
multiple of 8 bytes. :func:`write_safetensors` takes each tensor's name, dtype and shape up front and a callable
that produces its bytes when the writer reaches it, so only one tensor is held at a time.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .safetensors_header import SAVE_AGAIN, CheckpointError, SafetensorsHeader, parse_header

__all__ = ["TensorEntry", "entry_of", "entry_of_chunks", "read_rows", "safetensors_dtype",
           "safetensors_order", "write_safetensors"]

# safetensors' Dtype enum in declaration order; save_file sorts by it, last first.
_DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
                "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
_TORCH_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
    **{getattr(torch, n): s for n, s in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                                          ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fn", "F8_E4M3"))
       if hasattr(torch, n)},
}


def safetensors_dtype(dtype: torch.dtype) -> str:
    """safetensors' name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"safetensors has no dtype for {dtype}") from None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its name, safetensors dtype, shape, size in bytes and a callable giving its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    read: Callable[[], bytes | memoryview | Iterable[memoryview]]


def entry_of(name: str, tensor: torch.Tensor | Callable[[], torch.Tensor], *, dtype: torch.dtype | None = None,
             shape: tuple[int, ...] | None = None) -> TensorEntry:
    """A :class:`TensorEntry` for a tensor, or for a callable that makes it later (then give ``dtype`` and
    ``shape``)."""
    if isinstance(tensor, torch.Tensor):
        dtype, shape = tensor.dtype, tuple(tensor.shape)
        make = lambda: tensor
    else:
        if dtype is None or shape is None:
            raise ValueError(f"{name}: a lazily made tensor needs its dtype and shape")
        make = tensor
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()

    def read() -> memoryview:
        t = make()
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: made {t.dtype} {tuple(t.shape)}, announced {dtype} {tuple(shape)}")
        return _bytes(t)

    return TensorEntry(name, safetensors_dtype(dtype), tuple(shape), nbytes, read)


def entry_of_chunks(name: str, chunks: Callable[[], Iterable[torch.Tensor]], *, dtype: torch.dtype,
                    shape: tuple[int, ...]) -> TensorEntry:
    """A :class:`TensorEntry` whose bytes come as consecutive slices along the first dimension (``chunks()`` yields
    them, each of ``dtype``): a large tensor is written without ever being in memory whole."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()

    def read():
        for part in chunks():
            if part.dtype != dtype or tuple(part.shape[1:]) != tuple(shape[1:]):
                raise ValueError(f"{name}: made a {part.dtype} slice {tuple(part.shape)}, announced {dtype} {tuple(shape)}")
            yield _bytes(part)

    return TensorEntry(name, safetensors_dtype(dtype), tuple(shape), nbytes, read)


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order, little-endian (as safetensors stores them)."""
    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.dtype != torch.bool else \
        memoryview(t.reshape(-1).to(torch.uint8).numpy())


def read_rows(path: str | os.PathLike, name: str, start: int, stop: int,
              header: SafetensorsHeader | None = None) -> torch.Tensor:
    """Rows ``start:stop`` (along the first dimension) of the tensor ``name`` in a safetensors file, read with plain
    file reads: unlike a slice of ``safe_open``'s memory map, the pages read do not stay resident while the file is
    open, so a large tensor can be read a slice at a time in bounded memory. ``header``: the file's
    :func:`~hf_compress_prompt.formats.safetensors_header.parse_header`, when already read."""
    header = header or parse_header(path)
    entry = header.tensors[name]
    dtype = next((t for t, n in _TORCH_DTYPES.items() if n == entry.dtype), None)
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry.dtype}, which torch cannot read here")
    shape = list(entry.shape)
    stop = min(stop, shape[0])
    start = min(start, stop)
    row = torch.Size(shape[1:]).numel() * torch.empty((), dtype=dtype).element_size()
    data = bytearray((stop - start) * row)
    with open(Path(path), "rb") as handle:
        handle.seek(header.data_start + entry.start + start * row)
        if handle.readinto(data) != len(data):
            raise CheckpointError(f"{path}: tensor {name!r} is shorter than its header says; {SAVE_AGAIN}")
    rows = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return rows.view(dtype).reshape([stop - start, *shape[1:]])  # safetensors is little-endian, as are x86 and Arm


def safetensors_order(entries: Iterable[TensorEntry]) -> list[TensorEntry]:
    """The order ``save_file`` lays tensors out in: dtype by safetensors' enum, last first, then name."""
    return sorted(entries, key=lambda e: (-_DTYPE_ORDER.index(e.dtype), e.name))


def write_safetensors(path: str | os.PathLike, entries: Iterable[TensorEntry],
                      metadata: dict[str, str] | None = None) -> int:
    """Writes ``entries`` to ``path`` as ``safetensors.torch.save_file`` would (byte-identical), reading each
    tensor's bytes only when its turn comes. Returns the file's size.

    Raises:
        ValueError: two entries share a name, or a tensor's bytes do not match its announced size.
    """
    ordered = safetensors_order(entries)
    names = [e.name for e in ordered]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tensor names: {sorted({n for n in names if names.count(n) > 1})}")
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for e in ordered:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(Path(path), "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for e in ordered:
            data = e.read()
            written = 0
            for part in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                written += len(part)
                if written > e.nbytes:
                    break
                handle.write(part)
            if written != e.nbytes:
                raise ValueError(f"{e.name}: {written}{'+' if written > e.nbytes else ''} bytes, announced {e.nbytes}")
    return 8 + len(text) + offset
