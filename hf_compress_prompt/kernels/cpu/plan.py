"""A layer as the C kernels see it (:class:`LayerPlan`, ``hcp_plan`` in linear.c), built once per layer at first
use and cached per weight tensor; and how a call's rows are split over threads (torch's OpenMP team inside C, or a
small Python thread pool: ``ctypes`` releases the GIL during a call)."""

from __future__ import annotations

import ctypes
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

from ...formats import LinearFormat
from . import library
from .layouts import dense_int8_layout, sparse_values_layout, tiled_layout

__all__ = ["DENSE8", "SPARSE_BF16", "TILED", "TILED_SPARSE", "LayerPlan", "build_plan", "cache_bytes", "cached",
           "lookup"]

SPARSE_BF16, DENSE8, TILED, TILED_SPARSE = 2, 3, 4, 5  # hcp_plan kinds (linear.c)
_pool: ThreadPoolExecutor | None = None


def _threads(rows: int, tokens: int, in_features: int) -> int:
    # small work stays on one thread: a busy 2-core box stalls thread hand-offs for milliseconds
    work = rows * in_features * max(tokens, 1)
    return max(1, min(torch.get_num_threads(), 2 if work >= 2_000_000 else 1))


def _pool_for(n: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers < n:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="hcp-kernel")
    return _pool


