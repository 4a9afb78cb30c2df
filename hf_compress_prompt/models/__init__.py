"""Finding and loading models: the embedded SmolLM2 default, GGUF conversion, any causal LM."""

from .default_model import (
    DEFAULT_MODEL_ALIASES,
    DEFAULT_MODEL_NAME,
    cached_gguf_conversion,
    convert_gguf,
    default_model_path,
    locate_default_gguf,
    model_cache_dir,
)
from .loading import load_model_and_tokenizer, resolve_model_source

__all__ = [
    "DEFAULT_MODEL_ALIASES",
    "DEFAULT_MODEL_NAME",
    "cached_gguf_conversion",
    "convert_gguf",
    "default_model_path",
    "load_model_and_tokenizer",
    "locate_default_gguf",
    "model_cache_dir",
    "resolve_model_source",
]
