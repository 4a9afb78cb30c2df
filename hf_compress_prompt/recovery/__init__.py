"""Soft-prompt recovery: train a PEFT prompt-tuning adapter (or a prefix: keys and values in every layer) on a frozen
compressed model, save it in PEFT format, and run the model with it attached (forward, ``generate``, ``pipeline``;
the prompt's key/value cache is computed once)."""

from .io import PROMPT_SUBFOLDER, load_recovery_prompt, save_recovery_prompt
from .prefix import RecoveryPrefix
from .runtime import (
    RecoveryPrompt,
    add_recovery_methods,
    attach_recovery_prompt,
    detach_recovery_prompt,
    disable_recovery_prompt,
    enable_recovery_prompt,
    prefix_of_prompt,
    recovery_prompt_of,
)

__all__ = [
    "PROMPT_SUBFOLDER",
    "RecoveryPrefix",
    "RecoveryPrompt",
    "add_recovery_methods",
    "attach_recovery_prompt",
    "detach_recovery_prompt",
    "disable_recovery_prompt",
    "enable_recovery_prompt",
    "load_recovery_prompt",
    "prefix_of_prompt",
    "recovery_prompt_of",
    "save_recovery_prompt",
]
