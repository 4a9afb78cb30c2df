"""Deep prompts (method PREFIX): keys and values in every layer, trained with PEFT's prefix tuning (with and without
its projection) on a frozen model, saved in PEFT's format (PEFT loads it and gives our logits), served from the
runtime's once-filled cache, attached by from_pretrained of a compressed folder, shared and transferred like a
prompt; models and lengths it cannot serve are refused before anything trains or is written."""

import copy
import json
import math

import pytest
import torch
from builders import build_steerable_llama, build_tiny_gpt2, build_tiny_llama, build_tiny_mistral, build_tiny_opt
from test_train import FAST, _windows  # tests/recovery is on sys.path (pytest rootdir-less import)

import hf_compress_prompt as hcp
from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.recovery import (
    RecoveryPrefix,
    RecoveryPrompt,
    attach_recovery_prompt,
    load_recovery_prompt,
    prefix_of_prompt,
    recovery_prompt_of,
    save_recovery_prompt,
)
from hf_compress_prompt.recovery.data import TokenWindows
from hf_compress_prompt.recovery.prefix import prefix_layout
from hf_compress_prompt.recovery.train import RecoveryConfig, RecoveryMethod, prefix_tuning_model, recover

N = 5


def _ids(batch=2, length=9, seed=1):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _peft_prefix_model(model, projection: bool, n=N, seed=0):
    """PEFT's own prefix-tuning model of a copy of ``model``: its random initialisation (PEFT's), the projection's
    MLP random too (so the prefix is its output, not the embedding)."""
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(model), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=projection)).eval()


def _ours(twin, model) -> RecoveryPrefix:
    """The prefix PEFT's model holds (what it saves), as ours."""
    return RecoveryPrefix.from_peft(twin.get_prompt_embedding_to_save("default"), prefix_layout(model))


@pytest.mark.parametrize("build", [build_tiny_llama, build_tiny_gpt2, build_tiny_opt], ids=["llama_gqa", "gpt2", "opt"])
def test_layout_is_the_models_cache_and_pefts(build):
    from peft import PrefixTuningConfig, get_peft_model

    model = build()
    with torch.no_grad():
        cache = model(_ids(batch=1, length=3), use_cache=True).past_key_values
    layout = prefix_layout(model)
    assert layout.num_layers == len(cache.layers)
    for layer in cache.layers:  # (1, kv_heads, 3, head_dim)
        assert layer.keys.shape[1:] == layer.values.shape[1:] == (layout.num_key_value_heads, 3, layout.head_dim)
    peft_config = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                          num_virtual_tokens=N)).peft_config["default"]
    assert (peft_config.token_dim, peft_config.num_attention_heads, peft_config.num_layers) == (
        layout.token_dim, layout.num_key_value_heads, layout.num_layers)
    if build is build_tiny_llama:  # grouped-query attention: the cache has the 2 key/value heads, not the 4 heads
        assert layout.num_key_value_heads == 2 < model.config.num_attention_heads


def test_peft_layout_round_trips():
    flat = torch.randn(N, 2 * 2 * 64)
    prefix = RecoveryPrefix.from_peft(flat, prefix_layout(build_tiny_llama()))
    assert prefix.key_values.shape == (2, 2, 2, N, 32) and torch.equal(prefix.to_peft(), flat)
    # PEFT's get_prompt: layer 1's values are rows 3 of the (n, 2L, h, d) view
    torch.testing.assert_close(prefix.key_values[1, 1], flat.view(N, 4, 2, 32)[:, 3].transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_logits_and_loss_equal_peft_prefix_tuning(projection, packed):
    model = build_tiny_llama()
    if packed:
        compress_(model, RTNConfig(bits=4, group_size=64), progress=False)
    twin = _peft_prefix_model(model, projection)
    attach_recovery_prompt(model, _ours(twin, model))
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), hcp.kernels.reference_only():
        for kwargs in ({}, {"attention_mask": mask}, {"attention_mask": mask, "position_ids": positions},
                       {"use_cache": False}, {"labels": ids}):
            ours, theirs = model(ids, **kwargs), twin(input_ids=ids, **kwargs)
            assert ours.logits.shape == (2, 9, model.config.vocab_size)
            torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-4, atol=1e-4)
        model.disable_recovery_prompt()
        assert not torch.allclose(model(ids).logits, theirs.logits, atol=1e-2)  # the prefix matters


