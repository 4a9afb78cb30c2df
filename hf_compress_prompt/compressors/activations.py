"""Calibration activations kept on disk: when a streaming run's activations between blocks would exceed a memory
limit, each list of them lives in a memory-mapped file instead (written once per block, read back by the next).

The values are the same bytes either way (a copy into the mapping, no conversion), so a spilled run writes the
folder an in-memory one does. The kernel pages a mapping in and out as needed: its pages count towards the
process's resident size only while they are cached, and it can write them back and drop them under pressure,
which anonymous memory (no swap on most servers) cannot.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["ActivationFile", "activation_bytes", "parse_size"]


def parse_size(size: int | str | None) -> int | None:
    """``"4GB"``, ``"512MiB"`` or a number of bytes (as ``save_pretrained``'s ``max_shard_size``); `None` stays `None`."""
    if size is None or isinstance(size, int):
        return size
    from transformers.utils.hub import convert_file_size_to_int

    return convert_file_size_to_int(size)


def activation_bytes(first: torch.Tensor, samples: int, streams: int) -> int:
    """The bytes ``streams`` lists of activations take for ``samples`` calibration windows, given the first
    batch's tensor (``(batch, seqlen, hidden)``, in the dtype they are kept in)."""
    return first[0].numel() * first.dtype.itemsize * samples * streams


class ActivationFile:
    """A memory-mapped file holding one list of activations: :meth:`take` copies a tensor into the next free slot
    and returns the file-backed view that replaces it.

    Args:
        path (`Path`): the file (in the run's work folder); any earlier file there is unlinked first, so a mapping
            still open on it keeps its old contents.
        numel (`int`): how many elements the whole list holds.
        dtype (`torch.dtype`): their dtype.
    """

    def __init__(self, path: Path, numel: int, dtype: torch.dtype):
        self.path = Path(path)
        if self.path.exists():
            self.path.unlink()
        with open(self.path, "wb") as handle:
            handle.truncate(numel * dtype.itemsize)  # sparse: the pages are written as the views are filled
        self.data = torch.from_file(os.fspath(self.path), shared=True, size=numel, dtype=dtype)
        self.numel, self.offset = numel, 0

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` copied into the file (cast to the file's dtype); the view of it there."""
        end = self.offset + tensor.numel()
        if end > self.numel:
            raise ValueError(f"{self.path.name} holds {self.numel} elements; {end} were asked for")
        view = self.data[self.offset:end].view(tensor.shape)
        view.copy_(tensor)
        self.offset = end
        return view
