"""The checks every layer of the package shares, in one place: supported bit widths, quantization group sizes and
sparsity patterns. Configs (:mod:`hf_compress_prompt.compressors.configs`), the maths (:mod:`.methods`), the on-disk
schema (:mod:`.formats.schema`) and the CLI all call these, so a value is accepted or refused, with the same
message, wherever it is given.

This module sits at the bottom of the package: it imports nothing of the package but :mod:`.errors`.

Group sizes: a group size is valid for a set of layer widths (``in_features``) when it divides every one of them.
The sizes offered in an error are the common divisors that are multiples of :data:`GROUP_SIZE_MULTIPLE` (16: smaller
groups cost more in scales than they win in accuracy, and no runtime kernel tiles them), then -1 (one group per
output channel, which always fits). On SmolLM2-135M (widths 576 and 1536, whose greatest common divisor is 192) that
is 16, 32, 48, 64, 96, 192, -1. The CPU kernels run groups that are multiples of 64 (64 and 192 there); other sizes
use the exact reference ops.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .errors import UserInputError

__all__ = [
    "GROUP_SIZE_MULTIPLE",
    "SUPPORTED_BITS",
    "SparsityPattern",
    "check_bits",
    "check_group_size_value",
    "parse_sparsity",
    "resolve_group_size",
    "static_group_index",
    "valid_group_sizes",
]

SUPPORTED_BITS = (2, 3, 4, 8)
GROUP_SIZE_MULTIPLE = 16
_PER_CHANNEL = "-1 = one group per output channel"


def _is_int(value) -> bool:
    """An integer other than a bool: Python's, NumPy's, anything with ``__index__``, or a symbolic size while
    tracing (``torch.SymInt``, named so as not to import torch here)."""
    if isinstance(value, (bool, float, str, bytes)):
        return False
    if type(value).__name__ == "SymInt":
        return True
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


# ----- bits ---------------------------------------------------------------------------------------------------------
def check_bits(bits, *, name: str = "bits", allow_none: bool = False) -> None:
    """``bits`` is one of :data:`SUPPORTED_BITS` (or `None` where ``allow_none``); otherwise a one-line error that
    names the value and the allowed set."""
    if bits is None and allow_none:
        return
    if not _is_int(bits) or bits not in SUPPORTED_BITS:
        allowed = ", ".join(map(str, SUPPORTED_BITS))
        raise UserInputError(f"{name}={bits!r} is not supported; use one of {allowed}"
                             + (" (or None: not quantized)" if allow_none else ""))


# ----- group sizes --------------------------------------------------------------------------------------------------
def check_group_size_value(group_size) -> None:
    """The value alone, before any layer is known: a positive integer or -1."""
    if not _is_int(group_size) or (group_size != -1 and group_size <= 0):
        raise UserInputError(f"group_size={group_size!r} must be a positive integer or -1 (one group per output channel)")


def valid_group_sizes(widths: Iterable[int]) -> list[int]:
    """Every group size that divides all ``widths``: the common divisors that are multiples of
    :data:`GROUP_SIZE_MULTIPLE`, ascending, then -1 (e.g. ``[16, 32, 48, 64, 96, 192, -1]`` for 576 and 1536)."""
    common = math.gcd(*(int(w) for w in widths))
    return [g for g in range(GROUP_SIZE_MULTIPLE, common + 1, GROUP_SIZE_MULTIPLE) if common % g == 0] + [-1]


def resolve_group_size(group_size: int, in_features: int, *, widths: Iterable[int] | None = None) -> int:
    """The group size to use for a layer of ``in_features`` inputs (``in_features`` itself for -1).

    A size that does not divide ``in_features`` is an error whose fix lists :func:`valid_group_sizes` of ``widths``
    (every width of the model, when checking a whole model: one size has to fit them all), else of ``in_features``.
    """
    check_group_size_value(group_size)
    if group_size == -1:
        return in_features
    if in_features % group_size:
        widths = sorted({int(w) for w in widths} | {in_features}) if widths is not None else [in_features]
        where = "" if widths == [in_features] else f"the sizes that divide every width, {', '.join(map(str, widths))}; "
        raise UserInputError(
            f"group_size={group_size} does not divide in_features={in_features}; use one of "
            f"{', '.join(map(str, valid_group_sizes(widths)))} ({where}{_PER_CHANNEL})"
        )
    return group_size


def static_group_index(in_features: int, group_size: int) -> torch.Tensor:
    """The group of each input column when groups are consecutive runs of ``group_size`` columns (-1: one group),
    shape `(in,)`: ``arange(in) // group_size``, GPTQ's trivial ``g_idx``. The one place that computes it: the
    grids (:mod:`.methods`), the on-disk layout (:mod:`.formats`) and the GPTQ import all call this."""
    return torch.arange(in_features) // (in_features if group_size == -1 else group_size)


# ----- sparsity -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparsityPattern:
    """Either unstructured (``fraction`` of weights pruned) or N:M (at most ``n`` weights kept in each run of
    ``m`` consecutive input weights, NVIDIA's convention: 2:4 keeps 2 of every 4)."""

    fraction: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def value(self) -> float | str:
        """The value a config holds for this pattern: the fraction, or ``"N:M"``."""
        return str(self) if self.is_nm else self.fraction

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.fraction:g}"

    def check_width(self, in_features: int) -> None:
        if self.is_nm and in_features % self.m:
            raise UserInputError(
                f"{self} sparsity needs in_features divisible by {self.m}, but in_features={in_features}; "
                "use unstructured sparsity for this layer or skip it"
            )


def parse_sparsity(value: float | str | SparsityPattern, *, label: str | None = None) -> SparsityPattern:
    """``0.5`` or ``"0.5"`` -> unstructured 50%; ``"2:4"`` -> N:M. Fractions must lie in (0, 1); N:M needs 0 < n < m.

    ``label`` names the value in an error (default ``sparsity=<value>``; the CLI passes ``--sparsity '<text>'``).
    """
    if isinstance(value, SparsityPattern):
        return value
    label = label or f"sparsity={value!r}"
    if isinstance(value, str) and ":" in value:
        try:
            n, m = (int(part) for part in value.split(":"))
        except ValueError:
            raise UserInputError(f"{label} is not of the form N:M; use e.g. '2:4' or '4:8'") from None
        if not 0 < n < m:
            raise UserInputError(f"{label} needs 0 < N < M; use e.g. '2:4' or '4:8'")
        return SparsityPattern(fraction=1 - n / m, n=n, m=m)
    try:
        if isinstance(value, bool):
            raise TypeError
        fraction = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{label} is neither a fraction nor N:M; use e.g. 0.5 or '2:4'") from None
    if not 0 < fraction < 1:
        raise UserInputError(f"{label} is outside (0, 1); use a fraction such as 0.5, or N:M such as '2:4'")
    return SparsityPattern(fraction=fraction)
