"""PEFT calls made quiet where PEFT itself uses an API transformers deprecated (not our call, and not the user's)."""

from __future__ import annotations

import contextlib
import warnings

__all__ = ["get_peft_model", "quiet_peft_forward"]

# PEFT (0.17-0.21) reads ``model.is_gradient_checkpointing`` in ``PeftModel.__init__``; transformers 5.x deprecated
# that property in favour of ``is_activation_checkpointing`` and warns on every read.
_UPSTREAM_DEPRECATIONS = (r".*`is_gradient_checkpointing` is deprecated.*",)
# PEFT's prefix-tuning forward hands the base model its prefix as ``past_key_values``, which transformers 5.24
# renamed ``cache`` and warns about on every call.
_FORWARD_DEPRECATIONS = (r".*`past_key_values` is deprecated.*",)


def get_peft_model(model, peft_config, **kwargs):
    """``peft.get_peft_model`` without the deprecation warnings PEFT's own code raises under transformers 5.x."""
    from peft import get_peft_model as _get_peft_model

    with warnings.catch_warnings():
        for message in _UPSTREAM_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        return _get_peft_model(model, peft_config, **kwargs)


@contextlib.contextmanager
def quiet_peft_forward():
    """Inside: PEFT models' forward passes without the deprecation warnings PEFT's own forward raises under
    transformers 5.x (a prefix passed as ``past_key_values``); every other warning is shown as usual."""
    with warnings.catch_warnings():
        for message in _FORWARD_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield
