"""Data: registered text corpora (local files, the Hub, or the built-in Wikipedia sample), token batches, and
instruction sets (Alpaca-style JSONL) as training windows."""

from .corpora import (
    DATA_ENV_VAR,
    Corpus,
    DataSource,
    HubSplit,
    data_root,
    get_corpus,
    list_corpora,
    load_rows,
    load_text,
    register_corpus,
    training_corpus,
)
from .instructions import instruction_windows
from .tokens import calibration_batches, eval_tokens

__all__ = [
    "DATA_ENV_VAR",
    "Corpus",
    "DataSource",
    "HubSplit",
    "calibration_batches",
    "data_root",
    "eval_tokens",
    "get_corpus",
    "instruction_windows",
    "list_corpora",
    "load_rows",
    "load_text",
    "register_corpus",
    "training_corpus",
]
