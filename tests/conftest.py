"""Shared fixtures: tiny random Llama and OPT models and a byte-level tokenizer, all built in memory."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

VOCAB = 260  # 256 byte tokens + a few specials


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


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=256, pad_token_id=256, bos_token_id=256,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, word_embed_proj_dim=128, eos_token_id=256, pad_token_id=256, bos_token_id=256,
    )
    torch.manual_seed(0)
    return OPTForCausalLM(config).eval()


TINY_MODELS = {"llama": _tiny_llama, "opt": _tiny_opt}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    """Each tiny architecture in turn (parametrised: adding a family is one entry in TINY_MODELS)."""
    return TINY_MODELS[request.param]()


@pytest.fixture
def tiny_llama():
    return _tiny_llama()


@pytest.fixture
def tiny_llama_dir(tmp_path, byte_tokenizer):
    """The tiny Llama and the byte tokenizer saved as a checkpoint folder."""
    folder = tmp_path / "tiny-llama"
    _tiny_llama().save_pretrained(folder)
    byte_tokenizer.save_pretrained(folder)
    return folder


WIKITEXT_RAW = " \n = Title One = \n \n Some text about the first thing . \n \n = = Part = = \n \n More words here . \n"
PTB_LINES = " no it was n't black monday \n but while the new york stock exchange did n't fall apart \n"
C4_DOCS = [
    "A short first document.",
    "The second document is a little longer than the first one, with more words in it than before.",
    "Third.",
]


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


def shared_data_root() -> Path | None:
    """The real ../shared/data (or $HF_COMPRESS_PROMPT_DATA as set outside the tests), when present."""
    from hf_compress_prompt.data.corpora import _default_roots

    override = os.environ.get("HF_COMPRESS_PROMPT_DATA")
    for root in ([Path(override)] if override else []) + _default_roots():
        if (root / "wikitext-2-raw" / "wiki.test.raw").is_file():
            return root
    return None
