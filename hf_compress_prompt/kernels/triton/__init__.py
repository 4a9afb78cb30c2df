"""Triton kernels for GPUs, behind the same ops as the CPU kernels.

``int4_linear`` multiplies by a dense int4 layer straight from the stored layout (int32 words of 8 nibbles per
row, per-group scale and uint8 zero): each program loads a tile of words, unpacks and de-quantizes it in
registers and accumulates ``tl.dot`` in fp32. ``sparse_int4_linear`` does the same for the joint sparse + int4
layouts, reading only the kept codes: N:M (each run of ``m`` inputs keeps ``n`` codes and their 2-bit positions;
the tile is rebuilt dense in registers by comparing positions) and unstructured bitmask (one mask bit per weight,
the kept codes of all rows in one stream: a program walks its rows' streams along K, each kept code's place being
the row's running count plus a cumulative sum of the mask bits; the rows' start offsets are computed once per
layer at load time). They are registered for ``cuda`` inputs when Triton and a GPU are present, and tested on the
CPU with ``TRITON_INTERPRET=1`` (Triton's interpreter) at small shapes.

Kernels are compiled lazily (:func:`kernels`), so importing this module never needs Triton.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import weakref

import torch

from ...formats import LinearFormat
from ..reference import reference_linear

__all__ = ["available", "int4_linear", "kernels", "sparse_int4_linear", "supports", "unavailable_reason"]


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter on the CPU)"
    return None


def available() -> bool:
    return unavailable_reason() is None


def supports(fmt: LinearFormat) -> str | None:
    if fmt.bits != 4 or fmt.kind == "nm" and fmt.nm != (2, 4):
        return f"{fmt.describe()}: the Triton kernels cover int4, dense, 2:4 or bitmask sparse"
    if fmt.g_idx and fmt.kind != "int":
        return "explicit g_idx on a sparse layer"
    if fmt.in_features % 8 or fmt.kind != "int" and fmt.in_features % 32:
        return f"in_features={fmt.in_features} is not a multiple of {8 if fmt.kind == 'int' else 32}"
    return None


@functools.cache
def kernels(interpret: bool):
    """The jitted kernels (one set per interpreter mode; the mode is read when a kernel is defined)."""
    import triton
    import triton.language as tl

    @triton.jit
    def int4_matmul(x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, y_ptr, T, N, K, G, group_size,
                    USE_G_IDX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_t, pid_n = tl.program_id(0), tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        words_per_row = K // 8
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_t[:, None] * K + offs_k[None, :], mask=(offs_t[:, None] < T) & k_ok[None, :],
                        other=0.0).to(tl.float32)  # (BT, BK)
            n_ok = (offs_n[:, None] < N) & k_ok[None, :]
            words = tl.load(w_ptr + offs_n[:, None] * words_per_row + offs_k[None, :] // 8, mask=n_ok, other=0)
            codes = (words >> ((offs_k[None, :] % 8) * 4)) & 15  # (BN, BK): nibble i of a word is input 8w + i
            if USE_G_IDX:
                groups = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
            else:
                groups = offs_k // group_size
            scale = tl.load(s_ptr + offs_n[:, None] * G + groups[None, :], mask=n_ok, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + offs_n[:, None] * G + groups[None, :], mask=n_ok, other=0).to(tl.float32)
            w = (codes.to(tl.float32) - zero) * scale  # (BN, BK) de-quantized in registers
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        tl.store(y_ptr + offs_t[:, None] * N + offs_n[None, :], acc,
                 mask=(offs_t[:, None] < T) & (offs_n[None, :] < N))

    @triton.jit
    def nm24_int4_matmul(x_ptr, w_ptr, i_ptr, s_ptr, z_ptr, y_ptr, T, N, K, G, group_size,
                         BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # 2:4: row o keeps K/2 codes (8 per int32 word) and their positions in each run of 4 (16 per word)
        pid_t, pid_n = tl.program_id(0), tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        kept = K // 2
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,) dense inputs
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_t[:, None] * K + offs_k[None, :], mask=(offs_t[:, None] < T) & k_ok[None, :],
                        other=0.0).to(tl.float32)  # (BT, BK)
            # kept code j = 2 * run + slot; input k = 4 * run + p: compare p with both slots' positions
            j0 = (offs_k // 4) * 2  # (BK,) the run's first kept code
            n_ok = (offs_n[:, None] < N) & k_ok[None, :]
            row_w = offs_n[:, None] * (kept // 8)
            row_i = offs_n[:, None] * (kept // 16)
            p = (offs_k % 4)[None, :]
            w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for slot in tl.static_range(2):
                j = j0[None, :] + slot  # (1, BK)
                word = tl.load(w_ptr + row_w + j // 8, mask=n_ok, other=0)
                code = (word >> ((j % 8) * 4)) & 15
                iword = tl.load(i_ptr + row_i + j // 16, mask=n_ok, other=0)
                pos = (iword >> ((j % 16) * 2)) & 3
                w = tl.where(pos == p, code.to(tl.float32) + 1.0, w)  # + 1: marks a kept place (codes may be 0)
            groups = offs_k // group_size
            scale = tl.load(s_ptr + offs_n[:, None] * G + groups[None, :], mask=n_ok, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + offs_n[:, None] * G + groups[None, :], mask=n_ok, other=0).to(tl.float32)
            w = tl.where(w > 0.0, (w - 1.0 - zero) * scale, 0.0)
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        tl.store(y_ptr + offs_t[:, None] * N + offs_n[None, :], acc,
                 mask=(offs_t[:, None] < T) & (offs_n[None, :] < N))

    @triton.jit
    def bitmask_int4_matmul(x_ptr, w_ptr, m_ptr, start_ptr, s_ptr, z_ptr, y_ptr, T, N, K, G, group_size,
                            BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # one stream of kept codes for all rows (row-major, 8 per word); start_ptr: each row's first kept code
        pid_t, pid_n = tl.program_id(0), tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        seen = tl.load(start_ptr + offs_n, mask=n_valid, other=0)  # (BN,) int64: the next kept code of each row
        words_per_row = K // 32
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_t[:, None] * K + offs_k[None, :], mask=(offs_t[:, None] < T) & k_ok[None, :],
                        other=0.0).to(tl.float32)
            n_ok = n_valid[:, None] & k_ok[None, :]
            mword = tl.load(m_ptr + offs_n[:, None] * words_per_row + offs_k[None, :] // 32, mask=n_ok, other=0)
            bit = (mword >> (offs_k[None, :] % 32)) & 1  # (BN, BK)
            rank = seen[:, None] + tl.cumsum(bit, axis=1) - bit  # place of each kept code in the stream
            word = tl.load(w_ptr + rank // 8, mask=n_ok & (bit == 1), other=0)
            code = (word >> ((rank % 8) * 4).to(tl.int32)) & 15
            groups = offs_k // group_size
            scale = tl.load(s_ptr + offs_n[:, None] * G + groups[None, :], mask=n_ok, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + offs_n[:, None] * G + groups[None, :], mask=n_ok, other=0).to(tl.float32)
            w = tl.where(bit == 1, (code.to(tl.float32) - zero) * scale, 0.0)
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            seen += tl.sum(bit, axis=1)
        tl.store(y_ptr + offs_t[:, None] * N + offs_n[None, :], acc,
                 mask=(offs_t[:, None] < T) & (offs_n[None, :] < N))

    return {"int4_matmul": int4_matmul, "nm24_int4_matmul": nm24_int4_matmul,
            "bitmask_int4_matmul": bitmask_int4_matmul, "triton": triton}


def _run(x: torch.Tensor, fmt: LinearFormat, bias: torch.Tensor | None, block_t: int, block_n: int, launch):
    """What every kernel call shares: ``x`` flattened to (T, K), an fp32 output, ``launch(k, x2, y, T, grid)``, then
    the bias and the output in ``x``'s dtype and shape."""
    k = kernels(os.environ.get("TRITON_INTERPRET") == "1")
    K, N = fmt.in_features, fmt.out_features
    x2 = x.reshape(-1, K).contiguous()
    T = x2.shape[0]
    y = torch.empty(T, N, dtype=torch.float32, device=x.device)
    launch(k, x2, y, T, (k["triton"].cdiv(T, block_t), k["triton"].cdiv(N, block_n)))
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def int4_linear(x: torch.Tensor, fmt: LinearFormat, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                *, block_t: int = 16, block_n: int = 32, block_k: int = 32):
    """``x @ W.T + bias`` for a dense int4 layer with the Triton kernel (reference op when it does not apply)."""
    if unavailable_reason() is not None or supports(fmt) is not None or fmt.kind != "int":
        return reference_linear(x, fmt, tensors, bias)
    g_idx = tensors.get("weight_g_idx")

    def launch(k, x2, y, T, grid):
        k["int4_matmul"][grid](
            x2, tensors["weight"], tensors["weight_scale"], tensors["weight_zero"], g_idx if g_idx is not None else x2,
            y, T, fmt.out_features, fmt.in_features, fmt.groups, fmt.effective_group_size,
            USE_G_IDX=g_idx is not None, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
        )

    return _run(x, fmt, bias, block_t, block_n, launch)


