"""One prompt for several compressed models: train a single soft prompt on two or more compressions of one base model
at once.

A prompt trained on one compression transfers well to other levels of the same method but poorly to another method
(docs/results/transfer_levels.md, recovery.md: a prompt that repairs sparsity does not repair 3-bit rounding error).
Training the prompt on every model it will serve removes the need to transfer: each step runs the same batch through
each model with the same (tied) prompt embedding and minimises the mean of their language-modelling losses. The cost
per step is one forward and backward pass per model; validation is the mean loss too, so the best-validation prompt
is the one with the lowest geometric-mean perplexity over the models. A prefix (method PREFIX: keys and values in
every layer, its projection included) is shared the same way between models of one cache layout.
"""

from __future__ import annotations

from torch import nn

from ..errors import UserInputError
from ..integrations.peft_compat import get_peft_model
from .losses import LanguageModellingTrainer
from .prefix import prefix_layout

__all__ = ["SharedPromptTrainer", "check_partners", "tie_prompt"]


def check_partners(model: nn.Module, partners: list[nn.Module], *, prefix: bool = False) -> None:
    """Refuses partners that are ``model`` itself (or repeated), or have another vocabulary or hidden size: a prompt
    is a sequence of input embeddings and means the same only to models that share them. A prefix (``prefix``) is
    every layer's keys and values: the partners' caches must also have ``model``'s layout."""
    vocab, hidden = model.config.vocab_size, model.get_input_embeddings().embedding_dim
    seen = {id(model)}
    for i, partner in enumerate(partners):
        if id(partner) in seen:
            raise UserInputError(f"shared_with[{i}] is the model itself or repeated; pass each other model once")
        seen.add(id(partner))
        p_vocab = getattr(getattr(partner, "config", None), "vocab_size", None)
        p_hidden = partner.get_input_embeddings().embedding_dim if hasattr(partner, "get_input_embeddings") else None
        if (p_vocab, p_hidden) != (vocab, hidden):
            raise UserInputError(f"shared_with[{i}] has vocabulary {p_vocab} and hidden size {p_hidden}, the model "
                                 f"{vocab} and {hidden}: one prompt can only serve models of one base model")
        if prefix and prefix_layout(partner) != prefix_layout(model):
            raise UserInputError(f"shared_with[{i}] caches {prefix_layout(partner)}, the model {prefix_layout(model)}: "
                                 "one prefix fills caches of one layout (layers, key/value heads, head size)")


def tie_prompt(peft_model: nn.Module, partner: nn.Module, peft_config) -> nn.Module:
    """``partner`` wrapped as a PEFT prompt-tuning (or prefix-tuning) model whose prompt encoder is ``peft_model``'s
    own module (the same parameters, a prefix's projection included, so gradients from both models add up in
    them)."""
    import copy


    config = copy.deepcopy(peft_config)  # PEFT writes the partner's name into the config it is given
    config.base_model_name_or_path = None
    wrapped = get_peft_model(partner, config)
    wrapped.prompt_encoder[wrapped.active_adapter] = peft_model.prompt_encoder[peft_model.active_adapter]
    return wrapped


class SharedPromptTrainer(LanguageModellingTrainer):
    """A ``transformers.Trainer`` whose loss (training and validation) is the mean language-modelling loss of the
    model and ``partners`` on the same batch, all prompted by one tied prompt embedding (:func:`tie_prompt`), each
    computed in chunks and with the frozen weights held in bf16 while training
    (:class:`~.losses.LanguageModellingTrainer`).
    ``recover(..., shared_with=[...])`` builds it with the package's one Trainer set-up (:mod:`~.trainer_setup`).

    Args:
        partners (`list[nn.Module]`): PEFT prompt-tuning models sharing the trained model's prompt embedding; their
            weights are frozen. Only the trained model's parameters reach the optimizer.
        *args, **kwargs: passed to :class:`~.losses.LanguageModellingTrainer` (``loss_chunk_size``, ...) and
            ``Trainer``.
    """

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps

    def __init__(self, *args, partners: list[nn.Module], **kwargs):
        super().__init__(*args, **kwargs)
        self.partners = partners

    def frozen_models(self) -> list[nn.Module]:
        return [self.model, *self.partners]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        first, outputs = self.language_modelling_loss(model, inputs)  # chunked where the model allows (losses.py)
        losses = [first]
        for partner in self.partners:
            device = next(partner.parameters()).device
            with self.accelerator.autocast():  # the trained model's mixed precision (accelerate wraps only it)
                loss, _ = self.language_modelling_loss(partner, {k: v.to(device) for k, v in inputs.items()})
            losses.append(loss.to(first.device))
        loss = sum(losses) / len(losses)
        return (loss, outputs) if return_outputs else loss
