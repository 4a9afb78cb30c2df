"""The chunked linear + cross-entropy loss: the same loss and gradients as the logits-then-cross-entropy it replaces
(fp32 and bf16 autocast, -100 labels, a trained head), and through a model (prompt tuning, LoRA, the whole model)."""

import pytest
import torch
import torch.nn.functional as F

from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.recovery.data import PromptTuningCollator
from hf_compress_prompt.recovery.losses import causal_lm_loss, head_is_last, linear_cross_entropy, without_output_head

VOCAB, HIDDEN = 300, 64


def _problem(n=37, seed=0, ignored=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, n, HIDDEN, generator=g, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.3).requires_grad_()
    bias = (torch.randn(VOCAB, generator=g) * 0.1).requires_grad_()
    labels = torch.randint(0, VOCAB, (2, n), generator=g)
    labels[torch.rand(2, n, generator=g) < ignored] = -100
    return hidden, weight, bias, labels


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


CASES = {  # name -> (autocast dtype or None, loss tolerance, relative gradient tolerance)
    "fp32": (None, 1e-5, 1e-5),
    "bf16": (torch.bfloat16, 1e-2, 2e-2),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_loss_and_gradients_equal_plain_cross_entropy(case, chunk):
    dtype, atol, rtol = CASES[case]
    hidden, weight, bias, labels = _problem()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        plain = F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, 1), labels.flatten())
        chunked = linear_cross_entropy(hidden, weight, labels, bias, chunk_size=chunk)
    assert chunked.dtype == torch.float32 and abs(chunked.item() - plain.item()) < atol
    for ref, got in zip(_grads(plain, hidden, weight, bias), _grads(chunked, hidden, weight, bias)):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert (got - ref).norm() <= rtol * ref.norm()


def test_ignored_positions_and_num_items():
    hidden, weight, _, labels = _problem(ignored=0.5)
    plain = F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), labels.flatten(), reduction="sum") / 100
    chunked = linear_cross_entropy(hidden, weight, labels, num_items=100, chunk_size=7)
    assert torch.allclose(chunked, plain, atol=1e-5)
    (g_plain,), (g_chunked,) = _grads(plain, hidden), _grads(chunked, hidden)
    assert torch.allclose(g_chunked, g_plain, atol=1e-6)
    assert torch.all(g_chunked[labels == -100] == 0) and torch.all(g_chunked[labels != -100].abs().sum(-1) > 0)
    labels[:] = -100  # nothing scored: NaN, as F.cross_entropy gives
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels))


def test_frozen_head_gets_no_gradient_and_refusals():
    hidden, weight, _, labels = _problem()
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with pytest.raises(UserInputError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(UserInputError, match="labels must lie"):
        linear_cross_entropy(hidden, weight, labels.clamp(min=0) + VOCAB)
    with pytest.raises(UserInputError, match="do not fit"):
        linear_cross_entropy(hidden, weight, labels[:, 1:])


def _batch(seqlen=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(3, 250, (seqlen,), generator=g)},
            {"input_ids": torch.randint(3, 250, (seqlen - 5,), generator=g)}]  # padded: -100 labels at the end
    return PromptTuningCollator(pad_token_id=0)(rows)


def _prompt(model):
    from peft import PromptTuningConfig

    from hf_compress_prompt.integrations.peft_compat import get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))


def _lora(model):
    from hf_compress_prompt.recovery.train import RecoveryConfig, lora_model

    peft = lora_model(model, RecoveryConfig(method="LORA"))
    for name, p in peft.named_parameters():  # LoRA's B starts at zero: move it so the adapter changes the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return peft