_row_starts: dict[int, tuple] = {}  # id(mask) -> (weakref to mask, version, starts): computed once per layer


def _bitmask_row_starts(mask_words: torch.Tensor) -> torch.Tensor:
    """Index of each row's first kept code in the layer's stream (exclusive prefix sum of the rows' popcounts)."""
    entry = _row_starts.get(id(mask_words))
    if entry is not None and entry[0]() is mask_words and entry[1] == mask_words._version:
        return entry[2]
    bits = mask_words.view(torch.uint8)
    counts = torch.zeros(bits.shape[0], dtype=torch.int64, device=bits.device)
    for b in range(8):
        counts += ((bits >> b) & 1).sum(1, dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    key = id(mask_words)  # a weak reference: the entry goes with the layer
    _row_starts[key] = (weakref.ref(mask_words, lambda _, k=key: _row_starts.pop(k, None)), mask_words._version, starts)
    return starts


def sparse_int4_linear(x: torch.Tensor, fmt: LinearFormat, tensors: dict[str, torch.Tensor],
                       bias: torch.Tensor | None, *, block_t: int = 16, block_n: int = 32, block_k: int = 32):
    """``x @ W.T + bias`` for a 2:4 or bitmask sparse int4 layer with the Triton kernels (reference op when they
    do not apply)."""
    if unavailable_reason() is not None or supports(fmt) is not None or fmt.kind == "int":
        return reference_linear(x, fmt, tensors, bias)

    def launch(k, x2, y, T, grid):
        common = (tensors["weight_scale"], tensors["weight_zero"], y, T, fmt.out_features, fmt.in_features, fmt.groups,
                  fmt.effective_group_size)
        blocks = {"BLOCK_T": block_t, "BLOCK_N": block_n, "BLOCK_K": block_k}
        if fmt.kind == "nm":
            k["nm24_int4_matmul"][grid](x2, tensors["weight"], tensors["weight_index"], *common, **blocks)
        else:
            starts = _bitmask_row_starts(tensors["weight_mask"])
            k["bitmask_int4_matmul"][grid](x2, tensors["weight"], tensors["weight_mask"], starts, *common, **blocks)

    return _run(x, fmt, bias, block_t, block_n, launch)
