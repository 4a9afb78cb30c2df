"""The Triton int4 kernels against the reference op, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1)
at small shapes; on a GPU machine the same kernels are what serve CUDA inputs.

Every check makes the module's own fallback raise, so a format the kernels wrongly refuse (a broken ``supports()``)
or a dispatch that quietly runs the reference fails instead of comparing the reference with itself.

The interpreter flag must be set before Triton is first imported, so each interpreter check runs in a fresh
process."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from hf_compress_prompt.formats import LinearFormat, pack_linear
from hf_compress_prompt.kernels import triton as tk
from hf_compress_prompt.methods.masks import layer_prune_mask, nm_prune_mask
from hf_compress_prompt.methods.rtn import rtn_quantize

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _no_fallback(*args, **kwargs):
    raise AssertionError("the Triton path fell back to the reference op")


PRELUDE = textwrap.dedent('''
    import torch
    from hf_compress_prompt.formats import LinearFormat, pack_linear
    from hf_compress_prompt.kernels import triton as tk
    from hf_compress_prompt.kernels.reference import reference_linear
    from hf_compress_prompt.methods.masks import layer_prune_mask, nm_prune_mask
    from hf_compress_prompt.methods.rtn import rtn_quantize

    def _no_fallback(*args, **kwargs):
        raise AssertionError("the Triton path fell back to the reference op")

    tk.reference_linear = _no_fallback  # every case below must run a Triton kernel (the oracle is imported above)
    assert tk.unavailable_reason() is None, tk.unavailable_reason()
    torch.manual_seed(0)
''')

CHECK = PRELUDE + textwrap.dedent('''
    for out, inp, group_size, tokens in [(40, 64, 32, 3), (64, 96, -1, 17), (33, 128, 64, 1), (192, 576, 64, 2)]:
        W = torch.randn(out, inp)
        qw = rtn_quantize(W, 4, group_size, False)
        fmt = LinearFormat(inp, out, bits=4, group_size=group_size)
        tensors = pack_linear(fmt, W, codes=qw.codes, scale=qw.scale, zero=qw.zero)
        assert tk.supports(fmt) is None, tk.supports(fmt)
        x = torch.randn(tokens, inp).bfloat16()
        ref = reference_linear(x.float(), fmt, tensors, None)
        y = tk.int4_linear(x, fmt, tensors, None)
        err = float((y.float() - ref).abs().max() / ref.abs().max())
        assert y.dtype == torch.bfloat16 and err <= 1e-2, (out, inp, group_size, tokens, err)

    # an explicit group index (GPTQ act-order checkpoints) and a bias
    g_idx = torch.randint(0, 2, (64,))
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    scale, zero = torch.rand(32, 2) + 0.1, torch.randint(0, 16, (32, 2)).float()
    fmt = LinearFormat(64, 32, bits=4, group_size=32, g_idx=True)
    tensors = pack_linear(fmt, torch.empty(32, 64), codes=codes, scale=scale, zero=zero, g_idx=g_idx)
    bias, x = torch.randn(32), torch.randn(5, 64)
    torch.testing.assert_close(tk.int4_linear(x, fmt, tensors, bias), reference_linear(x, fmt, tensors, bias),
                               rtol=1e-4, atol=1e-4)
    print("ok")
''')


SPARSE_CHECK = PRELUDE + textwrap.dedent('''
    for sparsity in ["2:4", "bitmask"]:
        for out, inp, group_size, tokens in [(40, 64, 32, 3), (64, 96, -1, 17), (33, 128, 64, 1), (192, 576, 64, 2)]:
            W = torch.randn(out, inp)
            pruned = nm_prune_mask(W.abs(), 2, 4) if sparsity == "2:4" else layer_prune_mask(W.abs(), 0.5)
            W = W.masked_fill(pruned, 0)
            qw = rtn_quantize(W, 4, group_size, False)
            fmt = LinearFormat(inp, out, bits=4, group_size=group_size, sparsity=sparsity,
                               nnz=int((~pruned).sum()) if sparsity == "bitmask" else None)
            tensors = pack_linear(fmt, W, codes=qw.codes, scale=qw.scale, zero=qw.zero, pruned=pruned)
            assert tk.supports(fmt) is None, tk.supports(fmt)
            x = torch.randn(tokens, inp).bfloat16()
            ref = reference_linear(x.float(), fmt, tensors, None)
            y = tk.sparse_int4_linear(x, fmt, tensors, None)
            err = float((y.float() - ref).abs().max() / ref.abs().max())
            assert y.dtype == torch.bfloat16 and err <= 1e-2, (sparsity, out, inp, group_size, tokens, err)
    print("ok")
''')


def _interpret(code: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@needs_triton
def test_int4_matches_reference_in_the_interpreter():
    _interpret(CHECK)


@needs_triton
def test_sparse_int4_matches_reference_in_the_interpreter():
    """2:4 + int4 and 50% bitmask + int4 from the stored layouts (kept codes only), odd row counts, per-channel."""
    _interpret(SPARSE_CHECK)


def test_reports_why_it_is_not_used_without_a_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        assert ("no CUDA device" if importlib.util.find_spec("triton") else "not installed") in tk.unavailable_reason()
    assert tk.supports(LinearFormat(64, 8, bits=3)) is not None
    assert tk.supports(LinearFormat(64, 8, bits=4, sparsity="2:4")) is None
    assert tk.supports(LinearFormat(64, 8, bits=None, sparsity="2:4")) is not None  # float values: not these kernels


# ----- which kernel a layer reaches (no Triton needed: the jitted kernels are replaced by recording fakes) -----------
def _layer(out, inp, group_size, sparsity=None, bits=4):
    torch.manual_seed(0)
    W = torch.randn(out, inp)
    pruned = None
    if sparsity is not None:
        pruned = nm_prune_mask(W.abs(), 2, 4) if sparsity == "2:4" else layer_prune_mask(W.abs(), 0.5)
        W = W.masked_fill(pruned, 0)
    qw = rtn_quantize(W, bits, group_size, False)
    fmt = LinearFormat(inp, out, bits=bits, group_size=group_size, sparsity=sparsity,
                       nnz=int((~pruned).sum()) if sparsity == "bitmask" else None)
    return fmt, pack_linear(fmt, W, codes=qw.codes, scale=qw.scale, zero=qw.zero, pruned=pruned)


@pytest.fixture
def launched(monkeypatch):
    """Triton "available", its jitted kernels replaced by fakes that record their name, and the fallback raising:
    the list of kernels a call launched."""
    calls = []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):  # kernel[grid](*args): one launch
            return lambda *args, **kwargs: calls.append(self.name)

    fake = {"triton": SimpleNamespace(cdiv=lambda a, b: -(-a // b)),
            **{name: Kernel(name) for name in ("int4_matmul", "nm24_int4_matmul", "bitmask_int4_matmul")}}
    monkeypatch.setattr(tk, "unavailable_reason", lambda: None)
    monkeypatch.setattr(tk, "kernels", lambda interpret: fake)
    monkeypatch.setattr(tk, "reference_linear", _no_fallback)
    return calls


DISPATCH = [  # (layer, entry point, the kernel it must launch)
    ((40, 64, 32), tk.int4_linear, "int4_matmul"),
    ((64, 96, -1), tk.int4_linear, "int4_matmul"),
    ((33, 128, 64, "2:4"), tk.sparse_int4_linear, "nm24_int4_matmul"),
    ((33, 128, 64, "bitmask"), tk.sparse_int4_linear, "bitmask_int4_matmul"),
    ((64, 96, -1, "bitmask"), tk.sparse_int4_linear, "bitmask_int4_matmul"),
]


@pytest.mark.parametrize("layer, entry, kernel", DISPATCH)
def test_a_supported_layer_launches_its_triton_kernel(launched, layer, entry, kernel):
    fmt, tensors = _layer(*layer)
    y = entry(torch.randn(3, fmt.in_features), fmt, tensors, None)
    assert launched == [kernel] and y.shape == (3, fmt.out_features)


@pytest.mark.parametrize("layer, entry", [((40, 64, 32, None, 8), tk.int4_linear),  # int8: not these kernels
                                          ((40, 64, 32, "2:4"), tk.int4_linear),  # a sparse layer at the dense entry
                                          ((40, 64, 32), tk.sparse_int4_linear)])  # and the reverse
def test_an_unsupported_layer_runs_the_reference(launched, layer, entry):
    fmt, tensors = _layer(*layer)
    with pytest.raises(AssertionError, match="fell back to the reference"):
        entry(torch.randn(3, fmt.in_features), fmt, tensors, None)
    assert launched == []


# ----- on a GPU: the registered CUDA kernels serve the ops (skipped without one) -------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available() or not tk.available(), reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("sparsity, op", [(None, "int_linear"), ("2:4", "nm_linear"), ("bitmask", "bitmask_linear")])
def test_cuda_ops_run_the_triton_kernels(monkeypatch, sparsity, op):
    from hf_compress_prompt.kernels import KERNELS, reference_only
    from hf_compress_prompt.nn import packed_linear_from

    assert KERNELS[op]["cuda"][0] is (tk.int4_linear if sparsity is None else tk.sparse_int4_linear)
    fmt, tensors = _layer(192, 576, 64, sparsity)
    module = packed_linear_from(fmt, tensors).cuda()
    x = torch.randn(5, 576, device="cuda").bfloat16()
    with reference_only():
        exact = module(x).float()
    monkeypatch.setattr(tk, "reference_linear", _no_fallback)  # from here on a fallback fails the test
    y = module(x)
    assert y.device.type == "cuda" and float((y.float() - exact).abs().max() / exact.abs().max()) <= 1e-2
