"""SparseGPT (Frantar & Alistarh, 2023): prune with an adaptive mask and update the remaining weights through the
inverse Hessian (the OBS update), optionally quantizing the kept weights in the same pass (the joint mode)."""

from __future__ import annotations

import os

import torch

from .hessian import damped_inverse_cholesky, factor_input, lazy_batch_update
from .masks import SparsityPattern, parse_sparsity
from .quant_grid import QuantizedWeight, check_group_size, dequantize_codes, grid_params, quantize_codes

__all__ = ["sparsegpt_prune"]


def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | str | SparsityPattern = 0.5,
    bits: int | None = None,
    group_size: int = -1,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    spill_dir: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor, QuantizedWeight | None]:
    """Prunes ``weight`` (shape `(out_features, in_features)`) with SparseGPT.

    Args:
        weight (`torch.Tensor`): the layer's weight.
        H (`torch.Tensor` of shape `(in_features, in_features)`): ``2 X X^T / n`` over the calibration inputs.
        sparsity (`float`, `str` or `SparsityPattern`, *optional*, defaults to 0.5): a fraction, chosen per block of
            ``block_size`` columns over the whole block (the paper's adaptive mask selection), or N:M.
        bits (`int`, *optional*): also quantize the kept weights to this many bits (joint sparse + quantized mode);
            grids are fitted per group to the updated weights when the group is reached, as GPTQ does.
        group_size (`int`, *optional*, defaults to -1): quantization group size along the input dimension.
        symmetric (`bool`, *optional*, defaults to `False`): symmetric quantization grid.
        damp (`float`, *optional*, defaults to 0.01): Hessian damping as a fraction of its mean diagonal.
        block_size (`int`, *optional*, defaults to 128): columns per mask-selection and lazy-update block.
        spill_dir (`str` or `os.PathLike`, *optional*): let ``H`` itself become the inverse factor (overwritten; see
            :func:`~.gptq.gptq_quantize`'s).

    Returns:
        `tuple`: the new weight (same dtype), the mask (True = pruned) and, with ``bits``, the `QuantizedWeight`
        (pruned entries have code ``zero``, i.e. value exactly 0).
    """
    pattern = parse_sparsity(sparsity)
    rows, cols = weight.shape
    pattern.check_width(cols)
    if pattern.is_nm and block_size % pattern.m:
        block_size = pattern.m * max(1, block_size // pattern.m)  # N:M runs must not straddle blocks
    size = check_group_size(group_size, cols) if bits is not None else cols

    W = weight.detach().float().clone(memory_format=torch.contiguous_format)  # (rows, cols), row-major even for Conv1D
    H = H.detach().float()  # the caller's H is changed only with spill_dir
    dead = torch.diagonal(H) == 0
    W[:, dead] = 0
    # upper Cholesky factor of H^-1, made in place in one copy of H (dead inputs fixed), or in H itself
    with factor_input(H, dead, spill_dir=spill_dir) as make:
        Hinv, _ = damped_inverse_cholesky(make, damp)
    del H  # the caller's: not needed in the column loop

    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    groups = cols // size
    scale = torch.empty(rows, groups, device=W.device)
    zero = torch.empty(rows, groups, device=W.device)
    codes = torch.zeros(rows, cols, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (rows, B)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (B, B)
        d_block = torch.diagonal(Hinv1)  # (B,)
        if not pattern.is_nm:
            # Adaptive mask: the OBS saliency w^2 / [H^-1]_jj^2, lowest first, over the whole block.
            saliency = W1**2 / d_block[None, :] ** 2  # (rows, B)
            k = int(saliency.numel() * pattern.fraction)
            mask1 = torch.zeros_like(W1, dtype=torch.bool).view(-1)
            mask1[torch.topk(saliency.flatten(), k, largest=False).indices] = True
            mask1 = mask1.view_as(W1)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if pattern.is_nm and i % pattern.m == 0:
                # N:M: choose each run's pruned weights when the run is reached, from the updated weights.
                saliency = W1[:, i : i + pattern.m] ** 2 / d_block[None, i : i + pattern.m] ** 2  # (rows, m)
                lowest = torch.topk(saliency, pattern.m - pattern.n, dim=1, largest=False).indices
                mask1.scatter_(1, i + lowest, True)
            q = w.masked_fill(mask1[:, i], 0)
            if bits is not None:
                j = i1 + i
                if j % size == 0:
                    ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :size]
                    scale[:, j // size], zero[:, j // size] = grid_params(ahead, bits, symmetric)
                c = quantize_codes(q, scale[:, j // size], zero[:, j // size], bits)
                c = torch.where(mask1[:, i], zero[:, j // size], c)  # pruned stays exactly 0
                codes[:, j] = c
                q = dequantize_codes(c, scale[:, j // size], zero[:, j // size])
            err = (w - q) / d  # OBS: the scaled error of removing / rounding this column
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]  # compensate with the block's later columns
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        lazy_batch_update(W, Err1, Hinv[i1:i2], i2)  # every column after the block

    quantized = None
    if bits is not None:
        quantized = QuantizedWeight(codes.to(torch.uint8), scale, zero, bits, group_size, symmetric)
    return W.to(weight.dtype), mask, quantized
