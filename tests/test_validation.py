"""One source of validation: bits, group sizes and sparsity patterns give the same answer wherever they are given."""

import pytest

from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.validation import (
    SparsityPattern,
    check_bits,
    parse_sparsity,
    resolve_group_size,
    valid_group_sizes,
)


def test_group_sizes_that_fit_smollm2_include_192():
    # SmolLM2-135M: hidden 576, FFN 1536 (gcd 192)
    assert valid_group_sizes([576, 1536, 576]) == [16, 32, 48, 64, 96, 192, -1]
    assert valid_group_sizes([18]) == [-1]


def test_a_group_size_that_does_not_divide_names_every_size_that_fits_the_model():
    with pytest.raises(UserInputError) as info:
        resolve_group_size(128, 576, widths=[576, 1536])
    message = str(info.value)
    assert message.startswith("group_size=128 does not divide in_features=576; use one of 16, 32, 48, 64, 96, 192, -1")
    assert "576, 1536" in message and "\n" not in message
    assert resolve_group_size(192, 1536, widths=[576, 1536]) == 192
    assert resolve_group_size(-1, 576) == 576


@pytest.mark.parametrize("value", [0, -2, 1.5, "64", True, None])
def test_bad_group_size_values(value):
    with pytest.raises(UserInputError, match="must be a positive integer or -1"):
        resolve_group_size(value, 576)


@pytest.mark.parametrize("bits", [1, 5, 16, 4.0, "4", True, None])
def test_unsupported_bits(bits):
    with pytest.raises(UserInputError, match=r"is not supported; use one of 2, 3, 4, 8"):
        check_bits(bits)


def test_bits_may_be_none_where_allowed():
    check_bits(None, allow_none=True)
    with pytest.raises(UserInputError, match="lm_head_bits=5"):
        check_bits(5, name="lm_head_bits", allow_none=True)


@pytest.mark.parametrize("value, expected", [
    (0.5, SparsityPattern(0.5)), ("0.5", SparsityPattern(0.5)), ("2:4", SparsityPattern(0.5, 2, 4)),
    ("4:8", SparsityPattern(0.5, 4, 8)),
])
def test_sparsity_is_parsed_once(value, expected):
    pattern = parse_sparsity(value)
    assert pattern == expected and parse_sparsity(pattern) is pattern
    assert pattern.value == (value if isinstance(value, str) and ":" in value else 0.5)


def test_sparsity_errors_name_what_the_user_typed():
    with pytest.raises(UserInputError, match=r"^--sparsity 'half' is neither a fraction nor N:M"):
        parse_sparsity("half", label="--sparsity 'half'")
    with pytest.raises(UserInputError, match=r"^sparsity=True is neither"):
        parse_sparsity(True)


def test_the_format_schema_uses_the_same_checks():
    from hf_compress_prompt.formats.schema import LinearFormat

    with pytest.raises(UserInputError, match=r"layer format 8x576: group_size=100 does not divide in_features=576; "
                                             r"use one of 16, 32, 48, 64, 96, 144, 192, 288, 576, -1"):
        LinearFormat(576, 8, bits=4, group_size=100)
    with pytest.raises(UserInputError, match=r"layer format 8x576: bits=5 is not supported; use one of 2, 3, 4, 8"):
        LinearFormat(576, 8, bits=5)
    with pytest.raises(UserInputError, match=r"sparsity='3:2' needs 0 < N < M"):
        LinearFormat(576, 8, sparsity="3:2")
    with pytest.raises(UserInputError, match=r"sparsity='half' is not 'N:M'"):
        LinearFormat(576, 8, sparsity="half")
