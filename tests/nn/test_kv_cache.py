"""GrowingCache appends in place and otherwise behaves exactly like transformers' DynamicCache: same tokens and
scores from generate (greedy with left padding, beam search), same contents after crop, batch selection and reset."""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from hf_compress_prompt.nn import GrowingCache, GrowingLayer, use_growing_cache, uses_growing_cache


def _states(batch=2, heads=2, length=1, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, length, dim, generator=g), torch.randn(batch, heads, length, dim, generator=g)


def test_appends_write_into_spare_room_and_equal_concatenation():
    ours, reference = GrowingLayer(granularity=16), DynamicLayer()
    k, v = _states(length=5)
    ours.update(k, v), reference.update(k, v)
    buffer = ours._key_buffer
    assert buffer.shape[2] == 16
    for step in range(11):  # fills the 16 positions exactly: no reallocation
        k, v = _states(seed=step + 1)
        keys, values = ours.update(k, v)
        ref_keys, ref_values = reference.update(k, v)
        assert ours._key_buffer is buffer and keys.data_ptr() == buffer.data_ptr()
        assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
    k, v = _states(seed=99)
    keys, values = ours.update(k, v)  # position 17: the buffer doubles, the contents move with it
    ref_keys, ref_values = reference.update(k, v)
    assert ours._key_buffer.shape[2] == 32 and ours._key_buffer is not buffer
    assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
    assert ours.get_seq_length() == reference.get_seq_length() == 17


@pytest.mark.parametrize("operation", ["crop", "select", "reorder", "repeat", "reset"])
def test_operations_that_replace_the_tensors_are_adopted(operation):
    ours, reference = GrowingLayer(granularity=16), DynamicLayer()
    for layer in (ours, reference):
        layer.update(*_states(length=6))
        if operation == "crop":
            layer.crop(-2)
        elif operation == "select":
            layer.batch_select_indices(torch.tensor([1]))
        elif operation == "reorder":
            layer.reorder_cache(torch.tensor([1, 0]))
        elif operation == "repeat":
            layer.batch_repeat_interleave(2)
        else:
            layer.reset()
    batch = {"select": 1, "repeat": 4}.get(operation, 2)
    for seed in (1, 2):
        keys, values = ours.update(*_states(batch=batch, seed=seed))
        ref_keys, ref_values = reference.update(*_states(batch=batch, seed=seed))
        assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)


def test_cache_builds_growing_layers_from_a_config(tiny_llama):
    cache = GrowingCache(config=tiny_llama.config)
    assert len(cache.layers) == tiny_llama.config.num_hidden_layers
    assert all(type(layer) is GrowingLayer for layer in cache.layers)
    lazy = GrowingCache()  # without a config, layers appear as the model reaches them
    lazy.update(*_states(), layer_idx=1)
    assert len(lazy.layers) == 2 and all(type(layer) is GrowingLayer for layer in lazy.layers)


def _generate(model, cache, **kwargs):
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    ids[1, :3] = 0
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=12, do_sample=False,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_equals_dynamic_cache(tiny_llama, beams):
    ours = _generate(tiny_llama, GrowingCache(config=tiny_llama.config), num_beams=beams)
    reference = _generate(tiny_llama, DynamicCache(config=tiny_llama.config), num_beams=beams)
    assert isinstance(ours.past_key_values, GrowingCache)
    assert torch.equal(ours.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(reference.scores), rtol=1e-5, atol=1e-5)


def test_use_growing_cache_replaces_only_the_default_cache(tiny_llama):
    from transformers import StaticCache

    reference = _generate(tiny_llama, None)
    assert type(reference.past_key_values) is DynamicCache
    use_growing_cache(tiny_llama)
    use_growing_cache(tiny_llama)  # idempotent
    assert uses_growing_cache(tiny_llama)
    ours = _generate(tiny_llama, None)
    assert isinstance(ours.past_key_values, GrowingCache)
    assert torch.equal(ours.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(reference.scores), rtol=1e-5, atol=1e-5)
    assert isinstance(_generate(tiny_llama, None, num_beams=2).past_key_values, GrowingCache)
    # what the caller chose is kept: their own cache, a static one (an offloaded one needs CUDA here)
    given = DynamicCache(config=tiny_llama.config)
    assert _generate(tiny_llama, given).past_key_values is given
    assert isinstance(_generate(tiny_llama, None, cache_implementation="static").past_key_values, StaticCache)
    use_growing_cache(tiny_llama, False)
    assert not uses_growing_cache(tiny_llama)
    assert type(_generate(tiny_llama, None).past_key_values) is DynamicCache
