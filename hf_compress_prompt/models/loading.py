"""Loading a causal LM and its tokenizer from the embedded default, a ``.gguf`` file, a folder or a Hub id."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .._logging import get_logger
from ..data.corpora import _hub_unreachable_reason
from ..errors import MissingResourceError, UserInputError
from ..integrations.checkpoints import from_pretrained
from .default_model import DEFAULT_MODEL_ALIASES, cached_gguf_conversion, default_model_path

__all__ = ["resolve_model_source", "load_model_and_tokenizer"]

logger = get_logger(__name__)


def resolve_model_source(model: str | os.PathLike | None = None) -> str:
    """Turns what the user named into something ``from_pretrained`` accepts.

    ``None`` or one of :data:`DEFAULT_MODEL_ALIASES` gives the embedded SmolLM2-135M-Instruct; a ``.gguf`` file
    gives its cached plain conversion; anything else (a checkpoint folder or a Hub id) is returned unchanged.
    """
    if model is None or str(model).lower() in DEFAULT_MODEL_ALIASES:
        return str(default_model_path())
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        return str(cached_gguf_conversion(path))
    if not path.exists() and _looks_local(str(model)):
        raise MissingResourceError(
            f"model {str(model)!r} is neither a checkpoint folder with a config.json, a .gguf file, nor a Hub id: it "
            "names a local path that does not exist (a Hub id is 'namespace/name'); pass an existing folder or .gguf "
            "file, or omit it for the embedded default"
        )
    return str(model)


def _looks_local(name: str) -> bool:
    """A name that can only mean a local path: it starts with ``./``, ``../``, ``/`` or ``~``, has more than one
    ``/`` (a Hub id is ``namespace/name``), or its parent folder exists here (``out/missing`` beside ``out/``)."""
    if name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    if name.count("/") > 1 or os.sep != "/" and os.sep in name:
        return True
    parent = Path(name).expanduser().parent
    return str(parent) not in ("", ".") and parent.is_dir()


def _check_hub_id_reachable(source: str) -> None:
    """A Hub id that is neither a local folder nor in the local Hub cache fails at once when the Hub is unreachable
    (one quick probe), instead of after transformers' retries (about half a minute)."""
    if Path(source).expanduser().exists():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "config.json")
    except Exception:  # not a valid repo id: transformers' own error says so  # noqa: BLE001
        return
    if isinstance(cached, str):
        return  # transformers can load it from the cache
    reason = _hub_unreachable_reason()
    if reason is not None:
        raise MissingResourceError(
            f"model {source!r} is not a local folder, not in the Hub cache, and the Hub is unreachable ({reason}); "
            "pass an existing folder or .gguf file, allow Hub access, or omit it for the embedded default"
        )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_model_and_tokenizer(
    model: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **from_pretrained_kwargs,
):
    """Loads a causal language model (in eval mode) and its tokenizer.

    Args:
        model (`str` or `os.PathLike`, *optional*):
            ``None`` or ``"default"`` for the embedded SmolLM2-135M-Instruct, a ``.gguf`` file, a local checkpoint
            folder or a Hub id.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): the weights' dtype.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where to put the model.
        from_pretrained_kwargs: passed on to ``AutoModelForCausalLM.from_pretrained`` (through
            :func:`hf_compress_prompt.from_pretrained`, so packed and GPTQ folders load too).

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`

    Raises:
        UserInputError: the source is not a causal LM or cannot be read; MissingResourceError: it does not exist.
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    source = resolve_model_source(model)
    _check_hub_id_reachable(source)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise MissingResourceError(
            f"model {str(model)!r} is neither a checkpoint folder with a config.json, a .gguf file, nor a Hub id that "
            f"could be reached ({_first_line(exc)}); pass an existing path, a reachable Hub id, or omit it for the "
            "embedded default"
        ) from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserInputError(
            f"model {str(model)!r} is a {config.model_type!r} model, which AutoModelForCausalLM cannot load; "
            "pass a causal language model (e.g. Llama, Qwen2, Mistral, OPT, GPT-2)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        raise MissingResourceError(
            f"model {str(model)!r} has no usable tokenizer ({_first_line(exc)}); save one next to the weights "
            "with tokenizer.save_pretrained(folder)"
        ) from None
    lm = from_pretrained(source, dtype=dtype, **from_pretrained_kwargs)  # packed folders; GPTQ without GPTQModel
    lm.to(device).eval()
    logger.info("loaded %s (%s, %.1fM parameters)", source, type(lm).__name__, lm.num_parameters() / 1e6)
    return lm, tokenizer
