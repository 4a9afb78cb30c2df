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

    def prepend(self, token_embeds: torch.Tensor) -> torch.Tensor:
        """``[prompt; tokens]``: the inputs a model sees with the prompt, `(B, n + L, hidden)` from the tokens'
        embeddings `(B, L, hidden)`, the prompt rounded to their dtype and moved to their device (prompt tuning's
        definition; the runtime's forward without a cache and :mod:`hf_compress_prompt.serving` both build it here)."""
        prompt = self.embedding.to(device=token_embeds.device, dtype=token_embeds.dtype)  # (n, hidden)
        return torch.cat([prompt.expand(token_embeds.shape[0], -1, -1), token_embeds], dim=1)  # (B, n + L, hidden)
