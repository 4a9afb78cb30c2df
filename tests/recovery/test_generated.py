"""Training text the dense model writes itself: sampling, the cache (read back, keyed on what made it, atomic, never
touching other files), windows, chat text and the refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from builders import build_llama, build_tiny_llama

from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.recovery import generated
from hf_compress_prompt.recovery.generated import (
    GenerationSettings,
    generate_texts,
    generated_texts,
    generated_windows,
    text_windows,
)

SMALL = GenerationSettings(count=3, max_new_tokens=12, batch_size=2)


@pytest.fixture
def chat_tokenizer(byte_tokenizer):
    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tokenizer


def test_samples_are_seeded_and_start_as_asked(byte_tokenizer):
    model = build_tiny_llama()
    first = generate_texts(model, byte_tokenizer, SMALL)
    assert len(first) == 3
    assert generate_texts(model, byte_tokenizer, SMALL) == first  # same seed, same texts
    other = generate_texts(model, byte_tokenizer, GenerationSettings(**{**SMALL.__dict__, "seed": 1}))
    assert other != first
    eos = byte_tokenizer.eos_token
    assert all(t.startswith(eos) for t in first)  # unconditional: from BOS (here the EOS token) alone
    started = generate_texts(model, byte_tokenizer, GenerationSettings(**{**SMALL.__dict__, "start_tokens": 4}),
                             starts=["hello world", "abcdefgh", "the cat sat"])
    assert [t[len(eos):len(eos) + 4] for t in started] == ["hell", "abcd", "the "]


def test_the_callers_random_state_and_mode_are_kept(byte_tokenizer):
    model = build_tiny_llama().train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_texts(model, byte_tokenizer, SMALL)
    assert torch.equal(torch.rand(3), expected)
    assert model.training


def test_greedy_is_deterministic_without_a_seed(byte_tokenizer):
    model = build_tiny_llama()
    greedy = [GenerationSettings(**{**SMALL.__dict__, "temperature": 0.0, "seed": s}) for s in (0, 1)]
    assert generate_texts(model, byte_tokenizer, greedy[0]) == generate_texts(model, byte_tokenizer, greedy[1])


def test_chat_text_holds_the_template_question_and_answer(chat_tokenizer):
    model = build_tiny_llama()
    questions = ["what is two plus two?", "name a colour", "who wrote it?", "unused"]
    texts = generate_texts(model, chat_tokenizer, GenerationSettings(kind="chat", count=3, max_new_tokens=8),
                           questions=questions)
    assert len(texts) == 3
    for text, question in zip(texts, questions):
        assert text.startswith(f"<user>{question}{chat_tokenizer.eos_token}<assistant>")
        assert len(text) > len(f"<user>{question}{chat_tokenizer.eos_token}<assistant>")  # an answer follows


def test_cache_is_read_back_keyed_and_leaves_other_files(tmp_path, byte_tokenizer, monkeypatch):
    model = build_tiny_llama()
    (tmp_path / "mine.txt").write_text("a user's file")
    first = generated_texts(model, byte_tokenizer, SMALL, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[0].startswith("generated-") and files[1] == "mine.txt" and len(files) == 2
    assert (tmp_path / "mine.txt").read_text() == "a user's file"

    def refuse(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(generated, "generate_texts", refuse)
    assert generated_texts(model, byte_tokenizer, SMALL, cache_dir=tmp_path) == first
    with pytest.raises(AssertionError):  # other settings, another key
        generated_texts(model, byte_tokenizer, GenerationSettings(**{**SMALL.__dict__, "seed": 5}), cache_dir=tmp_path)
    changed = build_tiny_llama()
    with torch.no_grad():
        changed.get_input_embeddings().weight.mul_(1.5)
    with pytest.raises(AssertionError):  # other weights, another key
        generated_texts(changed, byte_tokenizer, SMALL, cache_dir=tmp_path)


def test_a_truncated_cache_file_is_generated_again(tmp_path, byte_tokenizer):
    model = build_tiny_llama()
    first = generated_texts(model, byte_tokenizer, SMALL, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # an interrupted writer would leave no file; a damaged one is redone
    assert generated_texts(model, byte_tokenizer, SMALL, cache_dir=tmp_path) == first
    header = json.loads(path.read_text().splitlines()[0])
    assert header["texts"] == 3 and len(path.read_text().splitlines()) == 4


def test_the_environment_names_the_cache(tmp_path, byte_tokenizer, monkeypatch):
    monkeypatch.setenv(generated.CACHE_ENV, str(tmp_path / "cache"))
    generated_texts(build_tiny_llama(), byte_tokenizer, SMALL)
    assert len(list((tmp_path / "cache").glob("generated-*.jsonl"))) == 1


def test_windows_join_texts_with_eos(byte_tokenizer):
    eos = byte_tokenizer.eos_token_id
    windows = text_windows(["abc", "de" + byte_tokenizer.eos_token, "fghij"], byte_tokenizer, 4)
    expected = [*byte_tokenizer("abc")["input_ids"], eos, *byte_tokenizer("de")["input_ids"], eos,
                *byte_tokenizer("fghij")["input_ids"], eos]
    assert windows.shape == (3, 4)
    assert windows.flatten().tolist() == expected[:12]
    assert text_windows(["abcdefgh"] * 3, byte_tokenizer, 4, max_windows=2).shape == (2, 4)


def test_generated_windows_train_a_prompt(tmp_path, byte_tokenizer):
    from hf_compress_prompt.recovery.data import TokenWindows
    from hf_compress_prompt.recovery.train import recover

    dense = build_tiny_llama()
    compressed = copy.deepcopy(dense)
    windows = generated_windows(dense, byte_tokenizer, 16, GenerationSettings(count=4, max_new_tokens=24),
                                cache_dir=tmp_path)
    assert windows.shape[1] == 16 and windows.shape[0] >= 4
    result = recover(compressed, byte_tokenizer, num_virtual_tokens=2, max_steps=4, batch_size=2, eval_steps=2,
                     bf16=False, train_dataset=TokenWindows(windows), eval_dataset=TokenWindows(windows[:2]))
    assert result.best_perplexity <= result.baseline_perplexity


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"kind": "poems"}, "kind='poems'"),
    ({"count": 0}, "count=0"),
    ({"top_p": 0.0}, "top_p=0.0"),
    ({"temperature": -1.0}, "temperature=-1.0"),
])
def test_bad_settings_are_named(kwargs, fragment):
    with pytest.raises(UserInputError, match=fragment.replace("(", r"\(")):
        GenerationSettings(**kwargs)


def test_refusals_name_what_is_missing(tmp_path, byte_tokenizer):
    with pytest.raises(UserInputError, match="dense"):
        generated_texts(None, byte_tokenizer, cache_dir=tmp_path)
    with pytest.raises(UserInputError, match="questions"):
        generate_texts(build_tiny_llama(), byte_tokenizer, GenerationSettings(kind="chat"))
    with pytest.raises(UserInputError, match="chat template"):
        generate_texts(build_tiny_llama(), byte_tokenizer, GenerationSettings(kind="chat"), questions=["q"])
    with pytest.raises(UserInputError, match="count=3 texts need as many"):
        generate_texts(build_tiny_llama(), byte_tokenizer, SMALL, starts=["only one"])
    with pytest.raises(UserInputError, match="fewer than one window"):
        text_windows(["ab"], byte_tokenizer, 64)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_recover_on_generated_text_needs_no_dataset(tmp_path, byte_tokenizer, monkeypatch):
    from hf_compress_prompt.recovery import recovery_prompt_of
    from hf_compress_prompt.recovery.train import recover

    monkeypatch.setenv(generated.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr("hf_compress_prompt.recovery.train.training_corpus", None)  # no corpus is read
    dense = build_tiny_llama()
    compressed = copy.deepcopy(dense)
    config = {"dataset": "generated", "generate_count": 4, "generate_tokens": 40, "seqlen": 16, "eval_windows": 2,
              "num_virtual_tokens": 2, "max_steps": 4, "batch_size": 2, "eval_steps": 2, "bf16": False}
    result = recover(compressed, byte_tokenizer, generator=dense, **config)
    assert result.best_perplexity <= result.baseline_perplexity
    assert recovery_prompt_of(compressed) is not None
    assert [p.name.startswith("generated-") for p in tmp_path.iterdir()] == [True]  # generated once, cached
    metadata = result.prompt.metadata
    assert metadata["training"]["dataset"] == "generated" and "generated text" in metadata["validation"]
    # the same request reads the cache: the same windows, so the same baseline
    again = recover(copy.deepcopy(dense), byte_tokenizer, generator=dense, **config)
    assert again.baseline_perplexity == pytest.approx(result.baseline_perplexity)


def test_recover_on_chat_answers(tmp_path, chat_tokenizer, monkeypatch):
    from hf_compress_prompt.recovery.train import recover

    monkeypatch.setenv(generated.CACHE_ENV, str(tmp_path))
    dense = build_tiny_llama()
    result = recover(copy.deepcopy(dense), chat_tokenizer, generator=dense, questions=["why?", "who?", "what?"],
                     dataset="generated", generate_kind="chat", generate_count=3, generate_tokens=40, seqlen=16,
                     eval_windows=1, num_virtual_tokens=2, max_steps=2, batch_size=2, eval_steps=1, bf16=False)
    assert result.prompt is not None
    header = json.loads(next(tmp_path.iterdir()).read_text().splitlines()[0])
    assert header["settings"]["kind"] == "chat" and header["texts"] == 3


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"dataset": "generated"}, "generator=dense_model"),
    ({"generator": True}, "set dataset='generated'"),
    ({"questions": ["q"]}, "set dataset='generated'"),
    ({"dataset": "generated", "generator": True, "generate_kind": "chat"}, "questions"),
    ({"dataset": "generated", "generator": "other vocabulary"}, "vocabulary"),
    ({"dataset": "generated", "generator": True, "generate_count": 1, "generate_tokens": 8}, "fewer than one window"),
    ({"dataset": "generated", "generator": True, "generate_count": 1, "generate_tokens": 40, "eval_windows": 4},
     "eval_windows=4"),
    ({"generate_kind": "poems"}, "generate_kind='poems'"),
    ({"generate_count": 0}, "generate_count=0"),
])
def test_recover_refuses_a_generation_request_it_cannot_serve(tmp_path, byte_tokenizer, monkeypatch, kwargs,
                                                               fragment):
    from hf_compress_prompt.recovery import recovery_prompt_of
    from hf_compress_prompt.recovery.train import recover

    monkeypatch.setenv(generated.CACHE_ENV, str(tmp_path / "cache"))
    dense = build_tiny_llama()
    compressed = copy.deepcopy(dense)
    before = {k: v.clone() for k, v in compressed.state_dict().items()}
    if kwargs.get("generator") is True:
        kwargs = {**kwargs, "generator": dense}
    elif kwargs.get("generator") == "other vocabulary":
        kwargs = {**kwargs, "generator": build_llama(vocab_size=300, num_hidden_layers=2, eos_token_id=256, pad_token_id=256, bos_token_id=256)}
    with pytest.raises(UserInputError, match=fragment.replace("(", r"\(")):
        recover(compressed, byte_tokenizer, seqlen=16, max_steps=2, batch_size=2, num_virtual_tokens=2, bf16=False,
                output_dir=tmp_path / "run", **kwargs)
    assert recovery_prompt_of(compressed) is None
    assert all(torch.equal(before[k], v) for k, v in compressed.state_dict().items())
    assert not (tmp_path / "run").exists()  # nothing trained or written (a too-short text may be cached: it is ours)
