"""C kernels for the CPU, compiled at first use with the system C compiler and cached.

Why plain C behind ``ctypes`` rather than a ``torch.utils.cpp_extension`` module: the kernels need no torch
headers (they take raw pointers), so they build in about a second instead of a minute, do not depend on the
compiler matching torch's C++ ABI, and a fresh machine (or CI) pays that second once per cache. They are
registered behind the package's ``torch.library`` ops (``hf_compress_prompt.kernels.ops``), which keep the schema,
the fake implementations and autograd. ``ctypes`` releases the GIL during a call, so rows are split across a small
thread pool for large layers.

Set ``HF_COMPRESS_PROMPT_KERNELS=reference`` to disable them.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..._logging import get_logger
from ...formats import LinearFormat
from ..reference import reference_linear

__all__ = [
    "CACHE_ENV",
    "available",
    "bitmask_int4_linear",
    "build",
    "cache_bytes",
    "cache_note",
    "int_linear",
    "kernel_name",
    "prepare",
    "supports",
    "supports_dense",
    "unavailable_reason",
]

logger = get_logger(__name__)

CACHE_ENV = "HF_COMPRESS_PROMPT_KERNEL_CACHE"
_SOURCES = sorted(Path(__file__).parent.glob("*.c"))
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11", "-fno-math-errno"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_use_vnni = False  # dense int8 rows
_use_tiled = False  # int4 in 16-row tiles (dense and sparse): VNNI + VBMI2
_use_bf16 = False
_use_openmp = False  # rows split over torch's OpenMP team inside C (else over a Python thread pool)
_pool: ThreadPoolExecutor | None = None
_private_dir: Path | None = None  # the private build folder used instead of a refused cache folder
_cache_reason: str | None = None  # why the cache folder was refused
_rebuild_reason: str | None = None  # why a cached library was not loaded (and was rebuilt)


def _unsafe(path: Path) -> str | None:
    """Why ``path`` (an existing folder or file) is not safe to load code from, or ``None``: someone else owns it,
    or others may write to it (group- or world-writable), so they could swap the library we load."""
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"writable by {'others' if st.st_mode & 0o002 else 'its group'} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _cache_dir() -> Path:
    """The folder the compiled library is cached in: ``$HF_COMPRESS_PROMPT_KERNEL_CACHE`` or
    ``~/.cache/hf_compress_prompt/kernels`` (created private, 0700). One that another user owns or others can write
    to is refused for a fresh private (0700) temporary folder, with the reason in :func:`cache_note`."""
    global _private_dir, _cache_reason
    root = os.environ.get(CACHE_ENV)
    root = Path(root).expanduser() if root else Path.home() / ".cache" / "hf_compress_prompt" / "kernels"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = _unsafe(root)
    except OSError as exc:
        why = f"not usable ({exc})"
    if why is None:
        return root
    if _private_dir is None or not _private_dir.is_dir():
        _private_dir = Path(tempfile.mkdtemp(prefix=f"hf_compress_prompt-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}-"))
        _cache_reason = f"kernel cache folder {root} is {why}; built into the private folder {_private_dir} instead"
        atexit.register(shutil.rmtree, _private_dir, True)  # the loaded library stays mapped; the folder goes
        logger.warning("%s", _cache_reason)
    return _private_dir


def cache_note() -> str | None:
    """Why the kernel library did not come from the cache as is (a refused cache folder, a library that failed its
    digest and was rebuilt), or ``None``."""
    _load()
    notes = [n for n in (_cache_reason, _rebuild_reason) if n]
    return "; ".join(notes) or None


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build_key(cc: str, version: list[str], flags: list[str]) -> dict:
    """What a cached library was built from: its C sources' digest, the compiler (and version) and the flags."""
    sources = hashlib.sha256()
    for source in _SOURCES:
        sources.update(source.read_bytes())
    return {"source_sha256": sources.hexdigest(), "compiler": [cc, *version], "flags": list(flags),
            "platform": sys.platform}


