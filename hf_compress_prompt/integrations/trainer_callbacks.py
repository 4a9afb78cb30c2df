"""``transformers.Trainer`` callbacks for recovery training."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from .._logging import get_logger

__all__ = ["BestPromptCallback"]

logger = get_logger(__name__)

BEST_PROMPT_FILE = "best_prompt.safetensors"


def _prompt_parameter(model) -> torch.nn.Parameter:
    """The trainable prompt embedding of a PEFT prompt-tuning model (the active adapter)."""
    peft_model = model
    while not hasattr(peft_model, "prompt_encoder") and hasattr(peft_model, "module"):
        peft_model = peft_model.module  # unwrap DDP / accelerate wrappers
    if not hasattr(peft_model, "prompt_encoder"):
        raise TypeError(f"BestPromptCallback needs a PEFT prompt-learning model, got {type(model).__name__}")
    return peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight


class BestPromptCallback(TrainerCallback):
    """Keeps the prompt with the best validation loss seen during training and puts it back at the end
    (``Trainer(..., eval_strategy="steps")``; no model checkpoints needed, the prompt is small).

    It also writes that best prompt into every checkpoint folder, so ``trainer.train(resume_from_checkpoint=...)``
    continues with the best prompt and validation history it had.

    Attributes:
        best_loss (`float`), best_step (`int`): the best ``eval_loss`` and the step it was measured at.
        history (`list[dict]`): ``{"step", "eval_loss", "perplexity"}`` per evaluation.
        best_prompt (`torch.Tensor`): a CPU copy of the best prompt embedding.
    """

    def __init__(self, metric: str = "eval_loss"):
        self.metric = metric
        self.best_loss = math.inf
        self.best_step = -1
        self.history: list[dict] = []
        self.best_prompt: torch.Tensor | None = None

    @property
    def best_perplexity(self) -> float:
        return math.exp(self.best_loss) if math.isfinite(self.best_loss) else math.inf

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            return
        # resumed: rebuild the validation history from the trainer state, the best prompt from the checkpoint
        self.history = [{"step": e["step"], "eval_loss": e[self.metric], "perplexity": math.exp(e[self.metric])}
                        for e in state.log_history if self.metric in e]
        if self.history:
            best = min(self.history, key=lambda e: e["eval_loss"])
            self.best_loss, self.best_step = best["eval_loss"], best["step"]
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / BEST_PROMPT_FILE
        if saved.is_file():
            from safetensors.torch import load_file

            self.best_prompt = load_file(str(saved))["prompt"]

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps > 0:
            control.should_evaluate = True  # the final prompt competes too, whatever eval_steps is
        return control

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not metrics or self.metric not in metrics or model is None:
            return
        loss = float(metrics[self.metric])
        if self.history and self.history[-1]["step"] == state.global_step:
            return  # evaluated twice at one step (the final step was also an eval step)
        self.history.append({"step": state.global_step, "eval_loss": loss, "perplexity": math.exp(loss)})
        if loss < self.best_loss:
            self.best_loss, self.best_step = loss, state.global_step
            self.best_prompt = _prompt_parameter(model).detach().to("cpu", copy=True)
            logger.info("step %d: best validation perplexity so far %.3f", state.global_step, math.exp(loss))

    def on_save(self, args, state, control, **kwargs):
        if self.best_prompt is None or not state.is_world_process_zero:
            return
        from safetensors.torch import save_file

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            save_file({"prompt": self.best_prompt.contiguous()}, str(folder / BEST_PROMPT_FILE))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.best_prompt is not None and model is not None:
            with torch.no_grad():
                parameter = _prompt_parameter(model)
                parameter.copy_(self.best_prompt.to(parameter.device, parameter.dtype))
            logger.info("restored the prompt of step %d (validation perplexity %.3f)", self.best_step, self.best_perplexity)