def _split_rows(fn, args: tuple, N: int, T: int, K: int, flag: int) -> None:
    """``fn(*args, r0, r1, flag)`` over rows ``[0, N)``, split in whole 16-row tiles over the thread pool."""
    n = _threads(N, T, K)
    if n == 1:
        fn(*args, 0, N, flag)
        return
    per_thread = -(-N // n)
    step = -(-per_thread // 16) * 16  # whole 16-row tiles
    futures = [_pool_for(n).submit(fn, *args, r, min(N, r + step), flag) for r in range(0, N, step)]
    for f in futures:
        f.result()


_scratch = threading.local()


def _buffers(T: int, K: int, N: int, gs: int) -> tuple[torch.Tensor, ...]:
    """Per-thread scratch for the quantized activations and the fp32 output, kept per shape (a decoder's few layer
    shapes alternate on every token, so one slot would be reallocated on almost every call)."""
    key = (T, K, N, gs)
    cache = getattr(_scratch, "buffers", None)
    if cache is None:
        cache = _scratch.buffers = {}
    entry = cache.get(key)
    if entry is None:
        if len(cache) >= 16:  # prefill lengths vary: keep the set small
            cache.clear()
        entry = cache[key] = (torch.empty(T, K, dtype=torch.int8), torch.empty(T, K // 64), torch.empty(T, K // gs),
                              torch.empty(T, N))
    return entry


class _Plan(ctypes.Structure):
    """``hcp_plan`` in linear.c."""

    _fields_ = [("kind", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("group_size", ctypes.c_int64),
                ("simd", ctypes.c_int64), ("w", ctypes.c_void_p), ("offsets", ctypes.c_void_p),
                ("masks", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zs", ctypes.c_void_p)]


class LayerPlan:
    """The kernel's tensors for one layer (kept alive here) and the ``hcp_plan`` pointing at them."""

    def __init__(self, kind: int, fmt: LinearFormat, tensors: tuple[torch.Tensor, ...], simd: bool):
        self.kind, self.tensors = kind, tensors
        self.N, self.K, self.group_size = fmt.out_features, fmt.in_features, fmt.effective_group_size
        ptr = [None if t is None else t.data_ptr() for t in tensors]
        # self.weights: the kernel's weight arguments on the row-split path (large layers, more than one thread)
        if kind == DENSE8:
            w, off, masks, scale, zs = ptr[0], None, None, ptr[1], ptr[2]
            self.weights = (w, scale, zs)
        elif kind in (TILED, TILED_SPARSE):
            w, off, masks, scale, zs = ptr  # zs: the tiles' uint8 zero points; off, masks: None when dense
            self.weights = (w, off, masks, scale, zs)
        else:
            w, off, masks, scale, zs = ptr[0], ptr[1], ptr[2], None, None
            self.weights = (w, off, masks)
        self.plan = _Plan(kind, self.N, self.K, self.group_size, int(simd), w, off, masks, scale, zs)
        self.address = ctypes.addressof(self.plan)

    def __call__(self, lib, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        x = x.contiguous()
        K, N = self.K, self.N
        T = x.numel() // K
        bf16 = int(x.dtype == torch.bfloat16)
        y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)
        b = None if bias is None else bias.float().contiguous()  # a name keeps a converted copy alive
        b_ptr = None if b is None else b.data_ptr()
        if library._use_openmp or _threads(N, T, K) == 1 or self.kind == SPARSE_BF16 and not bf16:
            rc = lib.hcp_plan_linear(self.address, x.data_ptr(), bf16, T, y.data_ptr(), b_ptr)
            if rc:
                raise MemoryError("hf_compress_prompt CPU kernel: out of memory for activation scratch")
            return y
        xq, sx, xs, y32 = _buffers(T, K, N, self.group_size)
        if self.kind == SPARSE_BF16:
            gemm, args = lib.hcp_sparse_bf16_gemm, (*self.weights, N, K, x.data_ptr(), T, y32.data_ptr())
        else:
            if lib.hcp_prepare_activations(x.data_ptr(), bf16, T, K, self.group_size, xq.data_ptr(), sx.data_ptr(),
                                           xs.data_ptr()):
                raise MemoryError("hf_compress_prompt CPU kernel: out of memory for activation scratch")
            gemm = lib.hcp_int8_gemm if self.kind == DENSE8 else lib.hcp_tiled_int4_gemm
            args = (*self.weights, N, K, self.group_size, xq.data_ptr(), sx.data_ptr(), xs.data_ptr(), T,
                    y32.data_ptr())
        _split_rows(gemm, args, N, T, K, self.plan.simd)
        lib.hcp_finish_output(y32.data_ptr(), T, N, b_ptr, y.data_ptr(), bf16, 0, N)
        return y


def build_plan(kind: int, fmt: LinearFormat, tensors: dict[str, torch.Tensor]) -> LayerPlan:
    """The plan of one layer: its load-time layout and whether this CPU runs the kind's SIMD path."""
    if kind == DENSE8:
        return LayerPlan(kind, fmt, dense_int8_layout(tensors), library._use_vnni)
    if kind in (TILED, TILED_SPARSE):
        return LayerPlan(kind, fmt, tiled_layout(fmt, tensors, sparse=kind == TILED_SPARSE), library._use_tiled)
    return LayerPlan(kind, fmt, sparse_values_layout(fmt, tensors), library._use_bf16)


# ----- prepared weights: converted once per layer (kernels repack at load time, never on disk) ----------------------
_prepared: dict[int, tuple] = {}  # id(weight) -> (weakref to weight, tensors' versions, plan)


def lookup(tensors: dict[str, torch.Tensor]) -> LayerPlan | None:
    """The plan for these tensors, if any and still current (no tensor replaced or modified in place)."""
    weight = tensors["weight"]
    entry = _prepared.get(id(weight))
    if entry is not None:
        ref, seen, prepared = entry
        if ref() is weight and seen == tuple(t._version for t in tensors.values()):
            return prepared
    return None


def cached(tensors: dict[str, torch.Tensor], build_fn) -> LayerPlan:
    """``build_fn(tensors)``, computed once per weight tensor (and again if any tensor is modified in place)."""
    prepared = lookup(tensors)
    if prepared is None:
        weight = tensors["weight"]
        key = id(weight)
        prepared = build_fn(tensors)
        _prepared[key] = (weakref.ref(weight, lambda _, k=key: _prepared.pop(k, None)),
                          tuple(t._version for t in tensors.values()), prepared)
    return prepared


def cache_bytes() -> int:
    """Bytes the kernels hold beyond the stored tensors: load-time layouts and fp32 copies of scales (views of the
    stored tensors are not counted)."""
    total = 0
    for ref, _, prepared in list(_prepared.values()):
        weight = ref()
        if weight is None:
            continue
        own = weight.untyped_storage().data_ptr()
        total += sum(t.numel() * t.element_size() for t in prepared.tensors
                     if t is not None and t.untyped_storage().data_ptr() != own)
    return total
