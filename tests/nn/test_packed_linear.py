import pytest
import torch

from hf_compress_prompt.formats import LinearFormat
from hf_compress_prompt.methods.rtn import rtn_quantize
from hf_compress_prompt.nn import QuantLinear, pack_module, packed_linear_from


def _quant_linear(bias=True):
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    qw = rtn_quantize(W, 4, 32, False)
    fmt = LinearFormat(64, 32, bias=bias, bits=4, group_size=32)
    return pack_module(fmt, W, torch.randn(32) if bias else None, codes=qw.codes, scale=qw.scale, zero=qw.zero), qw


def test_holds_buffers_not_trainable_parameters():
    module, _ = _quant_linear()
    assert isinstance(module, QuantLinear)
    assert [n for n, p in module.named_parameters() if p.requires_grad] == []
    assert {n for n, _ in module.named_buffers()} == {"weight", "weight_scale", "weight_zero"}
    assert module.weight.dtype == torch.int32


def test_to_linear_is_equivalent():
    module, qw = _quant_linear()
    linear = module.to_linear()
    assert torch.equal(linear.weight, qw.dequantize())
    x = torch.randn(4, 64)
    torch.testing.assert_close(linear(x), module(x))


def test_nbytes_counts_every_tensor():
    module, _ = _quant_linear()
    assert module.nbytes == module.fmt.nbytes(torch.float32)
    assert module.nbytes < 32 * 64 * 4 * 0.2


def test_float_cast_keeps_codes():
    module, _ = _quant_linear()
    module.half()
    assert module.weight.dtype == torch.int32 and module.weight_scale.dtype == torch.float16
    assert module(torch.randn(2, 64, dtype=torch.float16)).dtype == torch.float16


def test_packed_linear_from_checks_shapes():
    module, _ = _quant_linear(bias=False)
    tensors = dict(module.stored_tensors())
    tensors["weight_scale"] = tensors["weight_scale"][:, :1]
    with pytest.raises(ValueError, match="weight_scale"):
        packed_linear_from(module.fmt, tensors)


def test_stored_tensors_follow_buffer_replacement():
    module, _ = _quant_linear()
    first = module.stored_tensors()
    module.half()
    assert module.stored_tensors()["weight_scale"].dtype == torch.float16
    module._buffers["weight"] = module.weight.clone()  # as a loader assigning tensors might
    assert module.stored_tensors()["weight"] is module._buffers["weight"] and first is not module.stored_tensors()
