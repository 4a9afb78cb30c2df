"""The Triton int4 kernel against the reference op, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1)
at small shapes; on a GPU machine the same kernel is what serves CUDA inputs.

The interpreter flag must be set before Triton is first imported, so each check runs in a fresh process."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

CHECK = textwrap.dedent('''
    import torch
    from hf_compress_prompt.formats import LinearFormat, pack_linear
    from hf_compress_prompt.kernels import triton as tk
    from hf_compress_prompt.kernels.reference import reference_linear
    from hf_compress_prompt.methods.rtn import rtn_quantize

    assert tk.unavailable_reason() is None, tk.unavailable_reason()
    torch.manual_seed(0)
    for out, inp, group_size, tokens in [(40, 64, 32, 3), (64, 96, -1, 17), (33, 128, 64, 1), (192, 576, 64, 2)]:
        W = torch.randn(out, inp)
        qw = rtn_quantize(W, 4, group_size, False)
        fmt = LinearFormat(inp, out, bits=4, group_size=group_size)
        tensors = pack_linear(fmt, W, codes=qw.codes, scale=qw.scale, zero=qw.zero)
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


SPARSE_CHECK = textwrap.dedent('''
    import torch
    from hf_compress_prompt.formats import LinearFormat, pack_linear
    from hf_compress_prompt.kernels import triton as tk
    from hf_compress_prompt.kernels.reference import reference_linear
    from hf_compress_prompt.methods.masks import layer_prune_mask, nm_prune_mask
    from hf_compress_prompt.methods.rtn import rtn_quantize
    torch.manual_seed(0)
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


def test_int4_matches_reference_in_the_interpreter():
    _interpret(CHECK)


def test_sparse_int4_matches_reference_in_the_interpreter():
    """2:4 + int4 and 50% bitmask + int4 from the stored layouts (kept codes only), odd row counts, per-channel."""
    _interpret(SPARSE_CHECK)


def test_reports_why_it_is_not_used_without_a_gpu(monkeypatch):
    import torch

    from hf_compress_prompt.formats import LinearFormat
    from hf_compress_prompt.kernels import triton as tk

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        assert "no CUDA device" in tk.unavailable_reason()
    assert tk.supports(LinearFormat(64, 8, bits=3)) is not None
    assert tk.supports(LinearFormat(64, 8, bits=4, sparsity="2:4")) is None
    assert tk.supports(LinearFormat(64, 8, bits=None, sparsity="2:4")) is not None  # float values: not these kernels
