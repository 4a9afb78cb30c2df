"""One prompt for several models: the loss is the mean of the models' losses with one tied prompt (gradients add up
in one parameter), training lowers every model's loss, validation averages over the models, bad partners fail early
with nothing modified."""

import copy
import math

import pytest
import torch

from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.recovery import recovery_prompt_of
from hf_compress_prompt.recovery.data import TokenWindows
from hf_compress_prompt.recovery.shared import SharedPromptTrainer, tie_prompt
from hf_compress_prompt.recovery.train import RecoveryConfig, prompt_tuning_model, recover

from test_train import FAST, _windows  # tests/recovery is on sys.path (pytest rootdir-less import)


@pytest.fixture
def two_compressions():
    """Two copies of one tiny Llama with different perturbations of every block weight (stand-ins for two
    compression methods of one base model)."""
    from builders import build_steerable_llama

    base = build_steerable_llama()
    models = []
    for seed in (1, 2):
        model = copy.deepcopy(base)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.model.layers.parameters():
                if p.ndim == 2:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        models.append(model)
    return models


def _loss(model, windows):
    with torch.no_grad():
        return model(windows, labels=windows).loss.item()


def test_loss_and_gradient_are_the_means_over_the_models(two_compressions):
    from transformers import TrainingArguments

    a, b = two_compressions
    peft_a = prompt_tuning_model(a, RecoveryConfig(num_virtual_tokens=4))
    peft_b = tie_prompt(peft_a, b, peft_a.peft_config["default"])
    prompt = peft_a.prompt_encoder["default"].embedding.weight
    assert peft_b.prompt_encoder["default"].embedding.weight is prompt  # one parameter, not a copy
    windows = _windows(2)
    inputs = {"input_ids": windows, "attention_mask": torch.ones_like(windows), "labels": windows}
    grads = []
    for model in (peft_a, peft_b):  # each model alone
        prompt.grad = None
        model(**inputs).loss.backward()
        grads.append(prompt.grad.clone())
    separate = [peft_a(**inputs).loss.item(), peft_b(**inputs).loss.item()]
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], bf16=False)
    trainer = SharedPromptTrainer(model=peft_a, args=args, partners=[peft_b])
    prompt.grad = None
    loss = trainer.compute_loss(peft_a, inputs)
    loss.backward()
    assert math.isclose(loss.item(), sum(separate) / 2, rel_tol=1e-5)
    torch.testing.assert_close(prompt.grad, (grads[0] + grads[1]) / 2, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in b.parameters())  # the partner's weights stay frozen


def test_one_prompt_trained_on_both_models_helps_both(two_compressions, byte_tokenizer):
    a, b = two_compressions
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a, b)]
    held_out, valid = _windows(4, seed=1), _windows(2, seed=3)  # one validation batch of 2
    before = [_loss(m, held_out) for m in (a, b)]
    result = recover(a, byte_tokenizer, max_steps=12, shared_with=[b], train_dataset=TokenWindows(_windows()),
                     eval_dataset=TokenWindows(valid), **FAST)
    assert recovery_prompt_of(a) is result.prompt and recovery_prompt_of(b) is result.prompt
    after = [_loss(m, held_out) for m in (a, b)]  # the attached prompt applies
    assert after[0] < before[0] - 0.1 and after[1] < before[1] - 0.1, (before, after)
    # validation is the mean loss of both models (the best prompt is attached to both)
    mean = (_loss(a, valid) + _loss(b, valid)) / 2
    assert math.isclose(result.best_perplexity, math.exp(mean), rel_tol=1e-4)
    assert not math.isclose(result.best_perplexity, math.exp(_loss(a, valid)), rel_tol=1e-3)
    for model, state in zip((a, b), states):
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        assert all(p.requires_grad for p in model.parameters())  # flags restored (a tiny model trains by default)
    assert result.prompt.metadata["shared_with_recipes"] == [None]  # b carries no compression recipe


def test_attach_false_keeps_the_previous_prompts(two_compressions, byte_tokenizer):
    a, b = two_compressions
    data = {"train_dataset": TokenWindows(_windows()), "eval_dataset": TokenWindows(_windows(2))}
    old = recover(b, byte_tokenizer, max_steps=1, **data, **FAST).prompt
    result = recover(a, byte_tokenizer, max_steps=2, shared_with=[b], attach=False, **data, **FAST)
    assert recovery_prompt_of(a) is None and recovery_prompt_of(b) is old
    assert result.prompt is not None


def test_bad_partners_fail_before_training(two_compressions, byte_tokenizer):
    from builders import build_other_llama

    a, b = two_compressions
    other = build_other_llama()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    data = {"train_dataset": TokenWindows(_windows()), "eval_dataset": TokenWindows(_windows(4))}
    with pytest.raises(UserInputError, match="the model itself"):
        recover(a, byte_tokenizer, max_steps=2, shared_with=[a], **data, **FAST)
    with pytest.raises(UserInputError, match="repeated"):
        recover(a, byte_tokenizer, max_steps=2, shared_with=[b, b], **data, **FAST)
    with pytest.raises(UserInputError, match="one base model"):
        recover(a, byte_tokenizer, max_steps=2, shared_with=[other], **data, **FAST)
    with pytest.raises(UserInputError, match="method=PROMPT"):
        recover(a, byte_tokenizer, max_steps=2, shared_with=[b], method="LORA", **data, **FAST)
    with pytest.raises(UserInputError, match="no teacher"):
        recover(a, byte_tokenizer, max_steps=2, shared_with=[b], teacher=copy.deepcopy(b), **data, **FAST)
    for model in (a, b):
        assert recovery_prompt_of(model) is None
        assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in state.items())
