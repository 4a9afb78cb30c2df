"""The layer-wise Hessian ``H = 2 X X^T / n`` of GPTQ and SparseGPT, and its damped inverse Cholesky factor."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator

import torch

from .._logging import get_logger

__all__ = [
    "HessianAccumulator", "column_major_copy", "damped_inverse_cholesky", "factor_input", "hessian_in_place",
    "inverse_cholesky_upper", "lazy_batch_update", "solver_hessian",
]

logger = get_logger(__name__)

# About the most float32 values made at once (2^23: 32 MB) by the blocked steps: X^T X while accumulating (layers up
# to 2896 inputs wide take one block), the solvers' lazy update and act-order's gather.
PRODUCT_BLOCK = 1 << 23


def _block(width: int) -> int:
    """Rows (or columns) of about ``PRODUCT_BLOCK`` values across ``width``, a multiple of 128: the blocks products
    are made in. Blocks of a few rows can differ from the whole product in the last bit, so none is narrower."""
    return max(128, PRODUCT_BLOCK // max(width, 1) // 128 * 128)


class HessianAccumulator:
    """``H = 2/n * sum_i x_i x_i^T`` over calibration tokens (GPTQ's ``add_batch``), plus the squared input norm of
    each channel ``||X_j||^2 / n`` that Wanda uses (the diagonal of ``H / 2``).

    Each batch's ``X^T X`` is computed in float32 and added to a float64 sum; ``H`` is that sum times ``2/n``,
    rounded to float32. Float32 values added in float64 keep every bit the float32 result can show, so ``H`` does
    not depend on how the batches are grouped: accumulators over parts of the data, merged with :meth:`merge` (or
    summed across processes, :meth:`sum_tensors`), give the bytes one accumulator over all of it gives.

    ``H`` is symmetric, so the sum keeps only its upper triangle, in blocks of rows (a multiple of 128, about
    ``PRODUCT_BLOCK`` values of ``X^T X`` made at once), each from its diagonal to the last column: about half the
    float64 matrix (for an 8192-wide ``down_proj``, 302 MB instead of 537 MB) and half the products. :attr:`H`
    mirrors it into the full float32 matrix. On this CPU's BLAS the blocks hold the bytes of the whole product
    (tests/methods; checked for widths up to 13824), which comes out exactly symmetric, so ``H`` has the bytes of
    the whole product added at once; blocks of a few rows can differ in the last bit, so none is narrower than 128.

    Args:
        in_features (`int`): the layer's input width.
        diagonal_only (`bool`, *optional*, defaults to `False`): keep only the diagonal (all Wanda needs), in O(d)
            memory and time per token instead of O(d^2).
        clip_token_norm (`float`, *optional*): cap each token's input norm at this many times the median norm of
            its batch before it enters ``H``. A few massive-activation tokens (attention sinks: the first position,
            some delimiters) have inputs to ``o_proj``/``down_proj`` tens of times larger than the rest, so
            unclipped they dominate ``H`` and GPTQ fits them at the expense of every ordinary token (on SmolLM2's
            layer-2 ``down_proj``, 2% of the tokens hold 20% of ``trace(H)``, and GPTQ's error on the other 98% is
            then 1.15x round-to-nearest's on WikiText). `None` keeps every token's weight (the reference's ``H``).
    """

    def __init__(
        self, in_features: int, device: torch.device | str = "cpu", diagonal_only: bool = False,
        clip_token_norm: float | None = None,
    ):
        self.in_features = in_features
        self.diagonal_only = diagonal_only
        self.clip_token_norm = clip_token_norm
        if diagonal_only:
            self._rows = [0]
            self._sums = [torch.zeros(in_features, dtype=torch.float64, device=device)]  # the diagonal's sum
        else:  # rows [i, i + rows) of sum_i x_i x_i^T, columns [i, in_features): the upper triangle
            rows = _block(in_features)
            self._rows = list(range(0, in_features, rows))
            self._sums = [torch.zeros(min(rows, in_features - i), in_features - i, dtype=torch.float64, device=device)
                          for i in self._rows]
        self.tokens = 0
        self._finished = False
        self._H: torch.Tensor | None = None  # H once finished (the float64 sum is then dropped)
        self._diagonal: torch.Tensor | None = None
        # Set by the caller for the last solve that reads H: a folder that solve may spill H to while it overwrites
        # H with its factor (:meth:`take_H`, :func:`hessian_in_place`); `None`: H is read, never changed.
        self.spill_dir: str | os.PathLike | None = None

    def add_batch(self, x: torch.Tensor) -> None:
        """Adds inputs ``x`` of shape `(..., in_features)`; every leading position counts as one sample."""
        self._check_open()
        x = x.reshape(-1, x.shape[-1]).float()  # (n, in)
        n = x.shape[0]
        if n == 0:
            return
        if self.clip_token_norm is not None:
            norms = x.norm(dim=1)  # (n,)
            cap = self.clip_token_norm * norms.median()
            x = x * torch.clamp(cap / norms.clamp_min(1e-12), max=1.0)[:, None]  # massive tokens scaled down to cap
        if self.diagonal_only:
            self._sums[0].add_((x * x).sum(0))
        else:
            # X^T X in float32, as the reference computes it, a block of rows at a time from its diagonal on, added
            # to that block of the float64 sum: the whole product would be a second H beside the sum (268 MB for
            # an 8192-wide down_proj); every path and process makes the same blocks
            for i, block in zip(self._rows, self._sums):
                block.add_(x[:, i:i + block.shape[0]].T @ x[:, i:])
        self.tokens += n

    def sum_tensors(self) -> list[torch.Tensor]:
        """The float64 tensors the sum is kept in (blocks of its upper triangle, or the diagonal): adding them
        element by element to another accumulator's of the same layer adds its batches (what ``torch.distributed``'s
        ``all_reduce`` of each does across processes)."""
        self._check_open()
        return self._sums

    @property
    def sum(self) -> torch.Tensor | None:
        """``sum_i x_i x_i^T`` (the diagonal for a ``diagonal_only`` accumulator), float64, made whole from the
        kept triangle (an n x n float64 matrix: for inspection); `None` once finished."""
        if self._finished:
            return None
        if self.diagonal_only:
            return self._sums[0]
        return self._assemble(self._sums, torch.float64)

    def merge(self, other: HessianAccumulator) -> None:
        """Adds ``other``'s tokens (an accumulator of the same layer over other batches)."""
        self._check_open()
        for mine, theirs in zip(self.sum_tensors(), other.sum_tensors(), strict=True):
            mine.add_(theirs.to(mine.device))
        self.tokens += other.tokens

    def finish(self) -> None:
        """Every batch is in: keeps ``H`` (float32, the bytes :attr:`H` gives) and drops the float64 sum, a block
        of rows at a time as ``H`` is filled (for an 8192-wide ``down_proj``, H's 268 MB kept, at most 570 MB held
        on the way). A diagonal-only accumulator is small and keeps its sum; :attr:`channel_sq_norm` gives the same
        bytes after. No batch can be added after."""
        if not self.diagonal_only and not self._finished:
            self._diagonal = self._sum_diagonal()  # the diagonal: n floats
            sums, self._sums = self._sums, []
            self._H = self._assemble(sums, torch.float32, scale=2.0 / max(self.tokens, 1), consume=True)
            self._finished = True

    def take_H(self) -> torch.Tensor:
        """:attr:`H`, handed over (the accumulator is finished first and forgets it): for the last solve that needs
        it, which may then overwrite it (GPTQ's and SparseGPT's ``spill_dir``) instead of copying it. :attr:`H`
        raises afterwards; :attr:`channel_sq_norm` still works."""
        self.finish()
        H, self._H = self.H, None
        return H

    def _assemble(self, blocks: list[torch.Tensor | None], dtype: torch.dtype, scale: float | None = None,
                  consume: bool = False) -> torch.Tensor:
        """The full symmetric matrix in ``dtype`` from the upper-triangle ``blocks`` (each times ``scale``, in
        float64, before it is rounded), the lower triangle mirrored from the upper. ``consume``: each block is
        scaled in place and dropped from ``blocks`` once copied, so its memory is given back as ``H`` fills."""
        n = self.in_features
        M = torch.empty(n, n, dtype=dtype, device=blocks[0].device)
        for k, i in enumerate(self._rows):
            block = blocks[k]
            if consume:
                blocks[k] = None
            if scale is not None:
                block = block.mul_(scale) if consume else block * scale
            rows = block.shape[0]
            M[i:i + rows, i:] = block  # rounded to ``dtype`` here
            del block
            M[i + rows:, i:i + rows] = M[i:i + rows, i + rows:].T  # the mirror image below this block
        return M

    def _sum_diagonal(self) -> torch.Tensor:
        return torch.cat([torch.diagonal(block[:, :block.shape[0]]) for block in self._sums]).clone()

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("this HessianAccumulator was finished (its sum dropped); no batch can be added")

    @property
    def H(self) -> torch.Tensor:
        """``2 X^T X / n``, shape `(in_features, in_features)`, float32."""
        if self.diagonal_only:
            raise ValueError("this accumulator keeps only the diagonal; create it with diagonal_only=False for H")
        if self._finished:
            if self._H is None:
                raise RuntimeError("this HessianAccumulator's H was handed over by take_H()")
            return self._H
        return self._assemble(self._sums, torch.float32, scale=2.0 / max(self.tokens, 1))

    @property
    def channel_sq_norm(self) -> torch.Tensor:
        """``||X_j||^2 / n`` per input channel, shape `(in_features,)`, float32."""
        if self._finished:  # the float64 diagonal it kept
            diagonal = self._diagonal
        else:
            diagonal = self._sums[0] if self.diagonal_only else self._sum_diagonal()
        return (diagonal / max(self.tokens, 1)).float()


def solver_hessian(H: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """A fresh copy of ``H`` as GPTQ's and SparseGPT's solves factor it (``damped_inverse_cholesky(lambda:
    solver_hessian(H, dead, perm))``): the diagonal of ``dead`` inputs (always zero: their weights are set to 0, so
    any value works) set to 1, and with ``perm`` (act-order) rows and columns in that order, gathered a block of
    rows at a time. The copy is column-major (:func:`column_major_copy`)."""
    if perm is None:
        M = column_major_copy(H)
    else:
        M = _column_major_empty(H)
        rows = max(1, PRODUCT_BLOCK // max(H.shape[0], 1))  # a gather is exact in blocks of any size
        for i in range(0, H.shape[0], rows):
            M[i:i + rows] = H[perm[i:i + rows, None], perm]  # about PRODUCT_BLOCK values gathered at once
    M.diagonal()[dead if perm is None else dead[perm]] = 1
    return M


def lazy_batch_update(W: torch.Tensor, err: torch.Tensor, hinv_rows: torch.Tensor, start: int) -> None:
    """GPTQ's and SparseGPT's lazy batch update, ``W[:, start:] -= err @ hinv_rows[:, start:]``, made a block of
    columns at a time (about ``PRODUCT_BLOCK`` values each): the whole product is a temporary as large as the rest of
    ``W`` (96 MB for the first block of an 8192-wide ``down_proj``). Each block of columns holds the whole product's
    bytes on this CPU's BLAS (tests/methods), as do the blocks of :class:`HessianAccumulator`."""
    columns = _block(W.shape[0])
    for j in range(start, W.shape[1], columns):
        W[:, j:j + columns] -= err @ hinv_rows[:, j:j + columns]


def column_major_copy(H: torch.Tensor) -> torch.Tensor:
    """A copy of the square matrix ``H`` with the same values, laid out column-major (Fortran order, LAPACK's and
    cuSOLVER's own): torch factors and inverts such a matrix in place through ``out=``, where a row-major one goes
    through a column-major temporary the size of ``H`` at every step (three more n x n matrices at the peak of a
    solve; 268 MB each for an 8192-wide ``down_proj``). Same values, same LAPACK calls: the same bytes."""
    return _column_major_empty(H).copy_(H)


@contextlib.contextmanager
def hessian_in_place(H: torch.Tensor, dead: torch.Tensor, spill_dir: str | os.PathLike,
                     perm: torch.Tensor | None = None) -> Iterator[Callable[[], torch.Tensor]]:
    """:func:`damped_inverse_cholesky`'s ``make`` working in ``H``'s own memory, which becomes the factor: one
    n x n matrix fewer than :func:`solver_hessian`'s copy (268 MB for an 8192-wide ``down_proj``). ``H`` (float32,
    row-major, on the CPU) must be exactly symmetric, as :attr:`HessianAccumulator.H` is. It is first made into the
    matrix :func:`solver_hessian` would copy, where it lies: permuted by act-order's ``perm`` (a block of rows, then
    one row, at a time), dead inputs (``dead``: zero diagonal) set to 1. That matrix is symmetric too, so its
    transpose, a column-major view, holds the copy's values in the copy's layout, and the factor has the copy's
    bytes. Its values go to a temporary file in ``spill_dir`` (unlinked at once, so nothing is left behind even by
    a killed run), read back only when an attempt fails and the damping is raised (a failed attempt leaves nothing
    of the matrix: torch zeroes the other triangle too). ``H`` is overwritten."""
    if perm is not None:
        _permute_in_place(H, perm)
    H.diagonal()[dead if perm is None else dead[perm]] = 1
    values = H.numpy()  # shares H's memory: the file is written from it and read back into it, with no copy
    with tempfile.TemporaryFile(dir=spill_dir) as spill:
        spill.write(memoryview(values).cast("B"))
        attempts = 0

        def make() -> torch.Tensor:
            nonlocal attempts
            if attempts:
                spill.seek(0)
                view, done = memoryview(values).cast("B"), 0
                while done < len(view):
                    read = spill.readinto(view[done:])
                    if not read:
                        raise OSError(f"the spilled Hessian in {spill_dir} came back short")
                    done += read
            attempts += 1
            return H.mT  # column-major, the values of H (symmetric)

        yield make


def _permute_in_place(H: torch.Tensor, perm: torch.Tensor) -> None:
    """``H`` becomes ``H[perm][:, perm]`` in its own memory: each block of rows (about ``PRODUCT_BLOCK`` values)
    gathers its columns, then the rows move along the permutation's cycles, one row held aside per cycle."""
    n = H.shape[0]
    rows = max(1, PRODUCT_BLOCK // max(n, 1))
    for i in range(0, n, rows):
        H[i:i + rows] = H[i:i + rows, perm]
    order, moved = perm.tolist(), [False] * n
    aside = torch.empty(n, dtype=H.dtype, device=H.device)
    for start in range(n):  # row i becomes old row order[i]
        if moved[start]:
            continue
        aside.copy_(H[start])
        i = start
        while True:
            moved[i] = True
            j = order[i]
            if j == start:
                H[i].copy_(aside)
                break
            H[i].copy_(H[j])
            i = j


def factor_input(H: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor | None = None,
                 spill_dir: str | os.PathLike | None = None):
    """A context giving GPTQ's and SparseGPT's ``make`` for :func:`damped_inverse_cholesky`: ``H``'s own memory
    (:func:`hessian_in_place`) when ``spill_dir`` is given and ``H`` can be worked in (float32, row-major, in host
    memory), else a fresh copy per attempt (:func:`solver_hessian`; ``H`` is not changed)."""
    if spill_dir is not None and H.device.type == "cpu" and H.dtype == torch.float32 and H.is_contiguous():
        return hessian_in_place(H, dead, spill_dir, perm)
    return contextlib.nullcontext(lambda: solver_hessian(H, dead, perm))


def _column_major_empty(H: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(H.shape, (1, H.shape[0]), dtype=H.dtype, device=H.device)


def inverse_cholesky_upper(
    H: torch.Tensor, damp: float = 0.01, max_damp: float = 1.0, retries: int = 6
) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor of ``(H + lambda I)^-1``, with ``lambda = damp * mean(diag H)``.

    ``H`` must already have its dead channels (zero diagonal) set to 1; it is not changed. When the factorization
    fails, the damping is multiplied by 10 up to ``max_damp``, as the reference implementations advise doing by hand.

    Returns:
        `tuple[torch.Tensor, float]`: the factor (shape `(n, n)`, upper triangular) and the damping that worked.
    """
    factor, used = damped_inverse_cholesky(lambda: column_major_copy(H), damp, max_damp, retries)
    return factor.contiguous(), used


def damped_inverse_cholesky(
    make: Callable[[], torch.Tensor], damp: float = 0.01, max_damp: float = 1.0, retries: int = 6
) -> tuple[torch.Tensor, float]:
    """:func:`inverse_cholesky_upper` computed in place: ``make()`` returns a fresh column-major copy of the
    (undamped) ``H`` (:func:`column_major_copy`, :func:`solver_hessian`), which is damped, factored, inverted and
    factored again in that one matrix and returned (column-major: index it, do not assume ``is_contiguous()``). A
    solver that needs ``H`` changed (dead channels, act-order's permutation) builds the changed copy in ``make`` and
    so holds one n x n matrix beside the caller's, instead of four (for an 8192-wide ``down_proj``, 268 MB instead
    of 1.07 GB); a row-major copy works too, but torch then puts a column-major temporary of its size beside it at
    each of the three steps. ``make`` runs once per attempt (a failed attempt has overwritten its copy); ``lambda``
    comes from the first copy's diagonal. The bytes equal the out-of-place computation's (LAPACK works in place
    either way)."""
    mean_diag = None
    current = damp
    for attempt in range(retries + 1):
        work = make()
        if mean_diag is None:
            mean_diag = torch.mean(torch.diagonal(work))
        work.diagonal().add_(current * mean_diag)  # H + lambda I, with no identity matrix made
        info = torch.empty((), dtype=torch.int32, device=work.device)
        torch.linalg.cholesky_ex(work, out=(work, info))  # L, lower
        if info.item() == 0:
            torch.cholesky_inverse(work, out=work)  # (H + lambda I)^-1
            torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
            if info.item() == 0:
                if attempt:
                    logger.warning("Cholesky factorization needed damping %.3g (asked %.3g)", current, damp)
                return work, current
        del work
        if current >= max_damp:
            break
        current = min(current * 10, max_damp)
    raise torch.linalg.LinAlgError(
        f"the Hessian is not positive definite even with damping {current:g}; use more calibration samples"
    )
