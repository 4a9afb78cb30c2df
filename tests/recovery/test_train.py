"""Recovery training with transformers.Trainer: the prompt learns, the weights do not move, the best validation
prompt is kept, training resumes, and bad settings fail before any work."""

import math

import pytest
import torch

from hf_compress_prompt.compressors import RTNConfig, compress_
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.recovery import recovery_prompt_of
from hf_compress_prompt.recovery.data import PromptTuningCollator, TokenWindows, token_windows
from hf_compress_prompt.recovery.train import PromptInit, RecoveryConfig, prompt_tuning_model, recover

FAST = {"num_virtual_tokens": 4, "seqlen": 32, "batch_size": 2, "eval_steps": 4, "eval_windows": 2, "bf16": False,
        "learning_rate": 0.03}


@pytest.fixture
def llama():
    """A tiny Llama whose random weights (std 0.1 instead of 0.02) let a 4-token prompt steer it."""
    from builders import build_steerable_llama

    return build_steerable_llama()


def _windows(n=16, seqlen=32, seed=0):
    # text a prompt can learn: mostly one token, so a prompt that biases every prediction towards it lowers the loss
    g = torch.Generator().manual_seed(seed)
    windows = torch.full((n, seqlen), 7)
    noise = torch.rand(n, seqlen, generator=g) < 0.2
    windows[noise] = torch.randint(3, 250, (int(noise.sum()),), generator=g)
    return windows  # (n, seqlen)


def test_prompt_training_lowers_validation_loss_and_freezes_weights(llama, byte_tokenizer):
    tiny_llama = llama
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    result = recover(tiny_llama, byte_tokenizer, max_steps=12, train_dataset=TokenWindows(_windows()),
                     eval_dataset=TokenWindows(_windows(4)), **FAST)
    after = tiny_llama.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # every weight frozen
    assert all(p.requires_grad for p in tiny_llama.parameters())  # and the flags given back
    baseline, *trained = result.history  # the validation before training comes first
    assert baseline["step"] == 0 and baseline["baseline"] and result.baseline_perplexity == baseline["perplexity"]
    first, best = trained[0]["eval_loss"], min(h["eval_loss"] for h in trained)
    assert best < first - 0.3 and math.isclose(result.best_perplexity, math.exp(best))
    assert [h["step"] for h in trained] == [4, 8, 12]
    assert result.trainable_parameters == 4 * 128
    assert result.prompt.embedding.shape == (4, 128)
    assert recovery_prompt_of(tiny_llama) is result.prompt  # attached
    meta = result.prompt.metadata
    assert meta["steps"] == 12 and meta["vocab_size"] == tiny_llama.config.vocab_size
    assert meta["training"]["num_virtual_tokens"] == 4


def test_best_prompt_is_kept_not_the_last(llama, byte_tokenizer):
    from transformers import TrainerCallback

    class Spoil(TrainerCallback):  # remembers the prompt at step 4, then wrecks it: later evaluations get worse
        seen = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            weight = model.prompt_encoder["default"].embedding.weight
            if state.global_step == 4:
                Spoil.seen = weight.detach().clone()
            if state.global_step == 5:
                with torch.no_grad():
                    weight.mul_(50.0)

    result = recover(llama, byte_tokenizer, train_dataset=TokenWindows(_windows()), eval_dataset=TokenWindows(_windows(4)),
                     callbacks=[Spoil()], **{**FAST, "max_steps": 8, "eval_steps": 4})
    assert result.best_step == 4 and result.history[2]["eval_loss"] > result.history[1]["eval_loss"]  # [0]: baseline
    torch.testing.assert_close(result.prompt.embedding, Spoil.seen)


def test_packed_model_trains_through_its_kernels(llama, byte_tokenizer):
    tiny_llama = llama
    compress_(tiny_llama, RTNConfig(bits=4, group_size=64), progress=False)
    result = recover(tiny_llama, byte_tokenizer, max_steps=8, train_dataset=TokenWindows(_windows()),
                     eval_dataset=TokenWindows(_windows(4)), **FAST)
    assert result.history[-1]["eval_loss"] < result.history[1]["eval_loss"] - 0.1  # [0]: the baseline


