import pytest
import torch

from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.formats import LinearFormat, pack_linear, unpack_linear
from hf_compress_prompt.methods.masks import layer_prune_mask, nm_prune_mask
from hf_compress_prompt.methods.rtn import rtn_quantize

OUT, IN = 48, 128
# (bits, group_size, sparsity)
CASES = [
    (4, 32, None), (4, -1, None), (3, 64, None), (2, 32, None), (8, 128, None),
    (None, -1, "2:4"), (None, -1, "4:8"), (None, -1, "bitmask"),
    (4, 32, "2:4"), (4, 64, "2:4"), (4, 64, "bitmask"), (3, 32, "bitmask"),
]


def _parts(bits, group_size, sparsity, seed=0):
    torch.manual_seed(seed)
    W = torch.randn(OUT, IN)
    pruned = None
    if sparsity == "bitmask":
        pruned = layer_prune_mask(W.abs(), 0.5)
    elif sparsity is not None:
        n, m = map(int, sparsity.split(":"))
        pruned = nm_prune_mask(W.abs(), n, m)
    if pruned is not None:
        W = W.masked_fill(pruned, 0)
    parts = {"pruned": pruned}
    expected = W
    if bits:
        qw = rtn_quantize(W, bits, group_size, False)
        parts.update(codes=qw.codes, scale=qw.scale, zero=qw.zero)
        expected = qw.dequantize()
        if pruned is not None:
            expected = expected.masked_fill(pruned, 0)
    fmt = LinearFormat(IN, OUT, bits=bits, group_size=group_size, sparsity=sparsity,
                       nnz=int((~pruned).sum()) if sparsity == "bitmask" else None)
    return fmt, W, parts, expected


@pytest.mark.parametrize("bits,group_size,sparsity", CASES)
def test_pack_unpack_reproduces_the_weight(bits, group_size, sparsity):
    fmt, W, parts, expected = _parts(bits, group_size, sparsity)
    tensors = pack_linear(fmt, W, **parts)
    specs = fmt.tensor_specs()
    assert set(tensors) == set(specs)
    for name, t in tensors.items():
        assert tuple(t.shape) == specs[name].shape, name
    assert torch.equal(unpack_linear(fmt, tensors, dtype=torch.float32), expected)


@pytest.mark.parametrize("bits,group_size,sparsity", CASES)
def test_payload_never_has_the_dense_shape(bits, group_size, sparsity):
    # transformers without this package must hit a size mismatch, never load codes as weights
    fmt, *_ = _parts(bits, group_size, sparsity)
    assert fmt.tensor_specs()["weight"].shape != (OUT, IN)


def test_stored_bytes_shrink_as_promised():
    dense_fp16 = OUT * IN * 2
    ratio = {case: _parts(*case)[0].nbytes(torch.float16) / dense_fp16 for case in CASES}
    assert ratio[(4, 32, None)] < 0.30 and ratio[(3, 64, None)] < 0.23
    assert ratio[(4, 64, "bitmask")] < 0.22 and ratio[(4, 64, "2:4")] < 0.22


def test_nm_pack_rejects_a_weight_that_is_not_nm():
    fmt, W, parts, _ = _parts(None, -1, "2:4")
    parts["pruned"][:, :4] = False  # a run keeping 4 of 4
    with pytest.raises(UserInputError, match="not 2:4 sparse"):
        pack_linear(fmt, W, **parts)


def test_bitmask_count_must_match():
    fmt, W, parts, _ = _parts(None, -1, "bitmask")
    parts["pruned"][0, 0] = ~parts["pruned"][0, 0]
    with pytest.raises(UserInputError, match="nnz"):
        pack_linear(fmt, W, **parts)


def test_explicit_group_index():
    torch.manual_seed(1)
    g_idx = torch.randint(0, 4, (IN,))
    codes = torch.randint(0, 16, (OUT, IN), dtype=torch.uint8)
    scale, zero = torch.rand(OUT, 4) + 0.1, torch.randint(0, 16, (OUT, 4)).float()
    fmt = LinearFormat(IN, OUT, bits=4, group_size=32, g_idx=True)
    tensors = pack_linear(fmt, torch.empty(OUT, IN), codes=codes, scale=scale, zero=zero, g_idx=g_idx)
    expected = scale[:, g_idx] * (codes.float() - zero[:, g_idx])
    assert torch.equal(unpack_linear(fmt, tensors, dtype=torch.float32), expected)


@pytest.mark.parametrize("bad", [
    dict(bits=5), dict(bits=4, group_size=48), dict(sparsity="2:3"), dict(sparsity="bitmask"), dict(),
    dict(sparsity="3:2"),
])
def test_bad_formats_are_rejected(bad):
    with pytest.raises(UserInputError):
        LinearFormat(IN, OUT, **bad)


def test_format_round_trips_through_json():
    fmt = LinearFormat(IN, OUT, bias=True, bits=4, group_size=32, sparsity="bitmask", nnz=100, act_order=True)
    assert LinearFormat.from_dict(fmt.to_dict()) == fmt
    with pytest.raises(UserInputError, match="unknown layer format keys"):
        LinearFormat.from_dict({**fmt.to_dict(), "colour": "red"})


@pytest.mark.parametrize("field, value, message", [
    ("bits", "4", r"bits='4' is a str, not an integer \(or null\); write it as a number \(4, not \"4\"\)"),
    ("bits", 4.0, r"bits=4\.0 is a float, not an integer"),
    ("bits", True, r"bits=True is a bool, not an integer"),
    ("group_size", "32", r"group_size='32' is a str, not an integer"),
    ("in_features", "128", r"in_features='128' is a str"),
    ("nnz", "10", r"nnz='10' is a str"),
    ("sparsity", 0.5, r"sparsity=0\.5 is a float, not a string"),
    ("symmetric", "true", r"symmetric='true' is a str, not true or false"),
])
def test_mistyped_fields_are_named_as_such(field, value, message):
    """A format read from an edited config.json: the wrong type is the error, not a comparison of values."""
    spec = {"in_features": IN, "out_features": OUT, "bits": 4, "group_size": 32, **{field: value}}
    if field == "nnz":
        spec.update(sparsity="bitmask")
    with pytest.raises(UserInputError, match=message):
        LinearFormat.from_dict(spec)


def test_integer_like_sizes_are_accepted():
    import numpy as np

    fmt = LinearFormat(np.int64(IN), OUT, bits=4, group_size=32)
    assert fmt.groups == IN // 32
