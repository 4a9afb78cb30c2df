"""Bit packing shared by every format: a run of ``bits``-wide codes laid end to end as a little-endian bit stream.

Code ``i`` occupies bits ``[i * bits, (i + 1) * bits)`` of the stream, and byte ``k`` holds stream bits
``[8k, 8k + 8)`` with the lowest bit first. This is the layout AutoGPTQ writes for 2, 3, 4 and 8 bits (its 3-bit
words straddle 32-bit boundaries in exactly this way), so one pair of functions serves our formats and the GPTQ
import.
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_bytes", "as_words", "from_words"]


def packed_bytes(count: int, bits: int) -> int:
    """Bytes needed for ``count`` codes of ``bits`` bits, rounded up to whole 32-bit words."""
    return -(-count * bits // 32) * 4


_SLICE_CODES = 1 << 20  # codes packed per slice of rows: the int32 temporaries stay a few MB at any layer size


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs the last dimension of ``codes`` (integers in ``[0, 2**bits)``, shape `(..., n)`) into uint8 bytes, shape
    `(..., packed_bytes(n, bits))` (zero padded to whole 32-bit words). Rows are packed a slice at a time (each row's
    bytes depend on that row alone), so a large layer needs no int32 copy of all its codes."""
    *lead, n = codes.shape
    nbytes = packed_bytes(n, bits)
    rows = codes.numel() // n if n else 0
    step = max(1, _SLICE_CODES // max(n, 1))
    if rows <= step:
        return _pack_rows(codes, bits, nbytes)
    flat = codes.reshape(rows, n)
    out = torch.empty(rows, nbytes, dtype=torch.uint8, device=codes.device)
    for start in range(0, rows, step):
        out[start:start + step] = _pack_rows(flat[start:start + step], bits, nbytes)
    return out.reshape(*lead, nbytes)


def _pack_rows(codes: torch.Tensor, bits: int, nbytes: int) -> torch.Tensor:
    *lead, n = codes.shape
    if 8 % bits == 0:  # whole codes per byte: shift them in place
        per = 8 // bits
        padded = torch.nn.functional.pad(codes.to(torch.int32), (0, nbytes * per - n))
        shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
        return (padded.reshape(*lead, nbytes, per) << shifts).sum(-1).to(torch.uint8)  # (..., nbytes)
    shifts = torch.arange(bits, device=codes.device)
    stream = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # (..., n, bits): bit b of code i
    stream = stream.reshape(*lead, n * bits)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - n * bits))
    weights = 1 << torch.arange(8, device=codes.device, dtype=torch.int32)
    return (stream.reshape(*lead, nbytes, 8) * weights).sum(-1).to(torch.uint8)  # (..., nbytes)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes of the stream in ``packed`` (uint8 `(..., nbytes)`), as
    uint8 `(..., n)`."""
    *lead, nbytes = packed.shape
    if 8 % bits == 0:  # whole codes per byte
        per = 8 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., nbytes, per)
        return codes.reshape(*lead, nbytes * per)[..., :n]
    shifts = torch.arange(8, device=packed.device)
    stream = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # (..., nbytes, 8)
    stream = stream.reshape(*lead, nbytes * 8)[..., : n * bits].reshape(*lead, n, bits)
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(torch.uint8)  # (..., n)


def as_words(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes `(..., 4k)` viewed as little-endian int32 words `(..., k)` (what checkpoints store)."""
    return packed.contiguous().view(torch.int32)


def from_words(words: torch.Tensor) -> torch.Tensor:
    """int32 words `(..., k)` viewed as their uint8 bytes `(..., 4k)`."""
    return words.contiguous().view(torch.uint8)
