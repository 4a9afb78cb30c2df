"""Recovery by distillation: train the prompt (or LoRA, or the weights) to match the uncompressed model's next-token
distributions instead of the corpus' next tokens.

The paper trains on the language-modelling loss. The compressed model's perplexity gap is a gap to the dense model,
so the dense model's full distribution at every position (KL(teacher || student)) is a richer, lower-variance target
than one sampled token; it costs one forward pass of the teacher per step. Validation stays the corpus perplexity,
so the best-validation selection compares the same quantity with or without a teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._logging import get_logger
from ..errors import UserInputError
from .losses import LanguageModellingTrainer
from .runtime import recovery_prompt_of

__all__ = ["DistillationTrainer", "check_teacher", "distillation_loss"]

logger = get_logger(__name__)


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Refuses a teacher that is the student itself or has another vocabulary; warns if it carries a recovery
    prompt (it would teach the prompted distributions)."""

    base = student.get_base_model() if hasattr(student, "get_base_model") else student
    if teacher is student or teacher is base:
        raise UserInputError("the teacher must be another model (e.g. the uncompressed one), not the student")
    vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
    if vocab is not None and vocab != getattr(base.config, "vocab_size", vocab):
        raise UserInputError(f"teacher vocabulary {vocab} != student vocabulary {base.config.vocab_size}")
    if recovery_prompt_of(teacher) is not None:
        logger.warning("the teacher has a recovery prompt attached: the student learns its prompted distributions")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Mean over the real positions of KL(teacher || student) between next-token distributions, times
    ``temperature ** 2`` (Hinton et al.), computed in fp32.

    Args:
        student_logits (`torch.Tensor` of shape `(batch, prefix + length, vocab)`): a prompt-tuned student's logits
            start with its virtual positions; the last ``length`` are compared.
        teacher_logits (`torch.Tensor` of shape `(batch, length, vocab)`).
        attention_mask (`torch.Tensor` of shape `(batch, length)`, *optional*): positions with 0 are left out.
        temperature (`float`): both distributions are softened by it.
    """
    if student_logits.shape[0] != teacher_logits.shape[0] or student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise UserInputError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} differ in batch or vocabulary size")
    length = teacher_logits.shape[1]
    student = F.log_softmax(student_logits[:, -length:].float() / temperature, dim=-1)  # (B, L, V)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # (B, L)
    if attention_mask is not None:
        kl = kl[attention_mask.bool()]
    return kl.mean() * temperature**2


class DistillationTrainer(LanguageModellingTrainer):
    """A ``transformers.Trainer`` whose training loss is :func:`distillation_loss` against ``teacher`` (frozen, run
    without gradients on the same ``input_ids``); evaluation keeps the language-modelling loss (computed in chunks,
    and the frozen weights held in bf16 while training: :class:`~.losses.LanguageModellingTrainer`).
    ``recover(..., teacher=...)`` builds it with the package's one Trainer set-up (:mod:`~.trainer_setup`).

    Args:
        teacher (`nn.Module`): a causal LM with the student's vocabulary, usually the uncompressed model. It must
            not be the student itself, and should carry no recovery prompt.
        temperature (`float`, defaults to 1.0).
        *args, **kwargs: passed to :class:`~.losses.LanguageModellingTrainer` (``loss_chunk_size``, ...) and
            ``Trainer``.
    """

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps

    def __init__(self, *args, teacher: nn.Module, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if temperature <= 0:
            raise UserInputError(f"temperature={temperature} must be > 0")
        check_teacher(self.accelerator.unwrap_model(self.model), teacher)
        self.teacher = teacher.eval()
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # validation: the corpus perplexity, comparable with training without a teacher
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**inputs)
        device = next(self.teacher.parameters()).device
        with torch.no_grad(), self.accelerator.autocast():  # the student's mixed precision (accelerate wraps only it)
            teacher_logits = self.teacher(
                input_ids=inputs["input_ids"].to(device),
                attention_mask=None if inputs.get("attention_mask") is None else inputs["attention_mask"].to(device),
            ).logits.to(outputs.logits.device)
        loss = distillation_loss(outputs.logits, teacher_logits, inputs.get("attention_mask"), self.temperature)
        return (loss, outputs) if return_outputs else loss
