"""A recovery prompt on disk, in PEFT's prompt-tuning format, so ``PeftModel.from_pretrained`` loads it too:

    adapter_config.json          PromptTuningConfig (peft_type PROMPT_TUNING, task_type CAUSAL_LM)
    adapter_model.safetensors    {"prompt_embeddings": (num_virtual_tokens, hidden_size)}
    recovery_prompt.json         what it was trained for: base model, compression recipe, data, steps,
                                 best validation perplexity, vocabulary size

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
from .prompt import RecoveryPrompt

__all__ = ["PROMPT_SUBFOLDER", "load_recovery_prompt", "save_recovery_prompt", "write_recovery_prompt"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METADATA = "recovery_prompt.json"
PROMPT_KEY = "prompt_embeddings"  # the key PEFT saves a prompt-learning adapter under


def _adapter_config(prompt: RecoveryPrompt, model=None) -> dict:
    from peft import PromptTuningConfig

    config = getattr(model, "config", None)
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


def write_recovery_prompt(prompt: RecoveryPrompt, directory: str | os.PathLike, model=None) -> Path:
    """Writes the three files into ``directory`` (created; not atomic: see :func:`save_recovery_prompt`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = dict(prompt.metadata)
    if model is not None:
        metadata.setdefault("vocab_size", model.config.vocab_size)
        metadata.setdefault("hidden_size", prompt.embedding.shape[1])
    metadata["num_virtual_tokens"] = prompt.num_virtual_tokens
    (directory / ADAPTER_CONFIG).write_text(json.dumps(_adapter_config(prompt, model), indent=2, sort_keys=True, default=str))
    save_file({PROMPT_KEY: prompt.embedding.detach().to("cpu", torch.float32).contiguous()}, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (directory / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
    return directory


def save_recovery_prompt(prompt: RecoveryPrompt, save_directory: str | os.PathLike, model=None, *,
                         overwrite: bool = False) -> Path:
    """Saves ``prompt`` to ``save_directory`` atomically (a failed save leaves any earlier folder intact:
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


def load_recovery_prompt(path_or_repo: str | os.PathLike) -> RecoveryPrompt:
    """Reads a prompt saved by :func:`save_recovery_prompt` or by PEFT (``PeftModel.save_pretrained`` of a
    prompt-tuning adapter), from a folder or a Hub repo.

    Raises:
        MissingResourceError: no such folder or repo, or a file is missing.
        UserInputError: the adapter is not prompt tuning, or its weights file is corrupted.
    """
    directory = _resolve(path_or_repo)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise MissingResourceError(f"{directory} needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a PEFT prompt-tuning adapter)")
    config = _read_json_object(config_file)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise UserInputError(f"{directory} holds a {config.get('peft_type')!r} adapter; a recovery prompt is PROMPT_TUNING")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserInputError(f"{weights_file} is corrupted or not a safetensors file: {exc}") from None
    if PROMPT_KEY not in tensors:
        raise UserInputError(f"{weights_file} has no {PROMPT_KEY!r} tensor (found {sorted(tensors)})")
    embedding = tensors[PROMPT_KEY]
    expected = (config.get("num_virtual_tokens"), config.get("token_dim"))
    if tuple(embedding.shape) != expected:
        raise UserInputError(f"{weights_file}: prompt of shape {tuple(embedding.shape)}, the adapter config says {expected}")
    metadata_file = directory / METADATA
    metadata = _read_json_object(metadata_file) if metadata_file.is_file() else {}
    metadata.setdefault("base_model", config.get("base_model_name_or_path"))
    return RecoveryPrompt(embedding, metadata)

