"""lm-evaluation-harness integration: our models (packed layers, attached recovery prompt) as an ``lm_eval``
model, and the LLM-KICK tasks as ``lm_eval`` task configs (``lm_eval_tasks/``).

    import lm_eval
    from hf_compress_prompt.integrations.lm_eval_harness import CompressedLM, task_manager

    lm = CompressedLM(pretrained="out/smollm2-sparse-w4", batch_size=8)     # or pretrained=<loaded model>
    results = lm_eval.simple_evaluate(model=lm, tasks=["kick"], task_manager=task_manager(), limit=50)

From the command line: ``lm_eval --model hf_compress_prompt --model_args pretrained=<folder> --tasks kick
--include_path $(python -c "import hf_compress_prompt.integrations.lm_eval_harness as m; print(m.TASKS_DIR)")``
after ``import hf_compress_prompt.integrations.lm_eval_harness`` has registered the model (e.g. through
``python -m hf_compress_prompt.integrations.lm_eval_harness <lm_eval arguments>``).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from ..errors import MissingResourceError, UserInputError
from ..recovery.runtime import detach_recovery_prompt, recovery_prompt_of
from .checkpoints import from_pretrained

__all__ = ["CompressedLM", "TASKS_DIR", "task_manager"]

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # the optional extra is not installed
    raise MissingResourceError("the lm-evaluation-harness integration needs lm-eval: pip install "
                               "'hf_compress_prompt[lm-eval]'") from error


@register_model("hf_compress_prompt")
class CompressedLM(HFLM):
    """``HFLM`` over a model loaded by :func:`hf_compress_prompt.from_pretrained` (packed layers, GPTQ imports,
    the saved recovery prompt attached), or over an already loaded model (``pretrained=<PreTrainedModel>``, with
    ``tokenizer=``). The prompt applies itself in ``forward`` and ``generate``, which is all ``HFLM`` calls.

    Args:
        recovery_prompt (`bool`, *optional*, defaults to `True`): `False` scores the model without its recovery
            prompt (a saved folder's prompt is not applied; a loaded model has its prompt disabled:
            ``model.enable_recovery_prompt()`` turns it back on). From the command line:
            ``--model_args pretrained=<folder>,recovery_prompt=False``.
        Other arguments are ``HFLM``'s; an argument neither knows is an error (``HFLM`` would ignore it silently).
    """

    def __init__(self, pretrained, tokenizer=None, dtype=None, recovery_prompt: bool | str = True, **kwargs):
        unknown = sorted(set(kwargs) - _HFLM_ARGUMENTS)
        if unknown:
            raise UserInputError(f"unknown model arguments {unknown} for hf_compress_prompt; it takes recovery_prompt "
                                 f"and HFLM's: {', '.join(sorted(_HFLM_ARGUMENTS))}")
        with_prompt = _as_bool(recovery_prompt, "recovery_prompt")
        if isinstance(pretrained, (str, Path)):
            import torch


            folder = str(pretrained)
            torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
            pretrained = from_pretrained(folder, **({"dtype": torch_dtype} if torch_dtype is not None else {}))
            if not with_prompt:

                if recovery_prompt_of(pretrained) is not None:
                    detach_recovery_prompt(pretrained)  # our own freshly loaded copy: score the bare weights
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(folder)
        elif not with_prompt and hasattr(pretrained, "disable_recovery_prompt"):
            pretrained.disable_recovery_prompt()
        kwargs.setdefault("device", str(next(pretrained.parameters()).device))
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)


_HFLM_ARGUMENTS = frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "pretrained", "tokenizer", "dtype",
                                                                            "kwargs"}


def _as_bool(value: bool | str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UserInputError(f"{name}={value!r} is not a boolean; pass True or False")


def task_manager(include_defaults: bool = True):
    """An ``lm_eval`` ``TaskManager`` that also knows the LLM-KICK tasks (``kick`` and ``kick_*``)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


if __name__ == "__main__":  # python -m hf_compress_prompt.integrations.lm_eval_harness <lm_eval CLI arguments>
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *sys.argv[1:], "--include_path", str(TASKS_DIR)]
    cli_evaluate()
