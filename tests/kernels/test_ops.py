"""The torch.library ops: reference numerics, schema/fake/autograd registration (opcheck), torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from hf_compress_prompt import kernels
from hf_compress_prompt.formats import LinearFormat
from hf_compress_prompt.methods.masks import layer_prune_mask, nm_prune_mask
from hf_compress_prompt.methods.rtn import rtn_quantize
from hf_compress_prompt.nn import pack_module

OUT, IN = 32, 64
CASES = [(4, 32, None), (3, -1, None), (None, -1, "2:4"), (4, 32, "2:4"), (None, -1, "bitmask"), (4, 16, "bitmask")]


def _module(bits, group_size, sparsity, bias=True):
    torch.manual_seed(0)
    W = torch.randn(OUT, IN)
    pruned = None
    if sparsity == "2:4":
        pruned = nm_prune_mask(W.abs(), 2, 4)
    elif sparsity == "bitmask":
        pruned = layer_prune_mask(W.abs(), 0.5)
    if pruned is not None:
        W = W.masked_fill(pruned, 0)
    parts = {"pruned": pruned}
    if bits:
        qw = rtn_quantize(W, bits, group_size, False)
        parts.update(codes=qw.codes, scale=qw.scale, zero=qw.zero)
    fmt = LinearFormat(IN, OUT, bias=bias, bits=bits, group_size=group_size, sparsity=sparsity,
                       nnz=int((~pruned).sum()) if sparsity == "bitmask" else None)
    b = torch.randn(OUT) if bias else None
    return pack_module(fmt, W, b, **parts)


def _op_and_args(module, x):
    f = module.fmt
    scale = getattr(module, "weight_scale", None)
    zero = getattr(module, "weight_zero", None)
    if f.kind == "int":
        return torch.ops.hf_compress_prompt.int_linear, (x, module.weight, scale, zero, None, module.bias, IN, f.bits, f.group_size)
    if f.kind == "nm":
        n, m = f.nm
        return torch.ops.hf_compress_prompt.nm_linear, (x, module.weight, module.weight_index, scale, zero, module.bias, IN, n, m, f.bits or 0, f.group_size)
    return torch.ops.hf_compress_prompt.bitmask_linear, (x, module.weight, module.weight_mask, scale, zero, module.bias, IN, f.nnz, f.bits or 0, f.group_size)


@pytest.mark.parametrize("case", CASES)
def test_forward_equals_dense_linear(case):
    module = _module(*case)
    x = torch.randn(2, 5, IN)
    expected = F.linear(x, module.dequantize_weight(torch.float32), module.bias)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_input_gradient_equals_dense_linear(case):
    module = _module(*case)
    x = torch.randn(3, IN, requires_grad=True)
    module(x).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, module.dequantize_weight(torch.float32), module.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    module = _module(*case)
    op, args = _op_and_args(module, torch.randn(4, IN, requires_grad=True))
    torch.library.opcheck(op, args)


def test_bias_gradient_when_trainable():
    module = _module(4, 32, None)
    module.bias.requires_grad_(True)
    module(torch.randn(3, IN)).sum().backward()
    torch.testing.assert_close(module.bias.grad, torch.full((OUT,), 3.0))


def test_compiles_with_fullgraph():
    module = _module(4, 32, "2:4")
    x = torch.randn(2, IN)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), module(x))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = _module(4, 32, "bitmask")
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = module(torch.empty(7, 3, IN))
    assert y.shape == (7, 3, OUT)


def test_registered_kernel_is_used_and_reported():
    calls = []

    def fake_kernel(x, fmt, tensors, bias):
        calls.append(fmt.kind)
        return kernels.reference_linear(x, fmt, tensors, bias)

    saved = dict(kernels.KERNELS["int_linear"])
    try:
        kernels.register_kernel("int_linear", "cpu", fake_kernel, "test kernel")
        _module(4, 32, None)(torch.randn(2, IN))
        assert calls == ["int"]
        assert kernels.status()["ops"]["int_linear"] == {"cpu": "test kernel"}
    finally:
        kernels.KERNELS["int_linear"].clear()
        kernels.KERNELS["int_linear"].update(saved)
    with pytest.raises(ValueError, match="unknown op"):
        kernels.register_kernel("fp8_linear", "cpu", fake_kernel, "x")
