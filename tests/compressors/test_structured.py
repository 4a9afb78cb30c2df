"""Structured pruning: the smaller model equals the original with the removed structures zeroed, plans are
checked, the one-shot magnitude plan hits its parameter target and keeps the strongest structures."""

import copy

import pytest
import torch

from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.compressors.structured import (
    StructurePlan,
    apply_structure,
    count_parameters,
    plan_magnitude,
    prune_structured,
)
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.models.pruned_llama import PrunedLlamaForCausalLM

HD = 32  # head_dim of the tiny Llama (hidden 128, 4 heads, 2 key/value heads)
ALL_HEADS, ALL_CHANNELS = list(range(4)), list(range(256))


def _llama(tied=False):
    from builders import build_llama

    return build_llama(num_hidden_layers=3, tie_word_embeddings=tied)


@torch.no_grad()
def _zeroed(model, plan):
    """The original model with every removed structure's output zeroed (the masked model pruning must equal)."""
    model = copy.deepcopy(model)
    dead = [i for i in range(model.config.hidden_size) if plan.hidden is not None and i not in plan.hidden]
    model.model.embed_tokens.weight[:, dead] = 0
    for i, layer in enumerate(model.model.layers):
        for h in range(4):
            if h not in plan.heads[i]:
                layer.self_attn.o_proj.weight[:, h * HD:(h + 1) * HD] = 0
        gone = [c for c in range(256) if c not in plan.channels[i]]
        layer.mlp.down_proj.weight[:, gone] = 0
        layer.self_attn.o_proj.weight[dead] = 0  # the stream stays zero in removed hidden dimensions
        layer.mlp.down_proj.weight[dead] = 0
    return model


CASES = {
    "heads": StructurePlan([[0, 1, 2, 3], [1, 3], [0, 2]], [ALL_CHANNELS] * 3),
    "whole group and empty layer": StructurePlan([[2, 3], [], [0, 1, 2, 3]], [ALL_CHANNELS] * 3),
    "channels": StructurePlan([ALL_HEADS] * 3, [list(range(0, 256, 2)), list(range(7)), []]),
    "hidden": StructurePlan([ALL_HEADS] * 3, [ALL_CHANNELS] * 3, [i for i in range(128) if i % 4]),
    "everything": StructurePlan([[0, 2], [3], []], [list(range(100)), [], list(range(5, 256, 3))],
                                list(range(0, 128, 2))),
}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_pruned_model_equals_the_zeroed_original(case, tied):
    model, plan = _llama(tied), CASES[case]
    pruned = apply_structure(model, plan)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = _zeroed(model, plan)(ids).logits, pruned(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert count_parameters(pruned) < count_parameters(model) or case == "nothing"
    assert pruned.config.hidden_size == len(plan.hidden or range(128))
    assert pruned.config.layer_num_attention_heads == [len(h) for h in plan.heads]


def test_structures_can_be_pruned_again():
    model = _llama()
    once = apply_structure(model, CASES["channels"])
    twice = apply_structure(once, StructurePlan([[0, 1], [2, 3], [1, 3]], [list(range(64)), list(range(3)), []]))
    assert twice.config.layer_intermediate_size == [64, 3, 0]
    assert twice.config.layer_num_key_value_heads == [1, 1, 2]


@pytest.mark.parametrize("plan, match", [
    (StructurePlan([ALL_HEADS] * 2, [ALL_CHANNELS] * 2), "3 layers"),
    (StructurePlan([[0, 1, 2], ALL_HEADS, ALL_HEADS], [ALL_CHANNELS] * 3), "same number of heads"),
    (StructurePlan([[1, 0], ALL_HEADS, ALL_HEADS], [ALL_CHANNELS] * 3), "sorted distinct"),
    (StructurePlan([ALL_HEADS] * 3, [[0, 256], ALL_CHANNELS, ALL_CHANNELS]), "below 256"),
    (StructurePlan([ALL_HEADS] * 3, [ALL_CHANNELS] * 3, []), "not empty"),
])
def test_bad_plans_are_refused(plan, match):
    with pytest.raises(UserInputError, match=match):
        apply_structure(_llama(), plan)


@pytest.mark.parametrize("fraction", [0.2, 0.3])
def test_magnitude_plan_removes_the_target_share_and_keeps_strong_structures(fraction):
    model = _llama()
    with torch.no_grad():  # make head 1 and channel 5 of layer 0 clearly the strongest
        model.model.layers[0].self_attn.q_proj.weight[HD:2 * HD] *= 10
        model.model.layers[0].mlp.up_proj.weight[5] *= 10
    pruned, plan = prune_structured(model, fraction)
    removed = 1 - count_parameters(pruned) / count_parameters(model)
    assert abs(removed - fraction) < 0.02
    assert 1 in plan.heads[0] and 5 in plan.channels[0]
    assert isinstance(pruned, PrunedLlamaForCausalLM)
    shuffled, random_plan = prune_structured(model, fraction, criterion="random", seed=1)
    assert count_parameters(shuffled) == count_parameters(pruned) and random_plan != plan


def test_pruned_model_can_then_be_quantized():
    pruned = apply_structure(_llama(), StructurePlan([[0, 1], ALL_HEADS, [2, 3]], [list(range(128))] * 3))
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = pruned(ids).logits
        compress_(pruned, RTNConfig(bits=8, group_size=64), progress=False)
        after = pruned(ids).logits
    assert torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0) > 0.99


def test_bad_input_is_refused_before_work():
    from builders import build_tiny_opt

    with pytest.raises(UserInputError, match=r"must lie in \(0, 1\)"):
        plan_magnitude(_llama(), 1.0)
    with pytest.raises(UserInputError, match=r"must lie in \(0, 1\)"):
        plan_magnitude(_llama(), 0)
    with pytest.raises(UserInputError, match="criterion"):
        plan_magnitude(_llama(), 0.2, criterion="taylor")
    with pytest.raises(UserInputError, match="Llama-family"):
        prune_structured(build_tiny_opt(), 0.2)
    packed = _llama()
    compress_(packed, RTNConfig(bits=4, group_size=64), progress=False)
    with pytest.raises(UserInputError, match="packed"):
        prune_structured(packed, 0.2)
