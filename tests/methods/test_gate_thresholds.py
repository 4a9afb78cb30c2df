"""Which hard-concrete gates stay: one threshold on P(open), counts rounded to a multiple, the same number of heads in
every key/value group, the lowest threshold that fits a budget, and a parameter count that matches a real model."""

import pytest
import torch

from hf_compress_prompt.methods.gate_thresholds import (
    expected_parameters,
    lowest_threshold,
    open_at,
    open_heads_at,
    zero_except,
)


def test_open_at_keeps_the_gates_above_the_threshold_rounded_to_a_multiple():
    p = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2, 0.95])
    assert open_at(p, 0.5) == [0, 2, 3, 5]
    assert open_at(p, 0.75, multiple_of=2) == [0, 2, 3, 5]  # 3 open -> 4: the next most probably open joins
    assert open_at(p, 0.65, multiple_of=3) == [0, 2, 5]  # 4 open -> 3: the least probably open of them goes
    assert open_at(p, 0.0, multiple_of=4) == list(range(6))  # all stay: no rounding down
    assert open_at(p, 0.99) == []


def test_open_heads_at_keeps_the_same_count_in_every_key_value_group():
    # two groups of three query heads; 3 heads are open in all -> round(3 / 2) = 2 per group
    p = torch.tensor([0.9, 0.6, 0.1, 0.2, 0.3, 0.95])
    assert open_heads_at(p, 2, 0.5) == [0, 1, 4, 5]
    assert open_heads_at(p, 2, 0.99) == []
    assert open_heads_at(p, 2, 0.0) == list(range(6))


def test_lowest_threshold_is_the_first_that_fits_the_budget():
    p = torch.linspace(0.05, 0.95, 19)

    def parameters_at(tau):
        return 10 * len(open_at(p, tau))

    for budget in (0, 45, 100, 190):
        tau = lowest_threshold(parameters_at, budget)
        assert parameters_at(tau) <= budget
        assert tau < 1e-5 or parameters_at(tau - 1e-5) > budget  # any lower threshold keeps too many


@pytest.mark.parametrize("tied", [False, True])
def test_expected_parameters_count_a_llama_without_its_norms(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    sizes = [(4, 2, 96)] * 2
    count = expected_parameters(64, [4, 4], [96, 96], sizes, head_dim=16, vocab_size=100, tied=tied)
    assert count == sum(p.numel() for p in model.parameters()) - norms
    # differentiable in expected counts
    heads = torch.tensor(3.0, requires_grad=True)
    expected_parameters(64, [heads, 4], [96, 96], sizes, head_dim=16, vocab_size=100, tied=tied).backward()
    assert heads.grad == 2 * 16 * 64 * (1 + 2 / 4)  # q and o rows, and half a key/value head's rows


def test_zero_except_keeps_only_the_given_entries():
    values = torch.tensor([0.5, 0.75, 0.25])
    assert zero_except(values, [0, 2]).tolist() == [0.5, 0.0, 0.25]
    assert zero_except(values, []).tolist() == [0.0, 0.0, 0.0]
