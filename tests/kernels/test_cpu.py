"""The C int4 kernel against the reference op (dequantize then matmul): bf16 activations, max error relative to
the largest output <= 1e-2, over shapes (SmolLM2's 576 / 1536 / 49152, odd row counts), token counts 1-64 and
group sizes."""

import ast
import subprocess
import sys

import pytest
import torch

from hf_compress_prompt.formats import LinearFormat, pack_linear
from hf_compress_prompt.kernels import cpu, reference_only, status
from hf_compress_prompt.kernels.cpu import layouts, library, plan
from hf_compress_prompt.kernels.reference import reference_linear
from hf_compress_prompt.methods.rtn import rtn_quantize
from hf_compress_prompt.nn import layer_status

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")

SHAPES = [  # (out, in, group_size)
    (576, 576, 64), (1536, 576, 64), (576, 1536, 64), (576, 1536, -1), (192, 576, 192), (257, 128, 128), (3, 64, 64),
]


def _layer(out, inp, group_size, symmetric=False, seed=0, bits=4):
    torch.manual_seed(seed)
    W = torch.randn(out, inp) * 0.05
    qw = rtn_quantize(W, bits, group_size, symmetric)
    fmt = LinearFormat(inp, out, bits=bits, group_size=group_size, symmetric=symmetric)
    return fmt, pack_linear(fmt, W, codes=qw.codes, scale=qw.scale, zero=qw.zero)


def _rel_err(y, ref):
    return float((y.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 64])
def test_matches_reference_with_bf16_activations(shape, tokens):
    fmt, tensors = _layer(*shape)
    x = torch.randn(tokens, fmt.in_features).bfloat16()
    ref = reference_linear(x.float(), fmt, tensors, None)
    assert _rel_err(cpu.int_linear(x, fmt, tensors, None), ref) <= 1e-2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize("simd", [True, False])
def test_int8_matches_reference(shape, tokens, simd, monkeypatch):
    monkeypatch.setattr(library, "_use_vnni", simd and library._use_vnni)
    fmt, tensors = _layer(*shape, bits=8)
    x = torch.randn(tokens, fmt.in_features).bfloat16()
    ref = reference_linear(x.float(), fmt, tensors, None)
    assert _rel_err(cpu.int_linear(x, fmt, tensors, None), ref) <= 1e-2
    assert cpu.supports_dense(fmt) is None


def test_embedding_sized_layer_and_bias_and_3d_input():
    fmt, tensors = _layer(49152, 576, 64, symmetric=True)
    bias = torch.randn(49152)
    x = torch.randn(2, 3, 576).bfloat16()
    y = cpu.int_linear(x, fmt, tensors, bias)
    assert y.shape == (2, 3, 49152) and y.dtype == torch.bfloat16
    assert _rel_err(y, reference_linear(x.float(), fmt, tensors, bias)) <= 1e-2


def _bitmask_layer(out, inp, group_size, seed=0, sparsity="bitmask"):
    from hf_compress_prompt.methods.masks import layer_prune_mask, nm_prune_mask

    torch.manual_seed(seed)
    W = torch.randn(out, inp) * 0.05
    pruned = layer_prune_mask(W.abs(), 0.5) if sparsity == "bitmask" else nm_prune_mask(W.abs(), 2, 4)
    W = W.masked_fill(pruned, 0)
    qw = rtn_quantize(W, 4, group_size, False)
    fmt = LinearFormat(inp, out, bits=4, group_size=group_size, sparsity=sparsity,
                       nnz=int((~pruned).sum()) if sparsity == "bitmask" else None)
    return fmt, pack_linear(fmt, W, codes=qw.codes, scale=qw.scale, zero=qw.zero, pruned=pruned)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 9, 64])
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("sparsity", ["bitmask", "2:4"])
def test_sparse_int4_matches_reference(shape, tokens, simd, sparsity, monkeypatch):
    monkeypatch.setattr(library, "_use_tiled", simd and library._use_tiled)
    fmt, tensors = _bitmask_layer(*shape, sparsity=sparsity)
    x = torch.randn(tokens, fmt.in_features).bfloat16()
    ref = reference_linear(x.float(), fmt, tensors, None)
    assert _rel_err(cpu.bitmask_int4_linear(x, fmt, tensors, None), ref) <= 1e-2


