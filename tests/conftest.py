"""Shared fixtures: tiny random Llama and OPT models and a byte-level tokenizer, all built in memory."""

from __future__ import annotations

import gzip
import json

import pytest

from builders import C4_DOCS, PTB_LINES, STORY, TINY_MODELS, TRIVIA, VOCAB, WIKITEXT_RAW, build_tiny_llama


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach the network: the Hub is declared offline for all of them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from hf_compress_prompt.data import corpora

    corpora._hub_unreachable_reason.cache_clear()
    yield
    corpora._hub_unreachable_reason.cache_clear()


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A byte-level tokenizer (every byte is one token, no merges): ids 0-255, eos 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    assert len(tokenizer) <= VOCAB
    return tokenizer


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    """Each tiny architecture in turn (parametrised: adding a family is one entry in TINY_MODELS)."""
    return TINY_MODELS[request.param]()


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture
def tiny_llama_dir(tmp_path, byte_tokenizer):
    """The tiny Llama and the byte tokenizer saved as a checkpoint folder."""
    folder = tmp_path / "tiny-llama"
    build_tiny_llama().save_pretrained(folder)
    byte_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A small folder laid out like ../shared/data, set as $HF_COMPRESS_PROMPT_DATA."""
    root = tmp_path / "data"
    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text(WIKITEXT_RAW)
    (root / "ptb").mkdir()
    (root / "ptb" / "ptb.test.txt").write_text(PTB_LINES)
    (root / "c4").mkdir()
    with gzip.open(root / "c4" / "c4-train.00000-of-01024.first1000.jsonl.gz", "wt") as f:
        for doc in C4_DOCS:
            f.write(json.dumps({"text": doc, "url": "x"}) + "\n")
    monkeypatch.setenv("HF_COMPRESS_PROMPT_DATA", str(root))
    return root


@pytest.fixture
def task_data_dir(data_dir):
    """TriviaQA, MMLU (two subjects) and CNN/DailyMail stories laid out like ../shared/data."""
    (data_dir / "triviaqa").mkdir()
    with open(data_dir / "triviaqa" / "triviaqa_sm_sub.jsonl", "w") as f:
        for q, a, aliases in TRIVIA:
            f.write(json.dumps({"context": f"Question: {q}\nAnswer:", "answer": a, "aliases": aliases}) + "\n")
    for split, n in (("dev", 5), ("test", 3)):
        (data_dir / "mmlu" / split).mkdir(parents=True)
        for subject in ("astronomy", "virology"):
            rows = [f'"{subject} question {i}?",one,two,three,four,{"ABCD"[i % 4]}' for i in range(n)]
            (data_dir / "mmlu" / split / f"{subject}_{split}.csv").write_text("\n".join(rows) + "\n")
    for size in ("small", "mid", "large"):
        folder = data_dir / "cnn_dailymail" / "llm-kick-selected" / size
        folder.mkdir(parents=True)
        (folder / f"{size}1.story").write_text(STORY.replace("Maria", f"Maria{size.title()}"))
    return data_dir
