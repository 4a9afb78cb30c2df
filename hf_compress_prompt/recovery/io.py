"""A recovery prompt on disk, in PEFT's prompt-tuning format, so ``PeftModel.from_pretrained`` loads it too:

    adapter_config.json          PromptTuningConfig (peft_type PROMPT_TUNING, task_type CAUSAL_LM)
    adapter_model.safetensors    {"prompt_embeddings": (num_virtual_tokens, hidden_size)}
    recovery_prompt.json         what it was trained for: base model, compression recipe, data, steps,
                                 best validation perplexity, vocabulary size

A recovery prefix (:class:`~.prefix.RecoveryPrefix`) is saved in PEFT's prefix-tuning format the same way:
``PrefixTuningConfig`` (peft_type PREFIX_TUNING; ``token_dim`` and ``num_attention_heads`` the key/value width and
heads, ``prefix_projection`` as trained) and ``{"prompt_embeddings": (num_virtual_tokens, num_layers * 2 *
token_dim)}``, every layer's keys and values as PEFT saves them, the reparametrising projection already applied
(PEFT loads a prefix for inference the same way, with or without the projection).

A compressed model saved with a prompt attached keeps it in the subfolder ``recovery_prompt/``, and
``from_pretrained`` attaches it again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import MissingResourceError, UserInputError
from ..formats.saved_folder import PROMPT_SUBFOLDER, atomic_directory
from .prefix import PrefixLayout, RecoveryPrefix
from .prompt import RecoveryPrompt

__all__ = ["PROMPT_SUBFOLDER", "load_recovery_prompt", "save_recovery_prompt", "write_recovery_prompt"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METADATA = "recovery_prompt.json"
PROMPT_KEY = "prompt_embeddings"  # the key PEFT saves a prompt-learning adapter under


def _adapter_config(prompt: RecoveryPrompt | RecoveryPrefix, model=None) -> dict:
    from peft import PromptTuningConfig

    config = getattr(model, "config", None)
    if isinstance(prompt, RecoveryPrefix):
        return _prefix_adapter_config(prompt, config)
    peft_config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=prompt.num_virtual_tokens,
        token_dim=prompt.embedding.shape[1],
        num_transformer_submodules=1,
        num_attention_heads=getattr(config, "num_attention_heads", None),
        num_layers=getattr(config, "num_hidden_layers", None),
        base_model_name_or_path=prompt.metadata.get("base_model") or getattr(config, "_name_or_path", None) or None,
    )
    return peft_config.to_dict()


def _prefix_adapter_config(prefix: RecoveryPrefix, config) -> dict:
    from peft import PrefixTuningConfig

    layout, training = prefix.layout, prefix.metadata.get("training") or {}
    projection = bool(training.get("prefix_projection", False))
    peft_config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=prefix.num_virtual_tokens,
        token_dim=layout.token_dim,
        num_transformer_submodules=1,
        num_attention_heads=layout.num_key_value_heads,  # PEFT's name for the cache's (key/value) heads
        num_layers=layout.num_layers,
        prefix_projection=projection,
        encoder_hidden_size=training.get("prefix_hidden_size") or layout.token_dim,
        base_model_name_or_path=prefix.metadata.get("base_model") or getattr(config, "_name_or_path", None) or None,
    )
    return peft_config.to_dict()


def _saved_tensor(prompt: RecoveryPrompt | RecoveryPrefix) -> torch.Tensor:
    """What goes under ``prompt_embeddings``: the embeddings, or a prefix in PEFT's flat layout."""
    tensor = prompt.to_peft() if isinstance(prompt, RecoveryPrefix) else prompt.embedding
    return tensor.detach().to("cpu", torch.float32).contiguous()


