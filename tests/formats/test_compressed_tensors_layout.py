"""The compressed-tensors ``pack-quantized`` layout, layer by layer, checked against the compressed-tensors library
itself: its pydantic models accept what we write, its decompressor gives exactly our dequantized weight, and what its
own compressor writes reads back into our format exactly."""

import pytest
import torch

from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.formats import LinearFormat, pack_linear, unpack_linear
from hf_compress_prompt.formats.compressed_tensors import (
    ct_quantization_config,
    ct_weight_args,
    export_refusal,
    read_ct_layer,
    write_ct_layer,
)
from hf_compress_prompt.methods.rtn import rtn_quantize

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install compressed-tensors)")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

CASES = {  # name -> (bits, group_size, symmetric, sparsity, scale dtype)
    "w4 g32 asym": (4, 32, False, None, torch.float32),
    "w4 g32 sym bf16": (4, 32, True, None, torch.bfloat16),
    "w4 per-channel fp16": (4, -1, False, None, torch.float16),
    "w3 g32 asym": (3, 32, False, None, torch.float32),
    "w2 g64 asym": (2, 64, False, None, torch.bfloat16),
    "w8 per-channel sym": (8, -1, True, None, torch.float32),
    "w8 g64 asym": (8, 64, False, None, torch.float32),
    "2:4 + w4 g32": (4, 32, False, "2:4", torch.float32),
    "bitmask + w4 g32 sym": (4, 32, True, "bitmask", torch.bfloat16),
}
OUT, IN = 72, 128  # 72 rows: 3-bit zero points straddle words along the output dimension too


def _layer(bits, group_size, symmetric, sparsity, dtype):
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN)
    pruned = None
    if sparsity == "2:4":
        runs = weight.abs().reshape(OUT, -1, 4)
        pruned = torch.ones_like(runs, dtype=torch.bool).scatter_(-1, runs.topk(2, dim=-1).indices, False).reshape(OUT, IN)
    elif sparsity == "bitmask":
        pruned = weight.abs() < weight.abs().median()
    if pruned is not None:
        weight = weight.masked_fill(pruned, 0)
    q = rtn_quantize(weight, bits, group_size, symmetric)
    fmt = LinearFormat(IN, OUT, bits=bits, group_size=group_size, symmetric=symmetric, sparsity=sparsity,
                       nnz=int((~pruned).sum()) if sparsity == "bitmask" else None)
    tensors = pack_linear(fmt, weight, codes=q.codes, scale=q.scale, zero=q.zero, pruned=pruned, float_dtype=dtype)
    return fmt, tensors


def _scheme(args: dict) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs.model_validate(args), format="pack-quantized")


@pytest.mark.parametrize("case", sorted(CASES))
def test_compressed_tensors_decompresses_exactly_our_weight(case):
    _, _, symmetric, sparsity, dtype = CASES[case]
    fmt, tensors = _layer(*CASES[case])
    written, mask = write_ct_layer(fmt, tensors, symmetric)
    assert ("weight_zero_point" in written) is not symmetric
    assert (mask is not None) is (sparsity is not None)
    args = ct_weight_args(fmt, symmetric)
    decompressed = PackedQuantizationCompressor.decompress(dict(written), _scheme(args))["weight"]
    ours = unpack_linear(fmt, tensors)
    assert decompressed.dtype == ours.dtype == dtype
    assert torch.equal(decompressed, ours)  # bit for bit: a pruned weight decompresses to exactly 0
    if sparsity is not None:
        assert bool((decompressed[unpack_linear(fmt, tensors) == 0] == 0).all())


@pytest.mark.parametrize("case", sorted(CASES))
def test_written_layer_reads_back_into_the_same_format(case):
    _, _, symmetric, sparsity, _ = CASES[case]
    fmt, tensors = _layer(*CASES[case])
    written, mask = write_ct_layer(fmt, tensors, symmetric)
    back_fmt, back = read_ct_layer(ct_weight_args(fmt, symmetric), written, IN, OUT, sparsity=sparsity, mask=mask)
    assert back_fmt == fmt
    assert sorted(back) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, -1), (3, 64)])
def test_what_compressed_tensors_writes_reads_back_exactly(bits, group_size, symmetric):
    """Their compressor's own output (quantize + pack with their code) -> our format -> the weight they decompress."""
    torch.manual_seed(1)
    weight = torch.randn(OUT, IN, dtype=torch.bfloat16)
    q = rtn_quantize(weight.float(), bits, group_size, symmetric)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, group_size=None if group_size == -1 else group_size,
                            strategy="channel" if group_size == -1 else "group")
    state = {"weight": weight, "weight_scale": q.scale.reshape(OUT, -1).to(torch.bfloat16)}
    if not symmetric:
        state["weight_zero_point"] = (q.zero.reshape(OUT, -1) - 2 ** (bits - 1)).to(torch.int8)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    written = PackedQuantizationCompressor.compress(state, scheme)
    expected = PackedQuantizationCompressor.decompress(dict(written), scheme)["weight"]
    fmt, stored = read_ct_layer(args.model_dump(), written, IN, OUT)
    assert (fmt.bits, fmt.group_size, fmt.symmetric) == (bits, group_size, symmetric)
    assert torch.equal(unpack_linear(fmt, stored), expected)


def test_config_passes_compressed_tensors_own_validation():
    fmt_a, _ = _layer(*CASES["w4 g32 asym"])
    fmt_b = LinearFormat(IN, OUT, bits=8, group_size=-1, symmetric=True, act_order=True)
    quant = ct_quantization_config([(ct_weight_args(fmt_a, False), ["model.layers.0.mlp.up_proj"]),
                                    (ct_weight_args(fmt_b, True), ["Linear"])], ["lm_head"], "0.20.1")
    parsed = QuantizationConfig.model_validate(quant)
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    assert parsed.config_groups["group_1"].weights.actorder == "weight"
    assert parsed.config_groups["group_0"].weights.strategy == "group"
    assert parsed.config_groups["group_1"].weights.strategy == "channel"
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="sparsity"):  # their models forbid extra keys: ours must not go there
        QuantizationArgs.model_validate({**ct_weight_args(fmt_a, False), "sparsity": "2:4"})


def test_layers_the_format_cannot_express_are_refused():
    float_sparse = LinearFormat(IN, OUT, sparsity="2:4")
    assert "float values" in export_refusal(float_sparse)
    with_g_idx = LinearFormat(IN, OUT, bits=4, group_size=32, g_idx=True)
    assert "group index" in export_refusal(with_g_idx, torch.zeros(OUT, 4, dtype=torch.uint8))
    fmt, tensors = _layer(*CASES["w4 g32 asym"])
    with pytest.raises(UserInputError, match="symmetric export needs every zero point"):
        write_ct_layer(fmt, tensors, symmetric=True)


def test_reading_names_what_does_not_fit():
    fmt, tensors = _layer(*CASES["w4 g32 asym"])
    written, _ = write_ct_layer(fmt, tensors, False)
    args = ct_weight_args(fmt, False)
    with pytest.raises(UserInputError, match="weight_packed is"):
        read_ct_layer(args, written, IN + 32, OUT)
    with pytest.raises(UserInputError, match="needs weight_zero_point"):
        read_ct_layer(args, {k: v for k, v in written.items() if k != "weight_zero_point"}, IN, OUT)
    with pytest.raises(UserInputError, match="num_bits=5"):
        read_ct_layer({**args, "num_bits": 5}, written, IN, OUT)
    with pytest.raises(UserInputError, match="without its mask"):
        read_ct_layer(args, written, IN, OUT, sparsity="2:4")
