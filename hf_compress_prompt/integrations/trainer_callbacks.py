"""``transformers.Trainer`` callbacks for recovery training."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from .._logging import get_logger

__all__ = ["BestValidationCallback"]

logger = get_logger(__name__)

BEST_STATE_FILE = "best_trainable.safetensors"


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    """The parameters that train (a prompt, LoRA matrices, or all weights), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class BestValidationCallback(TrainerCallback):
    """Keeps the trainable parameters (a soft prompt, LoRA matrices, ...) with the best validation loss seen during
    training and puts them back at the end (``Trainer(..., eval_strategy="steps")``; nothing written to disk for
    it, a prompt is small). The last step is always evaluated, so the final parameters compete too.

    It also writes the best parameters into every checkpoint folder, so ``trainer.train(resume_from_checkpoint=...)``
    continues with the best parameters and validation history it had.

    An evaluation run inside :meth:`measuring_baseline` (before training, with the adapter disabled: the model
    as it was) is recorded first in the history as ``{"step": 0, ..., "baseline": True}`` and never competes.

    Attributes:
        best_loss (`float`), best_step (`int`): the best ``eval_loss`` and the step it was measured at.
        history (`list[dict]`): ``{"step", "eval_loss", "perplexity"}`` per evaluation, the baseline first.
        best_state (`dict[str, torch.Tensor]`): CPU copies of the best trainable parameters, by name.
    """

    def __init__(self, metric: str = "eval_loss"):
        self.metric = metric
        self.best_loss = math.inf
        self.best_step = -1
        self.history: list[dict] = []
        self.best_state: dict[str, torch.Tensor] | None = None
        self._measuring_baseline = False

    @property
    def best_perplexity(self) -> float:
        return math.exp(self.best_loss) if math.isfinite(self.best_loss) else math.inf

    @property
    def baseline(self) -> dict | None:
        """The history entry measured before training (:meth:`measuring_baseline`), if any."""
        return next((e for e in self.history if e.get("baseline")), None)

    @contextlib.contextmanager
    def measuring_baseline(self):
        """Evaluations inside this context record the baseline (``trainer.evaluate()`` before ``trainer.train()``)."""
        self._measuring_baseline = True
        try:
            yield self
        finally:
            self._measuring_baseline = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            return
        # resumed: rebuild the validation history from the trainer state, the best parameters from the checkpoint
        baseline = [self.baseline] if self.baseline else []
        rebuilt = [{"step": e["step"], "eval_loss": e[self.metric], "perplexity": math.exp(e[self.metric])}
                   for e in state.log_history if self.metric in e and e.get("step", 0) > 0]
        self.history = baseline + rebuilt
        if rebuilt:
            best = min(rebuilt, key=lambda e: e["eval_loss"])
            self.best_loss, self.best_step = best["eval_loss"], best["step"]
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / BEST_STATE_FILE
        if saved.is_file():
            from safetensors.torch import load_file

            self.best_state = load_file(str(saved))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps > 0:
            control.should_evaluate = True  # the final parameters compete too, whatever eval_steps is
        return control

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not metrics or self.metric not in metrics or model is None:
            return
        loss = float(metrics[self.metric])
        if self._measuring_baseline:
            self.history = [e for e in self.history if not e.get("baseline")]
            self.history.insert(0, {"step": state.global_step, "eval_loss": loss, "perplexity": math.exp(loss),
                                    "baseline": True})
            return
        if self.history and self.history[-1]["step"] == state.global_step and not self.history[-1].get("baseline"):
            return  # evaluated twice at one step (the final step was also an eval step)
        self.history.append({"step": state.global_step, "eval_loss": loss, "perplexity": math.exp(loss)})
        if loss < self.best_loss:
            self.best_loss, self.best_step = loss, state.global_step
            self.best_state = {n: p.detach().to("cpu", copy=True) for n, p in _trainable(model).items()}
            logger.info("step %d: best validation perplexity so far %.3f", state.global_step, math.exp(loss))

    def on_save(self, args, state, control, **kwargs):
        if self.best_state is None or not state.is_world_process_zero:
            return
        from safetensors.torch import save_file

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            save_file({n: t.contiguous() for n, t in self.best_state.items()}, str(folder / BEST_STATE_FILE))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.best_state is not None and model is not None:
            params = _trainable(model)
            with torch.no_grad():
                for name, value in self.best_state.items():
                    params[name].copy_(value.to(params[name].device, params[name].dtype))
            logger.info("restored the parameters of step %d (validation perplexity %.3f)", self.best_step, self.best_perplexity)