def write_recovery_prompt(prompt: RecoveryPrompt | RecoveryPrefix, directory: str | os.PathLike, model=None) -> Path:
    """Writes the three files into ``directory`` (created; not atomic: see :func:`save_recovery_prompt`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = dict(prompt.metadata)
    if model is not None:
        metadata.setdefault("vocab_size", model.config.vocab_size)
        metadata.setdefault("hidden_size", model.get_input_embeddings().embedding_dim)
    metadata["num_virtual_tokens"] = prompt.num_virtual_tokens
    (directory / ADAPTER_CONFIG).write_text(json.dumps(_adapter_config(prompt, model), indent=2, sort_keys=True, default=str))
    save_file({PROMPT_KEY: _saved_tensor(prompt)}, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
    return directory


def save_recovery_prompt(prompt: RecoveryPrompt | RecoveryPrefix, save_directory: str | os.PathLike, model=None, *,
                         overwrite: bool = False) -> Path:
    """Saves ``prompt`` (or a prefix) to ``save_directory`` atomically (a failed save leaves any earlier folder intact:
    :func:`~hf_compress_prompt.formats.saved_folder.atomic_directory`).

    Args:
        overwrite (`bool`, *optional*, defaults to `False`): replace a prompt (or model) folder saved there before;
            a path that is a file, or a folder holding other files, is refused either way.
    """
    with atomic_directory(save_directory, overwrite=overwrite) as tmp:
        write_recovery_prompt(prompt, tmp, model)
    return Path(save_directory).expanduser().resolve()


def _resolve(path_or_repo: str | os.PathLike) -> Path:
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    if isinstance(path_or_repo, str) and path_or_repo.count("/") == 1 and not path.exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(path_or_repo, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, METADATA]))
        except Exception as exc:  # offline, missing repo, no access: say which and why
            raise MissingResourceError(f"cannot fetch recovery prompt {path_or_repo!r} from the Hub: {exc}") from exc
    raise MissingResourceError(f"{path_or_repo} is not a folder with a recovery prompt (nor a Hub repo id)")


def _read_json_object(path: Path) -> dict:
    """A JSON object read from ``path``; invalid JSON (or another JSON value) is an error naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path} is not valid JSON ({exc}); save the recovery prompt again") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path} holds a JSON {type(data).__name__}, not an object; save the recovery prompt again")
    return data


def load_recovery_prompt(path_or_repo: str | os.PathLike) -> RecoveryPrompt | RecoveryPrefix:
    """Reads a prompt saved by :func:`save_recovery_prompt` or by PEFT (``PeftModel.save_pretrained`` of a
    prompt-tuning adapter), from a folder or a Hub repo; a prefix-tuning adapter (ours or PEFT's, causal LM) gives
    a :class:`~.prefix.RecoveryPrefix`.

    Raises:
        MissingResourceError: no such folder or repo, or a file is missing.
        UserInputError: the adapter is neither prompt nor prefix tuning, or its weights file is corrupted.
    """
    directory = _resolve(path_or_repo)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise MissingResourceError(f"{directory} needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a PEFT prompt-tuning adapter)")
    config = _read_json_object(config_file)
    if config.get("peft_type") not in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise UserInputError(f"{directory} holds a {config.get('peft_type')!r} adapter; a recovery prompt is "
                             "PROMPT_TUNING (or a prefix, PREFIX_TUNING)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserInputError(f"{weights_file} is corrupted or not a safetensors file: {exc}") from None
    if PROMPT_KEY not in tensors:
        raise UserInputError(f"{weights_file} has no {PROMPT_KEY!r} tensor (found {sorted(tensors)})")
    embedding = tensors[PROMPT_KEY]
    prefix = config["peft_type"] == "PREFIX_TUNING"
    layout = _prefix_layout(config, weights_file) if prefix else None
    width = layout.num_layers * 2 * layout.token_dim if prefix else config.get("token_dim")
    expected = (config.get("num_virtual_tokens"), width)
    if tuple(embedding.shape) != expected:
        raise UserInputError(f"{weights_file}: {'prefix' if prefix else 'prompt'} of shape {tuple(embedding.shape)}, "
                             f"the adapter config says {expected}")
    metadata_file = directory / METADATA
    metadata = _read_json_object(metadata_file) if metadata_file.is_file() else {}
    metadata.setdefault("base_model", config.get("base_model_name_or_path"))
    if prefix:
        return RecoveryPrefix.from_peft(embedding.float(), layout, metadata)
    return RecoveryPrompt(embedding, metadata)


def _prefix_layout(config: dict, weights_file: Path) -> PrefixLayout:
    """The cache layout a saved ``PrefixTuningConfig`` describes (PEFT's ``num_attention_heads`` is the key/value
    heads, ``token_dim`` their width)."""
    heads, width, layers = (config.get(k) for k in ("num_attention_heads", "token_dim", "num_layers"))
    if config.get("num_transformer_submodules", 1) != 1 or config.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserInputError(f"{weights_file.parent}: a prefix for task {config.get('task_type')!r} with "
                             f"{config.get('num_transformer_submodules')} transformer submodules; a recovery prefix is "
                             "CAUSAL_LM with one")
    if not all(isinstance(v, int) and v > 0 for v in (heads, width, layers)) or width % heads:
        raise UserInputError(f"{weights_file.parent}: adapter config with num_attention_heads={heads}, token_dim={width}, "
                             f"num_layers={layers}; need positive integers, token_dim a multiple of the heads")
    return PrefixLayout(layers, heads, width // heads)