def _check_manifest(target: Path, key: dict) -> str | None:
    """Why the cached ``target`` must not be loaded, or ``None``: its manifest (``<library>.json``, written when it
    was built) must describe this build and record the library's sha256; the folder must be private."""
    manifest = target.with_suffix(".json")
    why = _unsafe(target.parent) or _unsafe(target)
    if why is not None:
        return f"its folder or file is {why}"
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        return f"its manifest {manifest.name} is missing or unreadable ({type(exc).__name__})"
    if not isinstance(recorded, dict) or {k: recorded.get(k) for k in key} != key:
        return f"its manifest {manifest.name} describes another build"
    digest = _sha256(target)
    if recorded.get("sha256") != digest:
        return f"its sha256 {digest[:16]}... differs from the {str(recorded.get('sha256'))[:16]}... recorded when it was built"
    return None


def _build_with(cc: str, version: list[str], flags: list[str]) -> Path:
    global _rebuild_reason
    key = _build_key(cc, version, flags)
    folder_key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    target = _cache_dir() / folder_key / "libhcp_cpu.so"
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if target.is_file():
        why = _check_manifest(target, key)
        if why is None:
            return target
        _rebuild_reason = f"the cached kernel library {target} was not loaded: {why}; rebuilt it"
        logger.warning("%s", _rebuild_reason)
    if _unsafe(target.parent) is not None:
        raise RuntimeError(f"kernel cache folder {target.parent} is {_unsafe(target.parent)}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([cc, *flags, "-o", str(out), *map(str, _SOURCES), "-lm"], capture_output=True,
                              text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
        manifest = Path(tmp) / "manifest.json"
        manifest.write_text(json.dumps({**key, "sha256": _sha256(out)}, indent=2, sort_keys=True))
        # atomic, library first: a concurrent builder finds either nothing, or the library with the old manifest
        # (a digest mismatch: it rebuilds), or both whole
        os.replace(out, target)
        os.replace(manifest, target.with_suffix(".json"))
    why = _check_manifest(target, key)
    if why is not None:  # another process replaced it in between, or the folder changed under us
        raise RuntimeError(f"the kernel library just built at {target} fails its check: {why}")
    logger.info("built CPU kernels %s", target)
    return target


def build() -> Path:
    """Compiles the kernels (once per source and compiler; cached, with a manifest holding the library's sha256,
    checked before every load) and returns the shared library's path.

    With OpenMP when the compiler has it: the library then shares torch's OpenMP runtime (libgomp is loaded once
    per process), so large layers split their rows over torch's own thread team; without it, rows are split over
    a small Python thread pool instead."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()[:1]
    try:
        return _build_with(cc, version, [*_FLAGS, "-fopenmp"])
    except RuntimeError as exc:
        logger.info("building the CPU kernels with OpenMP failed (%s); building without", exc)
        return _build_with(cc, version, _FLAGS)


_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {  # symbol -> (argtypes, restype), as declared in linear.c / tiled.c
    "hcp_quantize_activations": ([_P, _I64, _I64, _I64, _P, _P, _P], None),
    "hcp_int8_gemm": ([_P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _I64, _P, _I64, _I64, _I32], None),
    "hcp_tiled_int4_gemm": ([_P, _P, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _I64, _P, _I64, _I64, _I32], None),
    "hcp_prepare_activations": ([_P, _I32, _I64, _I64, _I64, _P, _P, _P], _I32),
    "hcp_finish_output": ([_P, _I64, _I64, _P, _P, _I32, _I64, _I64], None),
    "hcp_plan_linear": ([_P, _P, _I32, _I64, _P, _P], _I32),
    "hcp_has_vnni": ([], _I32),
    "hcp_has_tiled": ([], _I32),
    "hcp_sparse_bf16_gemm": ([_P, _P, _P, _I64, _I64, _P, _I64, _P, _I64, _I64, _I32], None),
    "hcp_has_bf16": ([], _I32),
    "hcp_has_openmp": ([], _I32),
}


def _load() -> ctypes.CDLL | None:
    global _lib, _reason, _use_vnni, _use_tiled, _use_bf16, _use_openmp
    if _lib is not None or _reason is not None:
        return _lib
    with _lock:
        if _lib is not None or _reason is not None:
            return _lib
        if os.environ.get("HF_COMPRESS_PROMPT_KERNELS", "").lower() == "reference":
            _reason = "disabled by HF_COMPRESS_PROMPT_KERNELS=reference"
            return None
        try:
            path = build()  # verified: the manifest's sha256 matches the file about to be loaded
        except (OSError, RuntimeError) as exc:
            _reason = f"CPU kernels could not be built: {exc}"
            logger.warning("%s; using the reference ops", _reason)
            return None
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            _reason = f"the CPU kernel library {path} could not be loaded: {exc}"
            logger.warning("%s; using the reference ops", _reason)
            return None
        missing = [name for name in _SIGNATURES if not hasattr(lib, name)]
        if missing:
            _reason = (f"the CPU kernel library {path} lacks symbol{'s' if len(missing) > 1 else ''} "
                       f"{', '.join(missing)} (built from other sources)")
            logger.warning("%s; using the reference ops", _reason)
            return None
        for name, (argtypes, restype) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
        _use_openmp = bool(lib.hcp_has_openmp())
        _use_bf16 = bool(lib.hcp_has_bf16())
        _use_vnni = bool(lib.hcp_has_vnni())
        _use_tiled = bool(lib.hcp_has_tiled())
        _lib = lib
        return lib


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _reason


def kernel_name(kind: str = "int", bits: int | None = 4) -> str:
    """The kernel that serves a storage kind (``"int"``, ``"bitmask"``, ``"nm"``; ``bits=None`` for float values)."""
    _load()
    if bits is None:
        return ("C sparse bf16, AVX-512 BF16 + VBMI2" if _use_bf16
                else "C sparse bf16, portable (no AVX-512 BF16 / VBMI2 on this CPU)")
    if kind in ("bitmask", "nm"):
        return ("C bitmask / N:M sparse int4 x int8 in 16-row tiles (codes expanded in registers), AVX-512 VNNI + "
                "VBMI2" if _use_tiled
                else "C bitmask / N:M sparse int4 x int8 in 16-row tiles, portable (no AVX-512 VBMI2 here)")
    if bits == 8:
        return "C int8 x int8, AVX-512 VNNI" if _use_vnni else "C int8 x int8, portable (no AVX-512 VNNI on this CPU)"
    return ("C int4 x int8 in 16-row tiles, AVX-512 VNNI + VBMI2" if _use_tiled
            else "C int4 x int8 in 16-row tiles, portable (no AVX-512 VNNI + VBMI2 on this CPU)")


def supports(fmt: LinearFormat, dtype: torch.dtype | None = None) -> str | None:
    """``None`` when a C kernel serves ``fmt`` (with values / activations in ``dtype``), else why not."""
    if fmt.bits is None:
        if fmt.in_features % 64:
            return f"in_features={fmt.in_features} is not a multiple of 64"
        if dtype is not None and dtype != torch.bfloat16:
            return f"sparse {dtype} values: the CPU kernel covers bf16 values (a bf16 model)"
        return None
    if fmt.bits not in (4, 8) or (fmt.bits == 8 and fmt.kind != "int"):
        return f"{fmt.describe()}: the CPU kernels cover int4 (dense, bitmask or N:M sparse) and dense int8"
    if fmt.g_idx:
        return "explicit g_idx (act-order without static groups)"
    if fmt.in_features % 64 or fmt.effective_group_size % 64:
        return f"in_features={fmt.in_features} / group size {fmt.effective_group_size} not multiples of 64"
    return None


def supports_dense(fmt: LinearFormat) -> str | None:
    """``None`` when the dense int4 / int8 kernel serves ``fmt``, else why not."""
    if fmt.kind != "int":
        return f"{fmt.describe()}: not a dense integer layer"
    return supports(fmt)


# ----- prepared weights: converted once per layer (kernels repack at load time, never on disk) ----------------------
_prepared: dict[int, tuple] = {}


def _lookup(tensors: dict[str, torch.Tensor]):
    """The prepared entry for these tensors, if any and still current (no tensor replaced or modified in place)."""
    weight = tensors["weight"]
    entry = _prepared.get(id(weight))
    if entry is not None:
        ref, seen, prepared = entry
        if ref() is weight and seen == tuple(t._version for t in tensors.values()):
            return prepared
    return None


def _cached(tensors: dict[str, torch.Tensor], build_fn):
    """``build_fn(tensors)``, computed once per weight tensor (and again if any tensor is modified in place)."""
    prepared = _lookup(tensors)
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


def _grid(tensors) -> tuple[torch.Tensor, torch.Tensor]:
    scale32 = tensors["weight_scale"].float().contiguous()
    return scale32, (scale32 * tensors["weight_zero"].float()).contiguous()


def _tiled_layout(fmt: LinearFormat, tensors: dict[str, torch.Tensor], sparse: bool) -> tuple:
    """The 16-row tile layout of an int4 layer (see tiled.c): codes of 16 rows x 8 inputs per 64-byte chunk, fp32
    scales and uint8 zero points per tile and group; sparse layers keep only their kept codes per chunk, with two
    64-bit keep masks per chunk and each tile's byte offset. Built at load time; the stored tensors are unchanged."""
    from ...formats.bitpack import pack_bits
    from ...formats.packing import _kept_and_values, unpack_codes

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


def _sparse_values_layout(fmt: LinearFormat, tensors: dict[str, torch.Tensor]) -> tuple:
    """Kept bf16 values row by row, their row offsets and the 64-bit masks, for a float sparse layer."""
    from ...formats.bitpack import as_words, pack_bits
    from ...formats.packing import _kept_and_values

    kept, dense = _kept_and_values(fmt, tensors)  # (out, in)
    values = dense[kept].to(torch.bfloat16).contiguous()
    counts = kept.sum(1)
    val_off = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])[:-1].contiguous()
    values = torch.cat([values, torch.zeros(64, dtype=torch.bfloat16)])  # a masked load never reads past the end
    masks = as_words(pack_bits(kept.to(torch.uint8), 1)).contiguous().view(torch.int64).contiguous()
    return values, val_off, masks