def test_baseline_is_the_models_validation_loss_without_a_prompt(llama, byte_tokenizer):
    """history[0] is measured before the first step on the model as it was (no prompt), with the same windows and
    the same loss as every later validation, so the gain can be read off the history."""
    windows = _windows(4)
    with torch.no_grad():  # the bare model's mean next-token loss over the validation windows, batch 2 as in FAST
        expected = sum(llama(input_ids=windows[i : i + 2], labels=windows[i : i + 2]).loss.item() for i in (0, 2)) / 2
    result = recover(llama, byte_tokenizer, max_steps=4, train_dataset=TokenWindows(_windows()),
                     eval_dataset=TokenWindows(windows), **FAST)
    assert result.history[0]["baseline"] and result.history[0]["step"] == 0
    assert math.isclose(result.history[0]["eval_loss"], expected, rel_tol=1e-4)
    assert math.isclose(result.baseline_perplexity, math.exp(expected), rel_tol=1e-4)
    assert result.best_perplexity < result.baseline_perplexity  # the trained prompt beats no prompt here
    assert not any(h.get("baseline") for h in result.history[1:])


def test_recover_raises_no_deprecation_warnings(llama, byte_tokenizer):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recover(llama, byte_tokenizer, max_steps=2, train_dataset=TokenWindows(_windows()),
                eval_dataset=TokenWindows(_windows(4)), **{**FAST, "eval_steps": 2})
    ours = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
            and ("is_gradient_checkpointing" in str(w.message) or "hf_compress_prompt" in w.filename)]
    assert not ours, [str(w.message) for w in ours]


