"""hf_compress_prompt: compress a causal LM and recover its quality with a learned soft prompt.

Submodules: ``models`` (the embedded SmolLM2 default, loading), ``data`` (corpora, token batches),
``evaluation`` (perplexity), ``cli``.
"""

from .data import calibration_batches, eval_tokens, list_corpora, load_text
from .errors import MissingResourceError, UserInputError
from .evaluation import PerplexityResult, perplexity
from .models import DEFAULT_MODEL_NAME, default_model_path, load_model_and_tokenizer, locate_default_gguf

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL_NAME",
    "MissingResourceError",
    "PerplexityResult",
    "UserInputError",
    "calibration_batches",
    "default_model_path",
    "eval_tokens",
    "list_corpora",
    "load_model_and_tokenizer",
    "load_text",
    "locate_default_gguf",
    "perplexity",
]
