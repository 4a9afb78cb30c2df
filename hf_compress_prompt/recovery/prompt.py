"""A recovery prompt: the learned soft-prompt embeddings and what they were trained on. Written and read by
:mod:`.io`, attached to a model by :mod:`.runtime`, trained by :mod:`.train`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["RecoveryPrompt"]


@dataclass
class RecoveryPrompt:
    """A trained soft prompt and what it was trained on.

    Attributes:
        embedding (`torch.Tensor` of shape `(num_virtual_tokens, hidden_size)`): the virtual tokens' embeddings.
        metadata (`dict`): base model, compression recipe, data, steps, best validation perplexity, vocabulary size.
    """

    embedding: torch.Tensor
    metadata: dict = field(default_factory=dict)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]
