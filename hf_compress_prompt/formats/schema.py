"""The on-disk schema of a compressed linear layer, declared once: what tensors it has, their names, shapes and
dtypes. Packing (:mod:`.packing`), loading (the transformers quantizer), size accounting and the model card all
derive from :meth:`LinearFormat.tensor_specs`.

Every layout is stored in the plain row-major order of the weight ``W`` (shape `(out_features, in_features)`); a
kernel that wants tiles repacks at load time, so no kernel's private layout is ever written to disk.

Tensor names (``<module>.`` + name):

- ``weight``: the payload. Quantized: the integer codes as a little-endian bit stream in int32 words
  (:mod:`.bitpack`). Sparse and not quantized: the kept values in the model's float dtype. Its shape never equals
  the dense ``(out, in)``, so a transformers without this package installed refuses the checkpoint (size mismatch)
  instead of loading garbage.
- ``weight_scale`` (float, `(out, groups)`), ``weight_zero`` (uint8, `(out, groups)`): the group grid, read back as
  ``scale * (code - zero)``; ``weight_g_idx`` (int32, `(in,)`): each input column's group, only when the groups do
  not simply follow the column order (GPTQ act-order checkpoints without static groups).
- ``weight_index`` (int32 words, N:M only): for each run of ``m`` input columns, the positions of its ``n`` kept
  values, ``ceil(log2 m)`` bits each (2 bits for 2:4).
- ``weight_mask`` (int32 words, bitmask only): one bit per weight, 1 = kept, row by row.
- ``bias``: unchanged.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, fields

import torch

from ..errors import UserInputError
from ..validation import check_bits, parse_sparsity, resolve_group_size
from .bitpack import packed_bytes

__all__ = ["FORMAT_VERSION", "RECIPE_CONFIG_KEY", "LinearFormat", "TensorSpec"]

FORMAT_VERSION = 1
RECIPE_CONFIG_KEY = "compression_recipe"  # where the compression recipe is recorded in model.config / config.json


def _is_integer(value) -> bool:
    """An integer other than a bool: Python's, NumPy's, or a symbolic size while tracing (``torch.SymInt``)."""
    if isinstance(value, (bool, str, bytes, float)):
        return False
    if isinstance(value, (int, torch.SymInt)):
        return True
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: the model's float dtype

    def resolve(self, float_dtype: torch.dtype) -> torch.dtype:
        return float_dtype if self.dtype is None else self.dtype


@dataclass(frozen=True)
class LinearFormat:
    """How one linear layer is stored.

    Args:
        in_features (`int`), out_features (`int`), bias (`bool`): the layer's shape.
        bits (`int`, *optional*): 2, 3, 4 or 8 for integer codes; `None` keeps float values (sparse only).
        group_size (`int`, defaults to -1): input columns per scale/zero group (-1: one group per output row).
        symmetric (`bool`): informational; the grid is always stored as scale and zero.
        sparsity (`str`, *optional*): `None` (dense), ``"N:M"`` (e.g. ``"2:4"``) or ``"bitmask"`` (unstructured).
        nnz (`int`, *optional*): kept weights of a bitmask layer (the payload's length).
        g_idx (`bool`): store an explicit group index per input column.
        act_order (`bool`): informational; GPTQ visited columns by decreasing Hessian diagonal (static groups, so
            decoding needs no permutation).
    """

    in_features: int
    out_features: int
    bias: bool = False
    bits: int | None = None
    group_size: int = -1
    symmetric: bool = False
    sparsity: str | None = None
    nnz: int | None = None
    g_idx: bool = False
    act_order: bool = False

    def __post_init__(self):
        self._check_types()
        where = f"layer format {self.out_features}x{self.in_features}"
        if self.bits is None and self.sparsity is None:
            raise UserInputError(f"{where}: neither quantized nor sparse; a plain nn.Linear stores it")
        if self.bits is not None:
            try:
                check_bits(self.bits)
                resolve_group_size(self.group_size, self.in_features)
            except UserInputError as exc:
                raise UserInputError(f"{where}: {exc}") from None
        if self.sparsity == "bitmask":
            if self.nnz is None or not 0 <= self.nnz <= self.in_features * self.out_features:
                raise UserInputError(f"{where}: a bitmask layer needs nnz in [0, {self.in_features * self.out_features}], got {self.nnz}")
        elif self.sparsity is not None:
            _, m = self.nm
            if self.in_features % m:
                raise UserInputError(f"{where}: {self.sparsity} needs in_features divisible by {m}")

    def _check_types(self) -> None:
        """Each field has its JSON type (a format read from an edited ``config.json`` may hold ``"4"`` for ``4``):
        a wrong type is named as such, with the fix, rather than compared as a value."""
        for name, optional in (("in_features", False), ("out_features", False), ("bits", True), ("group_size", False),
                               ("nnz", True)):
            value = getattr(self, name)
            if (value is None and optional) or _is_integer(value):
                continue
            example = f" ({value}, not \"{value}\")" if isinstance(value, str) else ""
            raise UserInputError(f"layer format: {name}={value!r} is a {type(value).__name__}, not an integer"
                                 f"{' (or null)' if optional else ''}; write it as a number{example}")
        for name in ("in_features", "out_features"):
            if isinstance(getattr(self, name), int) and getattr(self, name) <= 0:
                raise UserInputError(f"layer format: {name}={getattr(self, name)} is not a positive size")
        if self.sparsity is not None and not isinstance(self.sparsity, str):
            raise UserInputError(f"layer format: sparsity={self.sparsity!r} is a {type(self.sparsity).__name__}, not "
                                 "a string ('N:M' such as '2:4', or 'bitmask') or null")
        for name in ("bias", "symmetric", "g_idx", "act_order"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                raise UserInputError(f"layer format: {name}={value!r} is a {type(value).__name__}, not true or false")

    # ----- derived quantities -----------------------------------------------------------------------------------
    @property
    def nm(self) -> tuple[int, int]:
        if ":" not in str(self.sparsity):
            raise UserInputError(f"sparsity={self.sparsity!r} is not 'N:M' (such as '2:4') or 'bitmask'")
        pattern = parse_sparsity(str(self.sparsity))
        return pattern.n, pattern.m

    @property
    def groups(self) -> int:
        return 1 if self.group_size == -1 else self.in_features // self.group_size

    @property
    def effective_group_size(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.nm[1])))

    @property
    def kind(self) -> str:
        """``"int"``, ``"nm"`` or ``"bitmask"``: which runtime op serves the layer."""
        return "int" if self.sparsity is None else ("bitmask" if self.sparsity == "bitmask" else "nm")

    def tensor_specs(self) -> dict[str, TensorSpec]:
        """Name -> shape and dtype of every tensor the layer stores (without the module prefix)."""
        out, cols = self.out_features, self.in_features
        specs: dict[str, TensorSpec] = {}
        if self.kind == "int":
            specs["weight"] = TensorSpec((out, packed_bytes(cols, self.bits) // 4), torch.int32)
        elif self.kind == "nm":
            n, m = self.nm
            kept = cols // m * n  # kept values per row
            specs["weight"] = (TensorSpec((out, packed_bytes(kept, self.bits) // 4), torch.int32) if self.bits
                               else TensorSpec((out, kept), None))
            specs["weight_index"] = TensorSpec((out, packed_bytes(kept, self.index_bits) // 4), torch.int32)
        else:
            specs["weight"] = (TensorSpec((packed_bytes(self.nnz, self.bits) // 4,), torch.int32) if self.bits
                               else TensorSpec((self.nnz,), None))
            specs["weight_mask"] = TensorSpec((out, packed_bytes(cols, 1) // 4), torch.int32)
        if self.bits:
            specs["weight_scale"] = TensorSpec((out, self.groups), None)
            specs["weight_zero"] = TensorSpec((out, self.groups), torch.uint8)
            if self.g_idx:
                specs["weight_g_idx"] = TensorSpec((cols,), torch.int32)
        if self.bias:
            specs["bias"] = TensorSpec((out,), None)
        return specs

    def nbytes(self, float_dtype: torch.dtype = torch.float16) -> int:
        """Bytes the layer stores, with float tensors in ``float_dtype``."""
        total = 0
        for spec in self.tensor_specs().values():
            total += math.prod(spec.shape) * torch.empty((), dtype=spec.resolve(float_dtype)).element_size()
        return total

    def describe(self) -> str:
        parts = []
        if self.bits:
            parts.append(f"int{self.bits} g{self.group_size}" + (" sym" if self.symmetric else ""))
        if self.sparsity:
            parts.append(self.sparsity if self.kind == "nm" else f"bitmask nnz={self.nnz}")
        return " + ".join(parts)

    # ----- JSON -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        defaults = {f.name: f.default for f in fields(self)}
        data = asdict(self)
        keep = ("in_features", "out_features")
        return {k: v for k, v in data.items() if k in keep or v != defaults[k]}

    @classmethod
    def from_dict(cls, data: dict) -> LinearFormat:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserInputError(f"unknown layer format keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
