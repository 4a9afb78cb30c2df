"""Integrations with the Hugging Face stack: the transformers quantization method (registered on import),
checkpoints (atomic saves, GPTQ loading), the Hub, PEFT and Trainer callbacks.

Importing it also gives a model with a recovery prompt attached its ``save_pretrained`` (the prompt is saved beside
the weights) and ``push_to_hub`` (uploaded with them): :mod:`.checkpoints` and :mod:`.hub` register them with
:func:`hf_compress_prompt.recovery.runtime.register_prompt_method`.
"""

from . import checkpoints, hub  # noqa: F401  (registers the recovery prompt's save_pretrained and push_to_hub)
from .transformers_quantizer import (
    QUANT_METHOD,
    CompressedConfig,
    CompressedHfQuantizer,
    attach_quantization_config,
    register,
)

register()

__all__ = ["QUANT_METHOD", "CompressedConfig", "CompressedHfQuantizer", "attach_quantization_config", "register"]
