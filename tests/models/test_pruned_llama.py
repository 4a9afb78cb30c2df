"""The pruned-Llama model type: per-layer sizes in a registered config, exact round trips to and from plain Llama,
save / from_pretrained, generate with a KV cache (also through a layer with no heads), and the recovery prompt."""

import pytest
import torch

import hf_compress_prompt as hcp
from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.models.pruned_llama import PrunedLlamaConfig, PrunedLlamaForCausalLM, from_llama, to_llama
from hf_compress_prompt.recovery import RecoveryPrompt, attach_recovery_prompt, recovery_prompt_of


def _ids(batch=2, length=9, seed=1):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _pruned(tiny_llama, heads=(4, 0), kv=(2, 0), channels=(192, 64)):
    config = PrunedLlamaConfig.from_llama(tiny_llama.config, layer_num_attention_heads=list(heads),
                                          layer_num_key_value_heads=list(kv), layer_intermediate_size=list(channels))
    torch.manual_seed(0)
    return PrunedLlamaForCausalLM(config).eval()


def test_uniform_model_round_trips_to_plain_llama(tiny_llama):
    from transformers import LlamaForCausalLM

    pruned = from_llama(tiny_llama)
    assert isinstance(pruned, PrunedLlamaForCausalLM) and pruned.config.is_uniform
    plain = to_llama(pruned)
    assert type(plain) is LlamaForCausalLM and plain.config.model_type == "llama"
    ids = _ids()
    with torch.no_grad():
        reference = tiny_llama(ids).logits
        torch.testing.assert_close(pruned(ids).logits, reference, rtol=0, atol=0)
        torch.testing.assert_close(plain(ids).logits, reference, rtol=0, atol=0)


def test_layers_take_their_own_sizes(tiny_llama):
    model = _pruned(tiny_llama, heads=(2, 0), kv=(1, 0), channels=(100, 0))
    first, second = model.model.layers
    assert first.self_attn.q_proj.out_features == 2 * 32 and first.self_attn.k_proj.out_features == 32
    assert first.self_attn.num_key_value_groups == 2 and first.mlp.down_proj.in_features == 100
    assert not any(p.numel() for p in second.self_attn.parameters()) and not list(second.mlp.parameters())
    with pytest.raises(UserInputError, match="layer 0 has"):
        to_llama(model)


@pytest.mark.parametrize("changes, match", [
    ({"layer_num_attention_heads": [4]}, "has 1 entries"),
    ({"layer_num_attention_heads": [3, 4]}, "must divide"),
    ({"layer_num_key_value_heads": [0, 2]}, "must divide"),
    ({"layer_intermediate_size": [-1, 256]}, "must not be negative"),
])
def test_bad_per_layer_sizes_are_refused(tiny_llama, changes, match):
    from huggingface_hub.errors import StrictDataclassClassValidationError

    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=match):
        PrunedLlamaConfig.from_llama(tiny_llama.config, **changes)


def test_registered_with_auto_classes_and_round_trips_through_save(tiny_llama, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = _pruned(tiny_llama)
    model.save_pretrained(tmp_path / "m")
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "pruned_llama"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, PrunedLlamaForCausalLM)
    assert loaded.config.layer_intermediate_size == [192, 64]
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_generate_with_cache_equals_recomputing_every_step(tiny_llama):
    model = _pruned(tiny_llama)  # layer 1 has no heads: it still writes (empty) cache entries
    ids = _ids(batch=2)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_quantized_pruned_model_with_prompt_saves_and_loads_in_one_call(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _pruned(tiny_llama)
    compress_(model, RTNConfig(bits=4, group_size=64), progress=False)
    prompt = RecoveryPrompt(torch.randn(4, 128, generator=torch.Generator().manual_seed(0)) * 0.5, {})
    attach_recovery_prompt(model, prompt)
    hcp.save_pretrained(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, PrunedLlamaForCausalLM) and recovery_prompt_of(loaded) is not None
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
        loaded.disable_recovery_prompt()
        bare = loaded(ids).logits
        loaded.enable_recovery_prompt()
        assert not torch.allclose(bare, loaded(ids).logits)
    out = loaded.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=4, do_sample=False,
                          pad_token_id=0)
    assert out.shape == (1, 13)
