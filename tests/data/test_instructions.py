"""Instruction data: an Alpaca-style JSONL file becomes one right-padded window per sample; a file without the
required keys fails naming them."""

import json

import pytest

from hf_compress_prompt.data import instruction_windows
from hf_compress_prompt.errors import UserInputError


class _CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) % 250 + 3 for ch in text]}


def test_instruction_jsonl_becomes_windows(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"instruction": "Add", "input": "1 2", "output": "3"},
                                                       {"instruction": "Name a colour", "output": "red"}]))
    windows = instruction_windows(path, _CharTokenizer(), 64)
    assert windows.shape == (2, 64) and windows[1, -1] == 0
    text = "### Instruction:\nName a colour\n\n### Response:\nred"  # no input: no Input section
    assert windows[1, :len(text)].tolist() == _CharTokenizer()(text)["input_ids"]
    assert windows[1, len(text):].eq(0).all()  # right-padded with EOS
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(UserInputError, match="instruction"):
        instruction_windows(tmp_path / "bad.jsonl", _CharTokenizer(), 64)


def test_long_samples_are_truncated_to_the_window(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"instruction": "x" * 100, "output": "y"}))
    windows = instruction_windows(path, _CharTokenizer(), 16)
    expected = _CharTokenizer()("### Instruction:\n" + "x" * 100)["input_ids"][:16]
    assert windows.shape == (1, 16) and windows[0].tolist() == expected
