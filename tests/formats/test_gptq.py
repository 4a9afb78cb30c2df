"""The GPTQ layout, checked against an independent integer-at-a-time writer of AutoGPTQ's packing."""

import pytest
import torch

from hf_compress_prompt.formats import gptq_tensor_shapes, read_gptq_layer, write_gptq_layer


def _autogptq_words(columns: list[list[int]], bits: int) -> list[list[int]]:
    """AutoGPTQ's qweight: for each column, codes of rows 0..n-1 as one big integer, cut into 32-bit words."""
    n = len(columns[0])
    words = n * bits // 32
    out = [[0] * len(columns) for _ in range(words)]
    for c, codes in enumerate(columns):
        value = sum(code << (i * bits) for i, code in enumerate(codes))
        for w in range(words):
            word = (value >> (32 * w)) & 0xFFFFFFFF
            out[w][c] = word - (1 << 32) if word >= 1 << 31 else word  # stored as int32
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qweight_matches_autogptq_packing(bits):
    in_f, out_f = 64, 32
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (out_f, in_f), dtype=torch.uint8)
    scale = torch.rand(out_f, 2) + 0.1
    zero = torch.randint(1, 2**bits, (out_f, 2)).float()
    g_idx = torch.arange(in_f) // 32
    t = write_gptq_layer(codes, scale, zero, g_idx, bits)
    assert {k: tuple(v.shape) for k, v in t.items()} == gptq_tensor_shapes(bits, in_f, out_f, 32)
    expected = _autogptq_words([codes[o].tolist() for o in range(out_f)], bits)
    assert t["qweight"].tolist() == expected
    # qzeros: v1 stores zero - 1, packed along the output dimension
    z_expected = _autogptq_words([(zero[:, g].long() - 1).tolist() for g in range(2)], bits)
    assert t["qzeros"].tolist() == [list(row) for row in zip(*z_expected)]


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_read_inverts_write(bits, checkpoint_format):
    in_f, out_f = 128, 64
    codes = torch.randint(0, 2**bits, (out_f, in_f), dtype=torch.uint8)
    scale = (torch.rand(out_f, 4) + 0.1).half().float()
    zero = torch.randint(1, 2**bits, (out_f, 4)).float()
    g_idx = torch.randperm(in_f) // 32
    t = write_gptq_layer(codes, scale, zero, g_idx, bits, checkpoint_format)
    c, s, z, g = read_gptq_layer(t, bits, in_f, out_f, 32, checkpoint_format)
    assert torch.equal(c, codes) and torch.equal(s.float(), scale) and torch.equal(z, zero) and torch.equal(g, g_idx)
