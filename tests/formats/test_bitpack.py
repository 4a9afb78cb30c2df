import pytest
import torch

from hf_compress_prompt.formats.bitpack import as_words, from_words, pack_bits, packed_bytes, unpack_bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 31, 96, 130])
def test_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (3, n), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (3, packed_bytes(n, bits)) and packed.shape[-1] % 4 == 0
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    assert torch.equal(from_words(as_words(packed)), packed)


def _stream_oracle(codes: list[int], bits: int) -> list[int]:
    """Bytes of a little-endian bit stream built one integer at a time."""
    value = sum(c << (i * bits) for i, c in enumerate(codes))
    nbytes = packed_bytes(len(codes), bits)
    return [(value >> (8 * k)) & 0xFF for k in range(nbytes)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_is_a_little_endian_bit_stream(bits):
    codes = torch.randint(0, 2**bits, (40,), dtype=torch.uint8)
    assert pack_bits(codes, bits).tolist() == _stream_oracle(codes.tolist(), bits)


def test_known_bytes():
    # codes 1, 2, 3 at 4 bits: low nibble first
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 4).tolist()[:2] == [0x21, 0x03]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("slice_codes", [1, 7, 64])
def test_packing_a_slice_of_rows_at_a_time_gives_the_same_bytes(bits, slice_codes, monkeypatch):
    from hf_compress_prompt.formats import bitpack

    codes = torch.randint(0, 2**bits, (3, 5, 13), generator=torch.Generator().manual_seed(bits))
    whole = pack_bits(codes, bits)
    monkeypatch.setattr(bitpack, "_SLICE_CODES", slice_codes)  # 1 and 7: a row per slice; 64: four rows
    assert torch.equal(pack_bits(codes, bits), whole)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, 13), codes.to(torch.uint8))