def _threads(rows: int, tokens: int, in_features: int) -> int:
    # small work stays on one thread: a busy 2-core box stalls thread hand-offs for milliseconds
    work = rows * in_features * max(tokens, 1)
    return max(1, min(torch.get_num_threads(), 2 if work >= 2_000_000 else 1))


def _pool_for(n: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers < n:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="hcp-kernel")
    return _pool


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
    """A layer as the C kernels see it (``hcp_plan`` in int4_gemm.c): built once per layer at first use."""

    _fields_ = [("kind", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("group_size", ctypes.c_int64),
                ("simd", ctypes.c_int64), ("w", ctypes.c_void_p), ("offsets", ctypes.c_void_p),
                ("masks", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zs", ctypes.c_void_p)]


_SPARSE_BF16, _DENSE8, _TILED, _TILED_SPARSE = 2, 3, 4, 5  # hcp_plan kinds (linear.c)


class LayerPlan:
    """The kernel's tensors for one layer (kept alive here) and the ``hcp_plan`` pointing at them."""

    def __init__(self, kind: int, fmt: LinearFormat, tensors: tuple[torch.Tensor, ...], simd: bool):
        self.kind, self.tensors = kind, tensors
        self.N, self.K, self.group_size = fmt.out_features, fmt.in_features, fmt.effective_group_size
        ptr = [None if t is None else t.data_ptr() for t in tensors]
        # self.weights: the kernel's weight arguments on the row-split path (large layers, more than one thread)
        if kind == _DENSE8:
            w, off, masks, scale, zs = ptr[0], None, None, ptr[1], ptr[2]
            self.weights = (w, scale, zs)
        elif kind in (_TILED, _TILED_SPARSE):
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
        if _use_openmp or _threads(N, T, K) == 1 or self.kind == _SPARSE_BF16 and not bf16:
            rc = lib.hcp_plan_linear(self.address, x.data_ptr(), bf16, T, y.data_ptr(), b_ptr)
            if rc:
                raise MemoryError("hf_compress_prompt CPU kernel: out of memory for activation scratch")
            return y
        xq, sx, xs, y32 = _buffers(T, K, N, self.group_size)
        if self.kind == _SPARSE_BF16:
            gemm, args = lib.hcp_sparse_bf16_gemm, (*self.weights, N, K, x.data_ptr(), T, y32.data_ptr())
        else:
            if lib.hcp_prepare_activations(x.data_ptr(), bf16, T, K, self.group_size, xq.data_ptr(), sx.data_ptr(),
                                           xs.data_ptr()):
                raise MemoryError("hf_compress_prompt CPU kernel: out of memory for activation scratch")
            gemm = lib.hcp_int8_gemm if self.kind == _DENSE8 else lib.hcp_tiled_int4_gemm
            args = (*self.weights, N, K, self.group_size, xq.data_ptr(), sx.data_ptr(), xs.data_ptr(), T,
                    y32.data_ptr())
        _split_rows(gemm, args, N, T, K, self.plan.simd)
        lib.hcp_finish_output(y32.data_ptr(), T, N, b_ptr, y.data_ptr(), bf16, 0, N)
        return y


def _plan(kind: int, fmt: LinearFormat, tensors: dict[str, torch.Tensor]) -> LayerPlan:
    if kind == _DENSE8:
        return LayerPlan(kind, fmt, (tensors["weight"].contiguous().view(torch.uint8), *_grid(tensors)), _use_vnni)
    if kind in (_TILED, _TILED_SPARSE):
        return LayerPlan(kind, fmt, _tiled_layout(fmt, tensors, sparse=kind == _TILED_SPARSE), _use_tiled)
    return LayerPlan(kind, fmt, _sparse_values_layout(fmt, tensors), _use_bf16)


def prepare(fmt: LinearFormat, tensors: dict[str, torch.Tensor]) -> LayerPlan | None:
    """Builds (once, cached) the kernel's load-time layout of a layer; `None` when no C kernel serves it."""
    prepared = _lookup(tensors)  # every call after the first: only this lookup
    if prepared is not None:
        return prepared
    lib = _load()
    if lib is None:
        return None
    if fmt.kind == "int":
        if supports_dense(fmt) is not None:
            return None
        kind = _TILED if fmt.bits == 4 else _DENSE8
    elif fmt.bits is None:
        if supports(fmt, tensors["weight"].dtype) is not None:
            return None
        kind = _SPARSE_BF16
    else:
        if supports(fmt) is not None:
            return None
        kind = _TILED_SPARSE
    return _cached(tensors, lambda t: _plan(kind, fmt, t))


def _linear(x: torch.Tensor, fmt: LinearFormat, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
    """The layer's C kernel (chosen and built once by :func:`prepare`), or the reference op where none applies."""
    plan = prepare(fmt, tensors) if x.device.type == "cpu" else None
    return reference_linear(x, fmt, tensors, bias) if plan is None else plan(_lib, x, bias)


def int_linear(x: torch.Tensor, fmt: LinearFormat, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
    """``x @ W.T + bias`` for a dense int4 or int8 layer, through the C kernel when it applies (else the
    reference)."""
    return _linear(x, fmt, tensors, bias)


def bitmask_int4_linear(x: torch.Tensor, fmt: LinearFormat, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
    """``x @ W.T + bias`` for a sparse int4 layer (bitmask, e.g. SparseGPT 50% + 4-bit, or N:M), through the C
    kernel when it applies (else the reference)."""
    return _linear(x, fmt, tensors, bias)


def sparse_bf16_linear(x: torch.Tensor, fmt: LinearFormat, tensors: dict[str, torch.Tensor], bias):
    """``x @ W.T + bias`` for a pruned (not quantized) layer of a bf16 model, through the C kernel when it applies."""
    if fmt.bits is not None or x.dtype != torch.bfloat16:  # the kernel multiplies bf16 activations only
        return reference_linear(x, fmt, tensors, bias)
    return _linear(x, fmt, tensors, bias)


def sparse_linear(x: torch.Tensor, fmt: LinearFormat, tensors: dict[str, torch.Tensor], bias):
    """The CPU kernel for a sparse layer: int4 values or bf16 values."""
    if fmt.bits is None:
        return sparse_bf16_linear(x, fmt, tensors, bias)
    return bitmask_int4_linear(x, fmt, tensors, bias)


def _split_rows(fn, args: tuple, N: int, T: int, K: int, flag: int) -> None:
    n = _threads(N, T, K)
    if n == 1:
        fn(*args, 0, N, flag)
        return
    per_thread = -(-N // n)
    step = -(-per_thread // 16) * 16  # whole 16-row tiles
    futures = [_pool_for(n).submit(fn, *args, r, min(N, r + step), flag) for r in range(0, N, step)]
    for f in futures:
        f.result()