def _full(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


WRAPS = {"prompt": _prompt, "lora": _lora, "full": _full}


@pytest.mark.parametrize("method", WRAPS)
@pytest.mark.parametrize("bf16", [False, True])
def test_model_loss_and_trainable_gradients_equal_the_models_own(method, bf16):
    from builders import build_tiny_llama

    trained = WRAPS[method](build_tiny_llama())
    trained.train()
    batch = _batch()
    params = [p for p in trained.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        own = trained(**batch).loss
        chunked, outputs = causal_lm_loss(trained, batch, chunk_size=8)
    assert outputs.loss is chunked and outputs.get("logits") is None
    assert abs(chunked.item() - own.item()) < (2e-2 if bf16 else 1e-5)
    rtol = 3e-2 if bf16 else 1e-4
    ref, got = _grads(own, *params), _grads(chunked, *params)
    assert sum(g.norm() for g in ref) > 0  # the comparison is not between zeros
    for r, g in zip(ref, got):
        assert (g - r).norm() <= rtol * r.norm() + 1e-7
    if method == "full":  # the tied head's gradient (projection + embedding) reached the weight
        weight = trained.get_output_embeddings().weight
        (g_w,) = _grads(causal_lm_loss(trained, batch)[0], weight)
        assert g_w.abs().sum() > 0


def test_head_is_put_back_and_soft_capping_detected():
    from builders import build_llama, build_tiny_llama

    model = build_tiny_llama()
    head = model.lm_head
    with pytest.raises(RuntimeError, match="inside"), without_output_head(model):
        assert model.lm_head is not head
        raise RuntimeError("inside")
    assert model.lm_head is head
    assert head_is_last(model)

    capped = build_llama()
    original = type(capped).forward

    def forward(self, *args, **kwargs):  # a model that soft-caps its logits after the head (as Gemma 2 does, at 30)
        out = original(self, *args, **kwargs)
        out.logits = 2 * torch.tanh(out.logits / 2)
        return out

    capped.forward = forward.__get__(capped)
    assert not head_is_last(capped)


def test_prefix_tuning_loss_equals_the_models_own():
    from builders import build_tiny_llama
    from peft import PrefixTuningConfig

    from hf_compress_prompt.integrations.peft_compat import get_peft_model

    torch.manual_seed(0)
    trained = get_peft_model(build_tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    trained.train()
    batch = _batch()
    params = [p for p in trained.parameters() if p.requires_grad]
    own = trained(**batch).loss
    chunked, _ = causal_lm_loss(trained, batch, chunk_size=8)
    assert abs(chunked.item() - own.item()) < 1e-5
    for r, g in zip(_grads(own, *params), _grads(chunked, *params)):
        assert (g - r).norm() <= 1e-4 * r.norm()


LOSS_SETUPS = {  # the loss recover() trains -> the extra models it needs (built fresh for each run)
    "language modelling": lambda build: {},
    "shared prompt": lambda build: {"shared_with": [build(initializer_range=0.12)]},
    "distillation": lambda build: {"teacher": build(initializer_range=0.12)},
}


@pytest.mark.parametrize("loss", LOSS_SETUPS)
@pytest.mark.parametrize("bf16", [False, True])
def test_recover_with_the_chunked_loss_and_cast_weights_equals_the_plain_loss(bf16, loss, byte_tokenizer,
                                                                              monkeypatch):
    from builders import build_llama

    from hf_compress_prompt.recovery import losses
    from hf_compress_prompt.recovery.data import TokenWindows
    from hf_compress_prompt.recovery.train import recover

    calls = []
    original = losses.causal_lm_loss
    monkeypatch.setattr(losses, "causal_lm_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    g = torch.Generator().manual_seed(0)
    windows = torch.where(torch.rand(10, 32, generator=g) < 0.2, torch.randint(3, 250, (10, 32), generator=g), 7)
    train, valid = TokenWindows(windows[:8]), TokenWindows(windows[8:])  # mostly token 7: a prompt can learn it
    settings = {"num_virtual_tokens": 4, "seqlen": 32, "batch_size": 2, "eval_steps": 2, "eval_windows": 2,
                "bf16": bf16, "learning_rate": 0.03, "max_steps": 4}
    runs = {}
    for name, fast in {"plain": (0, False), "fast": (16, True)}.items():
        model = build_llama(initializer_range=0.1)
        extra = LOSS_SETUPS[loss](build_llama)
        frozen = [model, *extra.get("shared_with", [])]
        weights = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen]
        calls.clear()
        runs[name] = recover(model, byte_tokenizer, train_dataset=train, eval_dataset=valid,
                             loss_chunk_size=fast[0], cast_frozen_weights=fast[1], **extra, **settings)
        assert bool(calls) == (name == "fast")  # the chunked loss ran (training and validation) only when asked
        for m, before in zip(frozen, weights):  # fp32 weights given back
            assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    plain, fast = ([h["eval_loss"] for h in runs[n].history] for n in ("plain", "fast"))
    assert len(plain) == len(fast) == 3
    assert max(abs(a - b) for a, b in zip(plain, fast)) < (2e-2 if bf16 else 1e-4)
    assert plain[-1] < plain[0] - 0.05  # the prompt learnt: the curves compared are not flat
    difference = (runs["fast"].prompt.embedding - runs["plain"].prompt.embedding).norm()
    assert difference <= (5e-2 if bf16 else 1e-3) * runs["plain"].prompt.embedding.norm()


@pytest.mark.parametrize(("method", "chunk"), [("PROMPT", 0), ("PROMPT", 16), ("LORA", 0)])
def test_bf16_training_steps_run_under_autocast(method, chunk, byte_tokenizer):
    """recover()'s baseline validation disables the adapter; for a prompt, PEFT then puts back a forward without
    accelerate's autocast wrapper, and the steps used to run in fp32 despite bf16=True."""
    from builders import build_llama
    from transformers import TrainerCallback

    from hf_compress_prompt.recovery.data import TokenWindows
    from hf_compress_prompt.recovery.train import recover

    model = build_llama(initializer_range=0.1)
    seen = {True: [], False: []}  # training mode -> autocast enabled in each forward of a block linear

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.hook = model.model.layers[0].mlp.up_proj.register_forward_pre_hook(
                lambda m, a: seen[m.training].append(torch.is_autocast_enabled("cpu")))

        def on_train_end(self, args, state, control, **kwargs):
            self.hook.remove()

    windows = torch.randint(3, 250, (6, 32), generator=torch.Generator().manual_seed(0))
    recover(model, byte_tokenizer, train_dataset=TokenWindows(windows[:4]), eval_dataset=TokenWindows(windows[4:]),
            method=method, loss_chunk_size=chunk, num_virtual_tokens=4, seqlen=32, batch_size=2, eval_steps=2, eval_windows=2, bf16=True,
            max_steps=2, callbacks=[Watch()])
    assert len(seen[True]) == 2 and all(seen[True])  # both steps
    assert seen[False] and all(seen[False])  # and the validation during training
