"""Triton kernels for GPUs, behind the same ops as the CPU kernels.

``int4_linear`` multiplies by a dense int4 layer straight from the stored layout (int32 words of 8 nibbles per
row, per-group scale and uint8 zero): each program loads a tile of words, unpacks and de-quantizes it in
registers and accumulates ``tl.dot`` in fp32. It is registered for ``cuda`` inputs when Triton and a GPU are
present, and tested on the CPU with ``TRITON_INTERPRET=1`` (Triton's interpreter) at small shapes.

Kernels are compiled lazily (:func:`kernels`), so importing this module never needs Triton.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ...formats import LinearFormat
from ..reference import reference_linear

__all__ = ["available", "unavailable_reason", "int4_linear", "kernels", "supports"]


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter on the CPU)"
    return None


def available() -> bool:
    return unavailable_reason() is None


def supports(fmt: LinearFormat) -> str | None:
    if fmt.kind != "int" or fmt.bits != 4:
        return f"{fmt.describe()}: the Triton kernel covers dense int4"
    if fmt.in_features % 8:
        return f"in_features={fmt.in_features} is not a multiple of 8"
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

    return {"int4_matmul": int4_matmul, "triton": triton}


def int4_linear(x: torch.Tensor, fmt: LinearFormat, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                *, block_t: int = 16, block_n: int = 32, block_k: int = 32):
    """``x @ W.T + bias`` for a dense int4 layer with the Triton kernel (reference op when it does not apply)."""
    if unavailable_reason() is not None or supports(fmt) is not None:
        return reference_linear(x, fmt, tensors, bias)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    k = kernels(interpret)
    K, N = fmt.in_features, fmt.out_features
    x2 = x.reshape(-1, K).contiguous()
    T = x2.shape[0]
    y = torch.empty(T, N, dtype=torch.float32, device=x.device)
    g_idx = tensors.get("weight_g_idx")
    grid = (k["triton"].cdiv(T, block_t), k["triton"].cdiv(N, block_n))
    k["int4_matmul"][grid](
        x2, tensors["weight"], tensors["weight_scale"], tensors["weight_zero"], g_idx if g_idx is not None else x2,
        y, T, N, K, fmt.groups, fmt.effective_group_size, USE_G_IDX=g_idx is not None,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)