def test_a_prompt_and_its_prefix_give_the_same_logits(tiny_llama):
    prompt = RecoveryPrompt(torch.randn(N, 128, generator=torch.Generator().manual_seed(0)) * 0.5)
    prefix = prefix_of_prompt(tiny_llama, prompt)
    ids = _ids()
    with torch.no_grad():
        attach_recovery_prompt(tiny_llama, prompt)
        with_prompt = tiny_llama(ids).logits
        attach_recovery_prompt(tiny_llama, prefix)
        with_prefix = tiny_llama(ids).logits
        tiny_llama.disable_recovery_prompt()
        without = tiny_llama(ids).logits
    torch.testing.assert_close(with_prefix, with_prompt, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_prefix, without, atol=1e-3)


def test_decoding_runs_the_tokens_a_prompt_of_the_same_length_runs(tiny_llama):
    # The prefix is copied from the once-filled cache like a prompt's keys and values: after the first call, every
    # generate call runs its own tokens through the layers only, for a prompt and a prefix alike.
    seen = []
    tiny_llama.model.layers[0].register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        args[0].shape[1] if args else kwargs["hidden_states"].shape[1]), with_kwargs=True)
    ids, counts = _ids(batch=1), {}
    prompt = RecoveryPrompt(torch.randn(N, 128) * 0.5)
    for name, attached in (("prompt", prompt), ("prefix", prefix_of_prompt(tiny_llama, prompt))):
        attach_recovery_prompt(tiny_llama, attached)
        for _ in range(2):  # the first call computes the prompt's cache (a prefix needs none)
            seen.clear()
            out = tiny_llama.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        counts[name] = list(seen)
        assert out.shape == (1, 9 + 4)
    assert counts["prefix"] == counts["prompt"] == [9, 1, 1, 1]


