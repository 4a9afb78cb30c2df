"""PEFT calls made quiet where PEFT itself uses an API transformers deprecated (not our call, and not the user's)."""

from __future__ import annotations

import warnings

__all__ = ["get_peft_model"]

# PEFT (0.17-0.21) reads ``model.is_gradient_checkpointing`` in ``PeftModel.__init__``; transformers 5.x deprecated
# that property in favour of ``is_activation_checkpointing`` and warns on every read.
_UPSTREAM_DEPRECATIONS = (r".*`is_gradient_checkpointing` is deprecated.*",)


def get_peft_model(model, peft_config, **kwargs):
    """``peft.get_peft_model`` without the deprecation warnings PEFT's own code raises under transformers 5.x."""
    from peft import get_peft_model as _get_peft_model

    with warnings.catch_warnings():
        for message in _UPSTREAM_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        return _get_peft_model(model, peft_config, **kwargs)
