"""hf_compress_prompt: compress a causal LM and recover its quality with a learned soft prompt.

Submodules: ``models`` (the embedded SmolLM2 default, loading), ``data`` (corpora, token batches),
``evaluation`` (perplexity, tasks), ``methods`` (compression maths), ``compressors`` (orchestration, Optimum-style
classes), ``recovery`` (the soft prompt: training, saving, running), ``formats`` (on-disk layouts), ``nn`` (runtime
modules), ``kernels`` (torch.library ops), ``integrations`` (transformers quantization method, checkpoints, Hub),
``cli``. How they depend on each other: docs/architecture.md.

Importing the package registers the ``hf_compress_prompt`` quantization method with transformers, so
``AutoModelForCausalLM.from_pretrained`` can load compressed folders; without the import transformers refuses them.
It also registers the ``pruned_llama`` model type (per-layer head and FFN sizes left by structured pruning).
"""

from .data import calibration_batches, eval_tokens, list_corpora, load_text
from .errors import MissingResourceError, UserInputError
from .evaluation import PerplexityResult, perplexity
from .integrations import CompressedConfig, CompressedHfQuantizer
from .integrations.checkpoints import from_pretrained, save_pretrained
from . import serving
from .integrations.export import export
from .models import DEFAULT_MODEL_NAME, default_model_path, load_model_and_tokenizer, locate_default_gguf
from .models.pruned_llama import PrunedLlamaConfig, PrunedLlamaForCausalLM, register as _register_pruned_llama

_register_pruned_llama()

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL_NAME",
    "CompressedConfig",
    "CompressedHfQuantizer",
    "MissingResourceError",
    "PerplexityResult",
    "PrunedLlamaConfig",
    "PrunedLlamaForCausalLM",
    "UserInputError",
    "calibration_batches",
    "default_model_path",
    "eval_tokens",
    "export",
    "from_pretrained",
    "list_corpora",
    "load_model_and_tokenizer",
    "load_text",
    "locate_default_gguf",
    "perplexity",
    "save_pretrained",
    "serving",
]
