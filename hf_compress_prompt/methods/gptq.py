"""GPTQ (Frantar et al., 2023): quantize one weight column at a time and move the rounding error onto the columns
not yet quantized, using the inverse Hessian of the layer's reconstruction loss ``||WX - QX||^2``."""

from __future__ import annotations

import os

import torch

from ..validation import static_group_index
from .hessian import damped_inverse_cholesky, factor_input, lazy_batch_update
from .quant_grid import QuantizedWeight, check_group_size, dequantize_codes, grid_params, quantize_codes

__all__ = ["gptq_quantize"]


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    group_size: int = -1,
    symmetric: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    prune_mask: torch.Tensor | None = None,
    spill_dir: str | os.PathLike | None = None,
) -> QuantizedWeight:
    """Quantizes ``weight`` (shape `(out_features, in_features)`) with GPTQ.

    Args:
        weight (`torch.Tensor`): the layer's weight.
        H (`torch.Tensor` of shape `(in_features, in_features)`): ``2 X X^T / n`` over the calibration inputs.
        bits (`int`, *optional*, defaults to 4): 2, 3, 4 or 8.
        group_size (`int`, *optional*, defaults to -1): input columns per group; -1 for one group per output row.
        symmetric (`bool`, *optional*, defaults to `False`): symmetric grid.
        act_order (`bool`, *optional*, defaults to `False`): visit columns by decreasing ``diag(H)`` (desc_act).
            Groups are then static: their grids are fixed from the original weights before any update, and groups
            follow the original column order, so the stored format needs no per-column group index. Without
            act-order a group's grid is fitted to the updated weights when GPTQ reaches it (the reference's default).
        damp (`float`, *optional*, defaults to 0.01): damping as a fraction of the mean of ``diag(H)``; raised
            automatically when the Cholesky factorization fails.
        block_size (`int`, *optional*, defaults to 128): columns updated together (lazy batch updates).
        prune_mask (`torch.Tensor` of shape `(out_features, in_features)`, *optional*): weights pruned by an earlier
            step (True = pruned). They are held at exactly 0 (the grid always holds 0) and the error of doing so is
            compensated like rounding error, so quantizing keeps the sparsity pattern.
        spill_dir (`str` or `os.PathLike`, *optional*): let ``H`` itself become the inverse factor, one
            `(in_features, in_features)` matrix fewer (268 MB for an 8192-wide layer), same result: ``H`` is
            overwritten (pass one nothing else reads, e.g. :meth:`~.hessian.HessianAccumulator.take_H`'s, exactly
            symmetric) after its values are written to a temporary file in this folder, read back only when the
            damping must be raised (:func:`~.hessian.hessian_in_place`; act-order permutes it there). Not for an
            ``H`` off the CPU: it is then copied, as without ``spill_dir``.

    Returns:
        `QuantizedWeight` (with ``perm`` set when ``act_order``).
    """
    rows, cols = weight.shape
    size = check_group_size(group_size, cols)
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)  # (rows, cols), row-major even for Conv1D
    H = H.detach().float()  # (cols, cols); the caller's H is changed only with spill_dir
    dead = torch.diagonal(H) == 0  # inputs that were always zero: any value works, so quantize zeros
    W[:, dead] = 0
    if prune_mask is not None:
        prune_mask = prune_mask.to(W.device, torch.bool)
        W[prune_mask] = 0

    groups = cols // size
    group_of = static_group_index(cols, group_size)  # g_idx in the original order
    # Static grids (per channel, or groups under act-order) come from the original weights. Otherwise, as in the
    # reference, each group's grid is fitted when its first column is reached, to the weights as updated so far.
    static = group_size == -1 or act_order
    if static:
        scale, zero = grid_params(W.reshape(rows, groups, size).transpose(0, 1).reshape(-1, size), bits, symmetric)
        scale, zero = scale.view(groups, rows).T.contiguous(), zero.view(groups, rows).T.contiguous()  # (rows, groups)
    else:
        scale, zero = torch.empty(rows, groups, device=W.device), torch.empty(rows, groups, device=W.device)

    perm = None
    if act_order:
        diagonal = torch.diagonal(H).clone()
        diagonal[dead] = 1  # dead inputs count as 1, as solver_hessian sets them
        perm = torch.argsort(diagonal, descending=True)
        W, group_of = W[:, perm], group_of[perm]
        if prune_mask is not None:
            prune_mask = prune_mask[:, perm]

    # upper Cholesky factor of H^-1, made in place in one copy of H (dead inputs fixed, in act-order's order), or in
    # H itself
    with factor_input(H, dead, perm, spill_dir) as make:
        Hinv, _ = damped_inverse_cholesky(make, damp)
    del H  # the caller's: not needed in the column loop
    # Each block is worked on transposed, (B, rows), so that a column of W is a contiguous row: the per-column
    # steps read and write contiguous memory. The arithmetic is the textbook loop's, element for element (the
    # rank-1 update as an explicit product, then a subtraction), so the bits do not depend on the layout.
    codes_t = torch.empty(cols, rows, dtype=torch.uint8, device=W.device)  # whole numbers < 2^bits <= 256: exact
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].T.contiguous()  # (B, rows): row i is column i1 + i
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (B, B)
        if static:  # every column's grid is known: gather them once per block
            scale1, zero1 = scale[:, group_of[i1:i2]].T.contiguous(), zero[:, group_of[i1:i2]].T.contiguous()
        keep1 = None if prune_mask is None else prune_mask[:, i1:i2].T.contiguous()
        for i in range(i2 - i1):
            w = W1[i]  # (rows,)
            if static:
                s, z = scale1[i], zero1[i]
            else:
                g = group_of[i1 + i]
                if (i1 + i) % size == 0:  # fit this group's grid to its columns' current values
                    inside = W1[i:i + size]
                    rest = size - inside.shape[0]
                    ahead = torch.cat([inside.T, W[:, i2:i2 + rest]], dim=1) if rest > 0 else inside.T
                    scale[:, g], zero[:, g] = grid_params(ahead, bits, symmetric)
                s, z = scale[:, g], zero[:, g]
            c = quantize_codes(w, s, z, bits)
            if keep1 is not None:
                c = torch.where(keep1[i], z, c)  # pruned stays exactly 0
            codes_t[i1 + i] = c
            err = (w - dequantize_codes(c, s, z)) / Hinv1[i, i]  # GPTQ eq. (2): the scaled error of this column
            W1[i:] -= torch.outer(Hinv1[i, i:], err)  # update the block's later columns
            Err1[i] = err
        lazy_batch_update(W, Err1.T.contiguous(), Hinv[i1:i2], i2)  # every column after the block
    codes = codes_t.T.contiguous()

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]  # back to the original column order
    return QuantizedWeight(codes, scale, zero, bits, group_size, symmetric, perm)