def test_training_resumes_from_a_checkpoint(llama, byte_tokenizer, tmp_path):
    import copy

    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):  # stands in for a killed job: stops right after the step-4 checkpoint
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                control.should_training_stop = True

    data = {"train_dataset": TokenWindows(_windows()), "eval_dataset": TokenWindows(_windows(4))}
    twin = copy.deepcopy(llama)
    full = recover(llama, byte_tokenizer, max_steps=8, output_dir=tmp_path / "a", **data, **FAST)
    assert (tmp_path / "a" / "checkpoint-4" / "best_trainable.safetensors").is_file()
    recover(twin, byte_tokenizer, max_steps=8, output_dir=tmp_path / "b", callbacks=[Interrupt()], **data, **FAST)
    resumed = recover(twin, byte_tokenizer, max_steps=8, output_dir=tmp_path / "b",
                      resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"), **data, **FAST)
    assert [h["step"] for h in resumed.history] == [0, 4, 8]
    assert resumed.best_step == full.best_step
    torch.testing.assert_close(resumed.prompt.embedding, full.prompt.embedding, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", list(PromptInit))
def test_initialisations(tiny_llama, byte_tokenizer, init):
    config = RecoveryConfig(num_virtual_tokens=5, init=init, init_text="hello" if init is PromptInit.TEXT else None)
    embed = tiny_llama.get_input_embeddings().weight.detach().clone()
    prompt = prompt_tuning_model(tiny_llama, config, byte_tokenizer).prompt_encoder["default"].embedding.weight.detach()
    if init is PromptInit.VOCAB:
        torch.testing.assert_close(prompt, embed[:5])
    elif init is PromptInit.TEXT:
        ids = byte_tokenizer("hello", add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(prompt, embed[torch.tensor((ids * 5)[:5])])
    elif init is PromptInit.SAMPLE_VOCAB:
        assert all(any(torch.equal(row, e) for e in embed) for row in prompt)
    else:
        assert not any(torch.equal(prompt[0], e) for e in embed)


def test_collator_pads_and_masks_labels():
    batch = PromptTuningCollator(pad_token_id=9)([{"input_ids": [1, 2, 3]}, {"input_ids": torch.tensor([4])}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]


def test_collator_puts_a_text_prompt_in_front_and_never_scores_it():
    # Compresso's collaborative prompt: attended, not scored, and the first text token masked as without it
    batch = PromptTuningCollator(pad_token_id=9, prefix_ids=(5, 6))([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert batch["input_ids"].tolist() == [[5, 6, 1, 2, 3], [5, 6, 4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 2, 3], [-100, -100, -100, -100, -100]]


def test_token_windows_split_documents(byte_tokenizer, data_dir):
    # the test corpus: 3 documents; the last third (the third document, 6 bytes + EOS) is the validation part
    train = token_windows("c4", byte_tokenizer, 8, part="train", valid_fraction=0.34)
    valid = token_windows("c4", byte_tokenizer, 7, part="valid", valid_fraction=0.34)
    assert train.shape == ((23 + 1 + 94 + 1) // 8, 8)  # two documents and their EOS tokens, in whole windows
    assert byte_tokenizer.decode(valid[0]) == "Third.<|endoftext|>"
    with pytest.raises(UserInputError, match="fewer than one window"):
        token_windows("c4", byte_tokenizer, 64, part="valid", valid_fraction=0.34)


@pytest.mark.parametrize("bad, match", [
    ({"max_steps": 0}, "at least one step"),
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"init": "TEXT"}, "init_text"),
    ({"init": "NOPE"}, "NOPE"),
    ({"nonsense": 1}, "unknown recovery settings"),
])
def test_bad_settings_fail_before_training(tiny_llama, byte_tokenizer, bad, match):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises((UserInputError, ValueError), match=match):
        recover(tiny_llama, byte_tokenizer, train_dataset=TokenWindows(_windows()), eval_dataset=TokenWindows(_windows(4)),
                **{**FAST, "max_steps": 4, **bad})
    assert recovery_prompt_of(tiny_llama) is None
    assert all(torch.equal(v, tiny_llama.state_dict()[k]) for k, v in before.items())


def test_lora_baseline_trains_beside_packed_layers_without_touching_them(llama, byte_tokenizer):
    from hf_compress_prompt.integrations.peft_lora import PackedLoraLinear
    from hf_compress_prompt.nn import PackedLinear

    compress_(llama, RTNConfig(bits=4, group_size=64), progress=False)
    packed = {k: v.clone() for k, v in llama.state_dict().items()}
    result = recover(llama, byte_tokenizer, method="LORA", max_steps=8, train_dataset=TokenWindows(_windows()),
                     eval_dataset=TokenWindows(_windows(4)), **{**FAST, "learning_rate": 1e-2})
    layers = [m for m in result.trained.modules() if isinstance(m, PackedLoraLinear)]
    assert len(layers) == 14 and all(isinstance(m.base_layer, PackedLinear) for m in layers)
    assert result.trainable_parameters == sum(8 * (m.in_features + m.out_features) for m in layers)
    assert result.prompt is None
    assert result.history[-1]["eval_loss"] < result.history[0]["eval_loss"]
    after = result.trained.get_base_model().state_dict()
    assert all(torch.equal(v, after[k.replace("_proj.", "_proj.base_layer.")] if k not in after else after[k])
               for k, v in packed.items())
    with pytest.raises(NotImplementedError, match="cannot merge"):
        result.trained.merge_and_unload()


def test_full_finetuning_moves_the_weights_and_refuses_packed_models(llama, byte_tokenizer):
    before = llama.model.layers[0].mlp.up_proj.weight.detach().clone()
    result = recover(llama, byte_tokenizer, method="FULL", max_steps=4, train_dataset=TokenWindows(_windows()),
                     eval_dataset=TokenWindows(_windows(4)), **{**FAST, "learning_rate": 1e-3})
    assert result.trainable_parameters == sum(p.numel() for p in llama.parameters())
    assert not torch.equal(llama.model.layers[0].mlp.up_proj.weight, before)
    assert result.train_memory_mb is None or result.train_memory_mb >= 0
    assert result.train_memory_mb is None or result.train_memory_mb <= result.peak_rss_mb  # a rise of the peak
    compress_(llama, RTNConfig(bits=4, group_size=64), progress=False)
    with pytest.raises(UserInputError, match="packed"):
        recover(llama, byte_tokenizer, method="FULL", max_steps=2, train_dataset=TokenWindows(_windows()), **FAST)


def test_empty_dataset_is_refused(tiny_llama, byte_tokenizer):
    with pytest.raises(UserInputError, match="non-empty"):
        recover(tiny_llama, byte_tokenizer, train_dataset=TokenWindows(torch.zeros(0, 32, dtype=torch.long)), **FAST)


def test_every_recovery_method_has_a_row_in_the_dispatch_table():
    from hf_compress_prompt.recovery.train import _METHODS, RecoveryMethod

    assert set(_METHODS) == set(RecoveryMethod)
    assert [m for m, row in _METHODS.items() if row.gives_prompt] == [RecoveryMethod.PROMPT, RecoveryMethod.PREFIX]
