import pytest
import torch

from hf_compress_prompt.data import calibration_batches, eval_tokens, load_text
from hf_compress_prompt.errors import UserInputError


def test_eval_tokens_tokenizes_the_joined_split_once(data_dir, byte_tokenizer):
    ids = eval_tokens("wikitext2", byte_tokenizer, "test")
    expected = byte_tokenizer(load_text("wikitext2", "test"))["input_ids"]
    assert ids.shape == (1, len(expected)) and ids.dtype == torch.long
    assert ids[0].tolist() == expected


def test_calibration_windows_are_deterministic_and_seeded(data_dir, byte_tokenizer):
    a = calibration_batches("ptb", byte_tokenizer, nsamples=5, seqlen=16, seed=0, split="test")
    b = calibration_batches("ptb", byte_tokenizer, nsamples=5, seqlen=16, seed=0, split="test")
    c = calibration_batches("ptb", byte_tokenizer, nsamples=5, seqlen=16, seed=1, split="test")
    assert a.shape == (5, 16) and torch.equal(a, b) and not torch.equal(a, c)


def test_document_corpora_sample_windows_inside_one_long_document(data_dir, byte_tokenizer):
    # Only the second C4 document has >= 40 byte tokens, so every window must come from it.
    from builders import C4_DOCS

    long_doc = byte_tokenizer(C4_DOCS[1])["input_ids"]
    windows = calibration_batches("c4", byte_tokenizer, nsamples=8, seqlen=40, seed=3)
    for row in windows.tolist():
        assert any(long_doc[s : s + 40] == row for s in range(len(long_doc) - 39))


def test_document_corpora_fall_back_to_the_joined_stream(data_dir, byte_tokenizer):
    # No document has 120 tokens, the joined stream does.
    windows = calibration_batches("c4", byte_tokenizer, nsamples=3, seqlen=120, seed=0)
    stream = byte_tokenizer(load_text("c4", "train"))["input_ids"]
    assert windows.shape == (3, 120)
    for row in windows.tolist():
        assert any(stream[s : s + 120] == row for s in range(len(stream) - 119))


def test_a_corpus_shorter_than_one_window_is_an_error(data_dir, byte_tokenizer):
    with pytest.raises(UserInputError, match=r"fewer than seqlen=4096"):
        calibration_batches("ptb", byte_tokenizer, nsamples=1, seqlen=4096, split="test")
    with pytest.raises(UserInputError, match=r"nsamples=0"):
        calibration_batches("ptb", byte_tokenizer, nsamples=0, seqlen=8, split="test")
