"""Compresso: hard-concrete gates, the expected-sparsity estimate, the gated model equals the pruned one, training
reaches its target with LoRA merged and the collaborative prompt attached, and bad input fails before training."""

import copy

import pytest
import torch

from hf_compress_prompt.compressors.compresso import (
    CompressoConfig,
    StructureGates,
    compresso_prune,
)
from hf_compress_prompt.compressors.structured import apply_structure, count_parameters
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.methods.hard_concrete import HardConcreteGate, lagrangian_penalty
from hf_compress_prompt.models.pruned_llama import PrunedLlamaForCausalLM
from hf_compress_prompt.recovery import recovery_prompt_of
from hf_compress_prompt.recovery.data import TokenWindows


def _llama(tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=260, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                         tie_word_embeddings=tied)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_gate_samples_are_exactly_zero_or_one_often_and_expectation_matches():
    gate = HardConcreteGate(20000, init_keep=0.8).train()
    z = gate()
    assert ((z == 0) | (z == 1)).float().mean() > 0.25 and z.min() >= 0 and z.max() <= 1  # a point mass at each end
    assert abs(float((z > 0).float().mean()) - float(gate.expected_open().detach().mean())) < 0.02
    assert abs(float(gate.expected_open().mean()) - 0.8) < 0.01
    mean = gate.eval()()  # eval mode: E[z], deterministic
    assert torch.equal(mean, gate()) and abs(float(mean.mean()) - float(z.detach().mean())) < 0.02
    with torch.no_grad():
        gate.log_alpha[:5000] = -10  # clearly closed
    assert float(gate()[:5000].max()) < 1e-3 and float(gate()[5000:].min()) > 0.3


def test_lagrangian_penalty_pushes_towards_the_target():
    s = torch.tensor(0.1, requires_grad=True)
    lagrangian_penalty(s, 0.3, torch.tensor(-1.0), torch.tensor(1.0)).backward()
    assert s.grad < 0  # minimising raises the sparsity towards 0.3


def test_expected_sparsity_matches_the_removed_share():
    model = _llama()
    gates = StructureGates(model, prune_hidden=False)
    with torch.no_grad():
        for g in [*gates.heads, *gates.channels]:
            g.log_alpha.fill_(20)
    assert float(gates.expected_sparsity()) < 1e-6
    with torch.no_grad():
        for g in gates.channels:
            g.log_alpha[128:] = -20  # half the channels
    pruned = apply_structure(model, gates.eval().plan_and_fold(copy.deepcopy(model)))
    actual = 1 - count_parameters(pruned) / count_parameters(model)
    assert abs(float(gates.expected_sparsity()) - actual) < 0.01  # norms are the only parameters left out


@pytest.mark.parametrize("tied", [False, True])
def test_pruned_model_equals_the_gated_model(tied):
    model = _llama(tied)
    gates = StructureGates(model, prune_hidden=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a mix of open, half-open and closed gates
        for gate in [*gates.heads, *gates.channels, gates.hidden]:
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=g) * 3)
        gates.heads[0].log_alpha[:2] = -10  # key/value group 0 of layer 0 closes
        gates.heads[1].log_alpha[:] = 10
    ids = torch.randint(3, 256, (2, 10), generator=g)
    gates.eval().install(model)
    with torch.no_grad():
        gated = model(ids).logits
    gates.remove()
    twin = copy.deepcopy(model)
    plan = gates.plan_and_fold(twin)
    pruned = apply_structure(twin, plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, gated, rtol=1e-4, atol=1e-4)
    assert pruned.config.hidden_size < 128 and any(len(h) < 4 for h in plan.heads)


class _CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) % 250 + 3 for ch in text]}


def test_training_reaches_the_target_merges_lora_and_attaches_the_prompt():
    model = _llama()
    windows = torch.randint(3, 250, (64, 32), generator=torch.Generator().manual_seed(0))
    result = compresso_prune(model, _CharTokenizer(), target=0.4, max_steps=80, batch_size=4, seqlen=32, bf16=False,
                             train_dataset=TokenWindows(windows), collaborative_prompt="being pruned", multiple_of=16)
    pruned = result.model
    assert isinstance(pruned, PrunedLlamaForCausalLM)
    assert 0.4 <= result.removed_fraction < 0.46  # the budget decides the size
    sizes = [*pruned.config.layer_intermediate_size, pruned.config.hidden_size]
    assert all(size % 16 == 0 for size in sizes), sizes
    assert not any("lora" in name for name, _ in pruned.named_parameters())
    prompt = recovery_prompt_of(pruned)
    assert prompt is not None and prompt.num_virtual_tokens == len("being pruned")
    sparsity = [h["expected_sparsity"] for h in result.history]
    assert sparsity[-1] > sparsity[0] + 0.2
    out = pruned.generate(windows[:1, :8], attention_mask=torch.ones(1, 8, dtype=torch.long), max_new_tokens=3,
                          do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)


@pytest.mark.parametrize("bad, match", [
    ({"target": 0}, r"must lie in \(0, 1\)"), ({"target": 1.2}, r"must lie in \(0, 1\)"),
    ({"max_steps": 0}, "positive integer"), ({"nonsense": 1}, "unknown Compresso settings"),
])
def test_bad_settings_fail_before_training(bad, match):
    with pytest.raises(UserInputError, match=match):
        compresso_prune(_llama(), _CharTokenizer(), dataset="no-such-corpus", **bad)


def test_other_model_families_are_refused_before_data_is_read():
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=260, hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                                   num_attention_heads=2))
    with pytest.raises(UserInputError, match="Llama-family"):
        compresso_prune(opt, _CharTokenizer(), dataset="no-such-corpus")


def test_the_collaborative_prompt_is_on_by_default():
    assert CompressoConfig().collaborative_prompt
