"""Whether bf16 matmuls are fast on a device: the default of every "bf16 autocast" setting (recovery training,
learned pruning, perplexity in the demo, the knowledge tasks) where the caller does not choose.

On a CPU, torch runs bf16 matmuls through oneDNN only where the CPU has AVX-512 (or AVX512-BF16 / AMX, or an Arm
CPU with bf16); elsewhere (an AVX2-only CPU: AMD Zen 2/3, most laptops before AVX-512) it falls back to a scalar
loop, measured 5x slower than fp32 on a Zen 3 (13.9 vs 71.6 GFLOP/s, 1024 x 576 x 1536, 2 threads): there bf16
autocast makes training and scoring slower, not faster, so the default is fp32.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)


def bf16_matmul_is_fast(device: torch.device | str | None = None) -> bool:
    """`True` where bf16 autocast speeds matmuls up on ``device`` (default the CPU): a CUDA device with bf16, a CPU
    whose bf16 matmuls oneDNN serves; other device types are trusted to their own autocast."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_bf16_is_fast()
    return True


@functools.cache
def _cpu_bf16_is_fast() -> bool:
    fast = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not fast:
        logger.info("bf16 matmuls have no fast path on this CPU (no AVX-512 / AMX: torch falls back to a scalar "
                    "loop, about 5x slower than fp32); bf16 autocast is off by default here")
    return fast


def resolve_bf16(requested: bool | None, device: torch.device | str | None = None) -> bool:
    """``requested`` when given; else :func:`bf16_matmul_is_fast` on ``device``."""
    return bool(requested) if requested is not None else bf16_matmul_is_fast(device)


__all__ = ["bf16_matmul_is_fast", "resolve_bf16"]