@pytest.mark.parametrize("shape", [(64, 576, 64), (257, 128, 128), (3, 64, 64), (576, 1536, -1)])
def test_portable_path_matches_too(shape, monkeypatch):
    """The portable C path equals the SIMD one up to float summation order (both see the same int8 activations),
    and the reference within the W4A8 tolerance."""
    fmt, tensors = _layer(*shape)
    x = torch.randn(5, fmt.in_features)
    simd = cpu.int_linear(x, fmt, tensors, None)
    plan._prepared.pop(id(tensors["weight"]))
    monkeypatch.setattr(library, "_use_tiled", False)
    portable = cpu.int_linear(x, fmt, tensors, None)
    assert _rel_err(portable, simd) <= 1e-5
    tolerance = 2e-2 if fmt.in_features == 64 else 1e-2  # one 64-input block: int8 rounding of 64 activations
    assert _rel_err(portable, reference_linear(x, fmt, tensors, None)) <= tolerance


@pytest.mark.parametrize("sparsity", ["bitmask", "2:4"])
def test_sparse_tiles_store_fewer_bytes_than_dense_tiles(sparsity):
    """A 50% sparse tile keeps max(kept low, kept high) code bytes per chunk plus 1 bit of mask per weight: less
    than the dense tile's half byte per weight (what makes it faster where memory bandwidth decides)."""
    fmt, tensors = _bitmask_layer(256, 1024, 64, sparsity=sparsity)
    stream, tile_off, masks, scale, zero = layouts.tiled_layout(fmt, tensors, sparse=True)
    dense_bytes = 256 * 1024 // 2
    sparse_bytes = stream.numel() - 64 + masks.numel() * 8
    assert masks.numel() == 256 * 1024 // 64 and tile_off.numel() == 256 // 16
    assert 0.70 * dense_bytes < sparse_bytes < 0.82 * dense_bytes
    assert scale.shape == zero.shape == (256 // 16, 1024 // 64, 16)


def _run_with_threads(fn, threads: int, openmp: bool, monkeypatch):
    """``fn()`` with the rows split over ``threads``: torch's OpenMP team inside C, or the Python pool."""
    monkeypatch.setattr(library, "_use_openmp", openmp and library._use_openmp)
    monkeypatch.setattr(plan, "_threads", lambda *a: threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("openmp", [True, False])
@pytest.mark.parametrize("kind", ["int4", "int8", "bitmask", "2:4"])
@pytest.mark.parametrize("rows", [4096, 4100])
def test_two_threads_give_the_same_result(monkeypatch, openmp, kind, rows):
    if kind in ("int4", "int8"):
        fmt, tensors = _layer(rows, 576, 64, bits=8 if kind == "int8" else 4)
    else:
        fmt, tensors = _bitmask_layer(rows, 576, 64, sparsity="bitmask" if kind == "bitmask" else kind)
    x = torch.randn(4, 576)
    run = (lambda: cpu.int_linear(x, fmt, tensors, None)) if fmt.kind == "int" else \
        (lambda: cpu.bitmask_int4_linear(x, fmt, tensors, None))
    one = _run_with_threads(run, 1, openmp, monkeypatch)
    assert torch.equal(_run_with_threads(run, 2, openmp, monkeypatch), one)


def test_the_kernels_share_torchs_openmp_runtime():
    # In a fresh process: other packages imported by other tests (scikit-learn through lm-eval) bring their own
    # libgomp, which says nothing about ours.
    library.load()
    if not library._use_openmp:
        pytest.skip("the CPU kernels were built without OpenMP here")
    code = (
        "import torch\n"
        "from hf_compress_prompt.kernels.cpu import library\n"
        "library.load()\n"
        "assert library._use_openmp\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(sorted({line.split()[-1] for line in maps.splitlines() if 'libgomp' in line}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    runtimes = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert len(runtimes) == 1, runtimes  # one OpenMP runtime in the process: torch's


def test_weights_prepared_once_and_refreshed_when_changed():
    fmt, tensors = _layer(64, 128, 64)
    x = torch.randn(1, 128)
    before = cpu.int_linear(x, fmt, tensors, None)
    layer = cpu.prepare(fmt, tensors)  # built by the call above: the same object comes back
    assert layer is not None and cpu.prepare(fmt, tensors) is layer
    tensors["weight_scale"].mul_(2)  # in-place change bumps the version: re-prepared
    torch.testing.assert_close(cpu.int_linear(x, fmt, tensors, None), before * 2, rtol=1e-5, atol=1e-5)


def test_ops_route_through_the_kernel_and_status_says_so():
    from hf_compress_prompt.nn import packed_linear_from

    fmt, tensors = _layer(64, 128, 64)
    module = packed_linear_from(fmt, tensors)
    x = torch.randn(2, 128)
    with reference_only():
        exact = module(x)
    approx = module(x)
    assert not torch.equal(approx, exact) and _rel_err(approx, exact) <= 1e-2  # activations were quantized
    assert "int4" in status()["ops"]["int_linear"]["cpu"] and "bitmask" in status()["ops"]["bitmask_linear"]["cpu"]
    model = torch.nn.Sequential(module)
    assert layer_status(model) == {"0": cpu.kernel_name()}
    fmt32, tensors32 = _layer(64, 128, 32)
    assert layer_status(torch.nn.Sequential(packed_linear_from(fmt32, tensors32)))["0"].startswith("reference:")


@pytest.mark.parametrize("sparsity", ["bitmask", "2:4"])
@pytest.mark.parametrize("shape", [(576, 576, 64), (1536, 576, 64), (3, 128, 64)])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("simd", [True, False])
def test_sparse_bf16_values_match_reference(sparsity, shape, tokens, simd, monkeypatch):
    from hf_compress_prompt.methods.masks import layer_prune_mask, nm_prune_mask

    monkeypatch.setattr(library, "_use_bf16", simd and library._use_bf16)
    out, inp, _ = shape
    torch.manual_seed(0)
    W = torch.randn(out, inp).bfloat16()
    pruned = layer_prune_mask(W.float().abs(), 0.5) if sparsity == "bitmask" else nm_prune_mask(W.float().abs(), 2, 4)
    W = W.masked_fill(pruned, 0)
    fmt = LinearFormat(inp, out, sparsity=sparsity, nnz=int((~pruned).sum()) if sparsity == "bitmask" else None)
    tensors = pack_linear(fmt, W, pruned=pruned)
    x = torch.randn(tokens, inp).bfloat16()
    ref = reference_linear(x.float(), fmt, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, None)
    y = cpu.sparse_linear(x, fmt, tensors, None)
    assert y.dtype == torch.bfloat16 and _rel_err(y, ref) <= 1e-2


def test_cache_bytes_counts_copies_not_views():
    groups = 128 // 64
    fmt, tensors = _layer(64, 128, 64, bits=8)
    before = cpu.cache_bytes()
    cpu.int_linear(torch.randn(1, 128), fmt, tensors, None)
    assert cpu.cache_bytes() - before == 2 * 64 * groups * 4  # fp32 scale and scale*zero; the int8 codes are a view
    fmt, tensors = _layer(64, 128, 64)
    before = cpu.cache_bytes()
    cpu.int_linear(torch.randn(1, 128), fmt, tensors, None)
    assert cpu.cache_bytes() - before == 64 * 128 // 2 + 64 * groups * (4 + 1)  # int4 tiles: a copy of the codes


# ----- the cached library is verified before it is loaded ------------------------------------------------------------
_SYMBOLS = ("hcp_quantize_activations", "hcp_int8_gemm", "hcp_tiled_int4_gemm", "hcp_prepare_activations",
            "hcp_finish_output", "hcp_plan_linear", "hcp_has_vnni", "hcp_has_tiled", "hcp_sparse_bf16_gemm",
            "hcp_has_bf16", "hcp_has_openmp")  # what linear.c and tiled.c export


def test_the_loader_binds_every_exported_symbol():
    assert set(library._SIGNATURES) == set(_SYMBOLS)


def _stub_source(folder, missing=(), constructor_marker=None):
    """A C file defining every symbol the loader binds (as no-ops) except ``missing``; with ``constructor_marker``,
    a constructor that writes that file when the library is loaded (what a swapped library could do)."""
    lines = [f"int {name}(void) {{ return 0; }}" for name in _SYMBOLS if name not in missing]
    if constructor_marker is not None:
        lines = ["#include <stdio.h>",
                 f'__attribute__((constructor)) static void ran(void) {{ fclose(fopen("{constructor_marker}", "w")); }}',
                 *lines]
    path = folder / f"stub{len(list(folder.glob('stub*.c')))}.c"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def fresh_loader(tmp_path, monkeypatch):
    """The CPU loader as in a new process, with its cache in ``tmp_path / "cache"``; ``use(**stub)`` builds from a
    stub source (fast) and forgets what was loaded. Everything is restored afterwards, so later tests see the real
    kernels again."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(cpu.CACHE_ENV, str(cache))
    monkeypatch.delenv("HF_COMPRESS_PROMPT_KERNELS", raising=False)
    state = ("_lib", "_reason", "_private_dir", "_cache_reason", "_rebuild_reason")
    for name in state:
        monkeypatch.setattr(library, name, None)
    for name in ("_use_vnni", "_use_tiled", "_use_bf16", "_use_openmp", "_SOURCES"):
        monkeypatch.setattr(library, name, getattr(library, name))
    monkeypatch.setattr(plan, "_prepared", {})
    sources = tmp_path / "src"
    sources.mkdir()

    def use(**stub):
        library._SOURCES = [_stub_source(sources, **stub)]
        for name in state:
            setattr(library, name, None)

    return cache, use


def _swap(path, data: bytes):
    """Replaces a file by a new one (a new inode, as a swapped file would be)."""
    import os

    tmp = path.with_name(path.name + ".swap")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_a_swapped_library_fails_its_digest_and_is_rebuilt_unrun(fresh_loader, tmp_path):
    import hashlib
    import json

    _, use = fresh_loader
    use()
    built = cpu.build()  # built (with its manifest), not loaded
    sources = library._SOURCES
    manifest = json.loads(built.with_suffix(".json").read_text())
    assert manifest["sha256"] == hashlib.sha256(built.read_bytes()).hexdigest() and manifest["flags"]
    assert manifest["source_sha256"] == hashlib.sha256(sources[0].read_bytes()).hexdigest()
    # someone swaps in another library whose constructor runs on load
    marker = tmp_path / "constructor-ran"
    use(constructor_marker=marker)
    evil = tmp_path / "evil.so"
    subprocess.run([library._compiler(), *library._FLAGS, "-o", str(evil), str(library._SOURCES[0])], check=True)
    _swap(built, evil.read_bytes())
    use()
    library._SOURCES = sources  # the original sources, in a new process
    assert cpu.available()
    assert not marker.exists()  # the swapped library was never loaded
    note = cpu.cache_note()
    assert note is not None and str(built) in note and "sha256" in note and "rebuilt" in note
    assert hashlib.sha256(built.read_bytes()).hexdigest() == json.loads(built.with_suffix(".json").read_text())["sha256"]
    assert "rebuilt" in status()["ops"]["int_linear"]["cpu"]


def test_a_library_missing_a_symbol_falls_back_to_the_reference(fresh_loader):
    from hf_compress_prompt.nn import packed_linear_from

    _, use = fresh_loader
    use(missing=("hcp_tiled_int4_gemm",))
    assert not cpu.available()
    assert "lacks symbol hcp_tiled_int4_gemm" in cpu.unavailable_reason()
    assert "hcp_tiled_int4_gemm" in status()["ops"]["int_linear"]["cpu"]
    fmt, tensors = _layer(64, 128, 64)
    x = torch.randn(3, 128)
    torch.testing.assert_close(cpu.int_linear(x, fmt, tensors, None), reference_linear(x, fmt, tensors, None),
                               rtol=0, atol=0)
    module = packed_linear_from(fmt, tensors)
    with reference_only():
        exact = module(x)
    torch.testing.assert_close(module(x), exact, rtol=0, atol=0)  # the op runs the reference, not a dead kernel
    assert layer_status(torch.nn.Sequential(module))["0"].startswith("reference: ")


def test_a_library_that_does_not_load_falls_back_with_the_reason(fresh_loader):
    import hashlib
    import json

    _, use = fresh_loader
    use()
    built = cpu.build()
    _swap(built, b"not a shared library")  # with a manifest that vouches for it: the digest passes, dlopen fails
    manifest = built.with_suffix(".json")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()),
                                    "sha256": hashlib.sha256(built.read_bytes()).hexdigest()}))
    assert not cpu.available()
    assert f"the CPU kernel library {built} could not be loaded" in cpu.unavailable_reason()
    assert "could not be loaded" in status()["ops"]["bitmask_linear"]["cpu"]


@pytest.mark.parametrize("damage", ["world-writable", "group-writable", "another owner"])
def test_an_unsafe_cache_folder_is_refused_for_a_private_one(fresh_loader, monkeypatch, damage):
    import os
    import stat

    cache, use = fresh_loader
    cache.mkdir()
    if damage == "another owner":  # the folder's stat says another uid
        real_stat = os.stat

        def stat_of(path, *args, **kwargs):
            st = real_stat(path, *args, **kwargs)
            if os.fspath(path) != str(cache):
                return st
            return os.stat_result((*st[:4], st.st_uid + 1, *st[5:10]))

        monkeypatch.setattr(os, "stat", stat_of)
    else:
        cache.chmod(0o777 if damage == "world-writable" else 0o770)
    use()
    assert cpu.available()
    assert not list(cache.rglob("*.so"))  # nothing built (or loaded) where others can write
    note = cpu.cache_note()
    why = {"world-writable": "writable by others", "group-writable": "writable by its group",
           "another owner": "not by this user"}[damage]
    assert note is not None and str(cache) in note and why in note and "private folder" in note
    private = library._private_dir
    assert private is not None and stat.S_IMODE(private.stat().st_mode) == 0o700 and list(private.rglob("*.so"))
    assert "private folder" in status()["ops"]["nm_linear"]["cpu"]