def _save_and_load_in_peft(model, prefix, folder):
    from peft import PeftModel

    save_recovery_prompt(prefix, folder, model)
    return PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_trained_prefix_is_saved_in_peft_format_and_peft_gives_our_logits(projection, byte_tokenizer, tmp_path):
    llama = build_steerable_llama()
    bare = copy.deepcopy(llama)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    result = recover(llama, byte_tokenizer, method="PREFIX", prefix_projection=projection, max_steps=12,
                     train_dataset=TokenWindows(_windows()), eval_dataset=TokenWindows(_windows(4)), **FAST)
    after = llama.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # every weight frozen
    assert all(p.requires_grad for p in llama.parameters())  # and the flags given back
    baseline, *trained = result.history
    first, best = trained[0]["eval_loss"], min(h["eval_loss"] for h in trained)
    assert best < baseline["eval_loss"] - 0.3 and best <= first  # the prefix recovers, the best is kept
    assert math.isclose(result.best_perplexity, math.exp(best))
    prefix = result.prompt
    assert isinstance(prefix, RecoveryPrefix) and prefix.key_values.shape == (2, 2, 2, 4, 32)
    assert recovery_prompt_of(llama) is prefix and prefix.metadata["training"]["method"] == "PREFIX"
    kv = 2 * 2 * 2 * 32  # per virtual token: layers x (keys, values) x kv heads x head_dim
    assert result.trainable_parameters == (4 * 64 + 64 * 65 + 65 * kv if projection else 4 * kv)

    llama.save_pretrained(tmp_path / "m")  # the compressed-folder save writes recovery_prompt/ in PEFT's format
    config = json.loads((tmp_path / "m" / "recovery_prompt" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is projection
    assert (config["num_attention_heads"], config["token_dim"], config["num_layers"]) == (2, 64, 2)
    from peft import PeftModel

    twin = PeftModel.from_pretrained(bare, tmp_path / "m" / "recovery_prompt").eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, twin(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    reread = load_recovery_prompt(tmp_path / "m" / "recovery_prompt")
    assert isinstance(reread, RecoveryPrefix) and torch.equal(reread.key_values, prefix.key_values)


def test_prefix_training_shows_none_of_pefts_own_deprecation_warnings(byte_tokenizer):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recover(build_tiny_llama(), byte_tokenizer, method="PREFIX", max_steps=2,
                train_dataset=TokenWindows(_windows(4)), eval_dataset=TokenWindows(_windows(2)), **FAST)
    assert not [w for w in caught if "past_key_values" in str(w.message)]  # PEFT's forward, not the user's call


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_a_prefix_saved_by_peft_loads_as_ours(tiny_llama, projection, tmp_path):
    twin = _peft_prefix_model(tiny_llama, projection)
    twin.save_pretrained(tmp_path / "peft")  # PEFT saves the projection's output: every layer's keys and values
    prefix = load_recovery_prompt(tmp_path / "peft")
    assert isinstance(prefix, RecoveryPrefix) and prefix.num_virtual_tokens == N
    attach_recovery_prompt(tiny_llama, prefix)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, twin(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_the_prefix_starts_as_the_prompt_initialisations_keys_and_values(tiny_llama, projection):
    config = RecoveryConfig(method="PREFIX", num_virtual_tokens=N, prefix_projection=projection)
    start = prefix_of_prompt(tiny_llama, RecoveryPrompt(tiny_llama.get_input_embeddings().weight[:N].detach()))
    peft_model = prefix_tuning_model(tiny_llama, config)
    initial = peft_model.get_prompt_embedding_to_save("default")
    torch.testing.assert_close(initial, start.to_peft(), rtol=1e-4, atol=1e-5)
    random = prefix_tuning_model(build_tiny_llama(), RecoveryConfig(method="PREFIX", num_virtual_tokens=N,
                                                                    init="RANDOM", prefix_projection=projection))
    assert not torch.allclose(random.get_prompt_embedding_to_save("default"), initial, atol=1e-2)


def test_compressed_folder_with_a_prefix_round_trips_through_from_pretrained(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    compress_(tiny_llama, RTNConfig(bits=4, group_size=64), progress=False)
    prefix = _ours(_peft_prefix_model(tiny_llama, projection=False), tiny_llama)
    attach_recovery_prompt(tiny_llama, prefix)
    hcp.save_pretrained(tiny_llama, tmp_path / "m")
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "m"), hcp.from_pretrained(tmp_path / "m")):
        attached = recovery_prompt_of(loaded)
        assert isinstance(attached, RecoveryPrefix) and torch.equal(attached.key_values, prefix.key_values)
        ids = _ids()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, tiny_llama(ids).logits)
        kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        assert loaded.generate(ids[:1], **kwargs).tolist() == tiny_llama.generate(ids[:1], **kwargs).tolist()


def test_one_prefix_trained_on_two_models_helps_both(byte_tokenizer):
    base = build_steerable_llama()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        for model, seed in ((a, 1), (b, 2)):
            g = torch.Generator().manual_seed(seed)
            for p in model.model.layers.parameters():
                if p.ndim == 2:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
    windows = _windows(4)
    before = [model(windows, labels=windows).loss.item() for model in (a, b)]
    result = recover(a, byte_tokenizer, method="PREFIX", prefix_projection=True, shared_with=[b], max_steps=8,
                     train_dataset=TokenWindows(_windows()), eval_dataset=TokenWindows(windows), **FAST)
    assert recovery_prompt_of(a) is recovery_prompt_of(b) is result.prompt
    with torch.no_grad():
        after = [model(windows, labels=windows).loss.item() for model in (a, b)]
    assert after[0] < before[0] - 0.3 and after[1] < before[1] - 0.3
    assert len(result.prompt.metadata["shared_with_recipes"]) == 1


def test_transfer_scores_a_prefix_like_a_prompt(tiny_llama):
    from hf_compress_prompt.evaluation import perplexity
    from hf_compress_prompt.recovery.transfer import evaluate_transfer

    prefix = _ours(_peft_prefix_model(tiny_llama, projection=False), tiny_llama)
    ids = torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(3))
    matrix = evaluate_transfer({"p": prefix}, {"m": tiny_llama}, {"d": ids}, seqlen=32)
    attach_recovery_prompt(tiny_llama, prefix)
    direct = perplexity(tiny_llama, ids, seqlen=32, progress=False).perplexity
    assert math.isclose(matrix.with_prompt[("p", "m", "d")], direct, rel_tol=1e-5)
    assert matrix.with_prompt[("p", "m", "d")] != matrix.without[("m", "d")]


def test_cli_recover_with_method_prefix_saves_a_prefix(tiny_llama_dir, data_dir, tmp_path):
    from hf_compress_prompt.cli import EXIT_OK, main

    out = tmp_path / "recovered"
    code = main(["recover", "--model", str(tiny_llama_dir), "--output", str(out), "--method", "PREFIX",
                 "--prefix-projection", "--steps", "2", "--tokens", "2", "--seqlen", "4", "--batch-size", "2",
                 "--eval-steps", "1", "--eval-windows", "1"])
    assert code == EXIT_OK
    attached = recovery_prompt_of(hcp.from_pretrained(out))
    assert isinstance(attached, RecoveryPrefix) and attached.num_virtual_tokens == 2
    assert attached.metadata["training"]["prefix_projection"] is True


def test_serving_refuses_a_prefix_in_one_line(tiny_llama, byte_tokenizer):
    from hf_compress_prompt.serving import prompt_embeds

    attach_recovery_prompt(tiny_llama, _ours(_peft_prefix_model(tiny_llama, projection=False), tiny_llama))
    with pytest.raises(UserInputError, match="prompt_embeds cannot carry it") as info:
        prompt_embeds(tiny_llama, byte_tokenizer, "hello")
    assert "\n" not in str(info.value)


def test_hub_card_of_a_prefix(tiny_llama):
    from hf_compress_prompt.integrations.hub import recovery_prompt_card

    prefix = _ours(_peft_prefix_model(tiny_llama, projection=False), tiny_llama)
    card = str(recovery_prompt_card(prefix, "user/prefix"))
    assert "prefix-tuning" in card and "recovery prefix" in card and "soft prompt" not in card


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=260, d_model=64, d_kv=16, d_ff=128, num_layers=1,
                                               num_heads=4))


