"""The C kernels' load-time layouts of a stored layer: pure tensor maths (no ctypes, no state). The stored tensors
are unchanged; these are copies (or views) in the order the kernels read them (see tiled.c and linear.c)."""

from __future__ import annotations

import torch

from ...formats import LinearFormat
from ...formats.bitpack import as_words, pack_bits
from ...formats.packing import _kept_and_values, unpack_codes

__all__ = ["dense_int8_layout", "sparse_values_layout", "tiled_layout"]


def dense_int8_layout(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dense int8 layer as ``linear.c`` reads it: the stored codes (a uint8 view), fp32 scales `(out, G)` and
    ``scale * zero`` `(out, G)`."""
    scale32 = tensors["weight_scale"].float().contiguous()
    return tensors["weight"].contiguous().view(torch.uint8), scale32, (scale32 * tensors["weight_zero"].float()).contiguous()


def tiled_layout(fmt: LinearFormat, tensors: dict[str, torch.Tensor], sparse: bool) -> tuple:
    """The 16-row tile layout of an int4 layer (see tiled.c): codes of 16 rows x 8 inputs per 64-byte chunk, fp32
    scales and uint8 zero points per tile and group; sparse layers keep only their kept codes per chunk, with two
    64-bit keep masks per chunk and each tile's byte offset.

    Returns ``(stream, tile_off, masks, scale, zero)``: ``stream`` uint8 codes, ``tile_off`` int64 `(tiles,)` and
    ``masks`` int64 `(tiles * nb * 8 * 2,)` (``None`` when dense), ``scale`` fp32 and ``zero`` uint8
    `(tiles, G, 16)`."""
    out, cols, G = fmt.out_features, fmt.in_features, fmt.groups
    nb, tiles = cols // 64, -(-out // 16)
    pad = tiles * 16 - out
    if sparse:
        kept, codes = _kept_and_values(fmt, tensors)
        kept = torch.nn.functional.pad(kept, (0, 0, 0, pad))
    else:
        codes = unpack_codes(fmt, tensors)
    codes = torch.nn.functional.pad(codes.to(torch.int32), (0, 0, 0, pad))  # padded rows: code 0, scale 0

    def chunks(t: torch.Tensor) -> torch.Tensor:  # (rows, in) -> (tiles, nb, 8, 2, 64): chunk p, half, lane r * 4 + i
        return t.reshape(tiles, 16, nb, 8, 2, 4).permute(0, 2, 3, 4, 1, 5).reshape(tiles, nb, 8, 2, 64)

    def per_tile(t: torch.Tensor, dtype) -> torch.Tensor:  # (out, G) -> (tiles, G, 16)
        t = torch.nn.functional.pad(t.to(dtype), (0, 0, 0, pad))
        return t.reshape(tiles, 16, G).transpose(1, 2).contiguous()

    scale = per_tile(tensors["weight_scale"].float(), torch.float32)
    zero = per_tile(tensors["weight_zero"], torch.uint8)
    c = chunks(codes)
    if not sparse:
        stream = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).to(torch.uint8).reshape(-1)
        return stream.contiguous(), None, None, scale, zero
    k = chunks(kept.to(torch.int32)).bool()  # (tiles, nb, 8, 2, 64)
    counts = k.sum(-1)  # (tiles, nb, 8, 2)
    chunk_bytes = counts.max(-1).values.reshape(-1)  # a chunk takes max(kept low, kept high) bytes
    start = torch.cumsum(chunk_bytes, 0) - chunk_bytes
    rank = torch.cumsum(k.to(torch.int64), -1) - 1  # position among the half's kept codes
    chunk_of = torch.arange(chunk_bytes.numel()).reshape(tiles, nb, 8, 1, 1).expand_as(k)
    half = torch.arange(2).reshape(1, 1, 1, 2, 1).expand_as(k)
    stream = torch.zeros(int(chunk_bytes.sum()) + 64, dtype=torch.int32)  # +64: a chunk's 64-byte read may overrun
    stream.index_add_(0, (start[chunk_of[k]] + rank[k]), c[k] << (4 * half[k]).to(torch.int32))
    tile_off = start.reshape(tiles, -1)[:, 0].contiguous()
    masks = pack_bits(k.to(torch.uint8), 1).contiguous().view(torch.int64).reshape(-1).contiguous()
    return stream.to(torch.uint8), tile_off, masks, scale, zero


def sparse_values_layout(fmt: LinearFormat, tensors: dict[str, torch.Tensor]) -> tuple:
    """Kept bf16 values row by row, their row offsets and the 64-bit masks, for a float sparse layer (linear.c)."""
    kept, dense = _kept_and_values(fmt, tensors)  # (out, in)
    values = dense[kept].to(torch.bfloat16).contiguous()
    counts = kept.sum(1)
    val_off = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])[:-1].contiguous()
    values = torch.cat([values, torch.zeros(64, dtype=torch.bfloat16)])  # a masked load never reads past the end
    masks = as_words(pack_bits(kept.to(torch.uint8), 1)).contiguous().view(torch.int64).contiguous()
    return values, val_off, masks
