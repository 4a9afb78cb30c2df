import pytest

from hf_compress_prompt.compressors import GPTQConfig, RTNConfig, SparseGPTConfig, compress_
from hf_compress_prompt.compressors.presets import get_preset, list_presets, preset_steps, register_preset
from hf_compress_prompt.errors import UserInputError


def test_the_names_the_results_use_are_presets():
    assert preset_steps("gptq-w4-g64") == [GPTQConfig(bits=4, group_size=64, act_order=True)]  # the default order
    assert preset_steps("gptq-w4-g64-noactorder") == [GPTQConfig(bits=4, group_size=64, act_order=False)]
    assert preset_steps("rtn-w4-g64") == [RTNConfig(bits=4, group_size=64)]
    assert preset_steps("sparsegpt-50%+w4-g64") == [SparseGPTConfig(sparsity=0.5, bits=4, group_size=64)]
    assert all(description for description in list_presets().values())


def test_a_preset_hands_out_copies():
    steps = preset_steps("gptq-w3-g64")
    steps[0].bits = 8
    assert preset_steps("gptq-w3-g64")[0].bits == 3 and get_preset("gptq-w3-g64").steps[0].bits == 3


def test_duplicates_and_unknown_names_fail_loudly():
    with pytest.raises(ValueError, match="'gptq-w4-g64' is already registered"):
        register_preset("gptq-w4-g64", [GPTQConfig()], "again")
    with pytest.raises(UserInputError, match=r"unknown preset 'gptq-w5'; choose one of rtn-w4-perchannel, .*gptq-w4-g64"):
        get_preset("gptq-w5")
    with pytest.raises(UserInputError, match="at least one step"):
        register_preset("empty", [], "nothing")


def test_compress_takes_a_preset_name(tiny_llama):
    result = compress_(tiny_llama, "rtn-w4-g64", pack=False, progress=False)
    assert result.recipe.steps == [RTNConfig(bits=4, group_size=64)]
    assert all(qw.bits == 4 and qw.group_size == 64 for qw in result.quantized.values())
    with pytest.raises(UserInputError, match="unknown preset 'rtn-w5'"):
        compress_(tiny_llama, "rtn-w5", progress=False)


def test_validate_for_lists_the_group_sizes_that_fit_the_whole_model(tiny_llama):
    # the tiny Llama's linears are 128 and 256 wide: 96 fits neither, and the hint is the common divisors
    with pytest.raises(UserInputError, match=r"use one of 16, 32, 64, 128, -1 \(the sizes that divide every width"):
        GPTQConfig(bits=4, group_size=96).validate_for(tiny_llama)
    GPTQConfig(bits=4, group_size=128).validate_for(tiny_llama)
    SparseGPTConfig(sparsity="2:4", group_size=96).validate_for(tiny_llama)  # not quantized: no group to check