@pytest.mark.parametrize("build, match", [
    (build_tiny_mistral, "mistral's cache has DynamicSlidingWindowLayer layers.*sliding_window = None"),
    (_t5, "t5 is an encoder-decoder"),
], ids=["sliding_window", "encoder_decoder"])
def test_models_whose_cache_cannot_serve_a_prefix_are_refused_before_training(build, match, byte_tokenizer, tmp_path):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserInputError, match=match) as info:
        recover(model, byte_tokenizer, method="PREFIX", output_dir=tmp_path / "run", max_steps=2,
                train_dataset=TokenWindows(_windows()), eval_dataset=TokenWindows(_windows(4)), **FAST)
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bad_lengths_and_settings_are_refused_before_anything_is_written(byte_tokenizer, tmp_path):
    model = build_tiny_llama(max_positions=40)
    old = RecoveryPrompt(torch.zeros(3, 128))
    attach_recovery_prompt(model, old)
    with pytest.raises(UserInputError, match="num_virtual_tokens=10 with 32 token.*max_position_embeddings=40; use "
                                             "num_virtual_tokens <= 8"):
        recover(model, byte_tokenizer, method="PREFIX", output_dir=tmp_path / "run", max_steps=2,
                train_dataset=TokenWindows(_windows()), eval_dataset=TokenWindows(_windows(4)),
                **{**FAST, "num_virtual_tokens": 10})
    assert not (tmp_path / "run").exists() and recovery_prompt_of(model) is old  # the old prompt is kept
    with pytest.raises(UserInputError, match="num_virtual_tokens=0 must be >= 1"):
        RecoveryConfig(method=RecoveryMethod.PREFIX, num_virtual_tokens=0)
    with pytest.raises(UserInputError, match="prefix_hidden_size=32 .* prefix_projection=True"):
        RecoveryConfig(method="PREFIX", prefix_hidden_size=32)
    with pytest.raises(UserInputError, match="num_virtual_tokens=40 with 1 token.*use num_virtual_tokens <= 39"):
        attach_recovery_prompt(model, RecoveryPrefix(torch.zeros(2, 2, 2, 40, 32)))
    with pytest.raises(UserInputError, match="1 layers of 2 key/value heads of 32, the model 2 of 2 of 32"):
        attach_recovery_prompt(model, RecoveryPrefix(torch.zeros(1, 2, 2, 4, 32)))
    with pytest.raises(UserInputError, match="NaN"):
        attach_recovery_prompt(model, RecoveryPrefix(torch.full((2, 2, 2, 4, 32), float("nan"))))
    assert recovery_prompt_of(model) is old  # nothing half-attached
