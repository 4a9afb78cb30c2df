"""The C library behind the CPU kernels: compiled at first use with the system C compiler, cached, verified before
every load, opened with ``ctypes``, and what the CPU it runs on offers (AVX-512 VNNI / VBMI2 / BF16, OpenMP).

Why plain C behind ``ctypes`` rather than a ``torch.utils.cpp_extension`` module: the kernels need no torch
headers (they take raw pointers), so they build in about a second instead of a minute, do not depend on the
compiler matching torch's C++ ABI, and a fresh machine (or CI) pays that second once per cache.

The cache folder is ``$HF_COMPRESS_PROMPT_KERNEL_CACHE`` or ``~/.cache/hf_compress_prompt/kernels``; each build
has a manifest (``<library>.json``: sources' digest, compiler, flags and the library's sha256) checked before the
library is loaded. Set ``HF_COMPRESS_PROMPT_KERNELS=reference`` to disable the kernels.

The state below (the loaded library, why it is not, the CPU's features) is module state, set once by :func:`load`;
read it as ``library._use_tiled`` etc. at call time (a ``from`` import would copy the value before it is set).
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
from pathlib import Path

from ..._logging import get_logger

__all__ = ["CACHE_ENV", "available", "build", "cache_note", "load", "unavailable_reason"]

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
    load()
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


def load() -> ctypes.CDLL | None:
    """The loaded library (built first if needed; once per process), or ``None`` with the reason in
    :func:`unavailable_reason`."""
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
    return load() is not None


def unavailable_reason() -> str | None:
    load()
    return _reason
