"""Training text the model makes itself: the dense model's own continuations and chat answers, generated once and
cached, so a recovery prompt can train with no dataset at all (as LLM-QAT's data-free distillation does for
quantisation-aware training).

Two kinds of text:

- ``"continuations"``: samples from the dense model, each started from BOS alone (no data at all) or from the first
  tokens of a given text (``starts``, e.g. C4 documents);
- ``"chat"``: the dense model's answers to ``questions``, each written out in its chat template (the question, the
  answer, the end-of-turn token), aimed at what the knowledge tasks lose: the compressed model asked through its
  chat template.

The texts are cut into training windows like a corpus (:func:`generated_windows`: documents joined with EOS), and
cached as JSON lines under ``$HF_COMPRESS_PROMPT_GENERATED_CACHE`` or ``~/.cache/hf_compress_prompt/generated``,
one file per (model, settings, inputs) digest, written atomically: a second call with the same inputs reads the file
instead of generating, and nothing else in that folder is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .._logging import get_logger
from ..errors import UserInputError

__all__ = ["CACHE_ENV", "GENERATION_KINDS", "GenerationSettings", "generate_texts", "generated_split",
           "generated_texts", "generated_windows", "settings_for", "text_windows"]

logger = get_logger(__name__)

CACHE_ENV = "HF_COMPRESS_PROMPT_GENERATED_CACHE"
GENERATION_KINDS = ("continuations", "chat")
_FILE_PREFIX = "generated-"  # every cache file this module writes is named generated-<digest>.jsonl


@dataclass(frozen=True)
class GenerationSettings:
    """How the dense model writes its training text.

    Args:
        kind (`str`, defaults to `"continuations"`): ``"continuations"`` or ``"chat"``.
        count (`int`, defaults to 64): how many texts (for ``"chat"``: at most one per question).
        max_new_tokens (`int`, defaults to 256): tokens sampled per text.
        start_tokens (`int`, defaults to 32): tokens of each ``starts`` text kept before the continuation.
        temperature (`float`, defaults to 1.0), top_p (`float`, defaults to 0.95): sampling (``temperature=0``:
            greedy).
        batch_size (`int`, defaults to 16): sequences generated at once.
        seed (`int`, defaults to 0): the sampling seed.
    """

    kind: str = "continuations"
    count: int = 64
    max_new_tokens: int = 256
    start_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 0.95
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.kind not in GENERATION_KINDS:
            raise UserInputError(f"kind={self.kind!r}; use one of {', '.join(GENERATION_KINDS)}")
        for name in ("count", "max_new_tokens", "start_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.temperature >= 0 or not 0 < self.top_p <= 1:
            raise UserInputError(f"temperature={self.temperature}, top_p={self.top_p}: need temperature >= 0 and "
                                 "0 < top_p <= 1")


def _check_model(model: nn.Module | None, tokenizer) -> None:
    if model is None:
        raise UserInputError("generated training text needs the dense (uncompressed) model that writes it: pass it "
                             "(e.g. generator=dense_model), or train on a corpus instead")
    if tokenizer is None:
        raise UserInputError("generated training text needs the model's tokenizer")
    if not callable(getattr(model, "generate", None)):
        raise UserInputError(f"{type(model).__name__} has no generate(); generated text needs a causal LM")


def _starts(tokenizer, settings: GenerationSettings, starts: Sequence[str] | None,
            questions: Sequence[str] | None) -> list[list[int]]:
    """The token ids each text starts from (one list per text)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if settings.kind == "chat":
        if not questions:
            raise UserInputError("kind='chat' needs questions (the dense model answers them in its chat template)")
        if getattr(tokenizer, "chat_template", None) is None:
            raise UserInputError("kind='chat' needs a tokenizer with a chat template; use kind='continuations'")
        return [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False))
                for q in list(questions)[: settings.count]]
    if not starts:
        if bos is None:
            raise UserInputError("this tokenizer has neither a BOS nor an EOS token to start unconditional samples "
                                 "from; pass starts=[...] texts")
        return [[bos] for _ in range(settings.count)]
    texts = [s for s in starts if s and s.strip()][: settings.count]
    if len(texts) < settings.count:
        raise UserInputError(f"count={settings.count} texts need as many non-empty starts; got {len(texts)}")
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [([bos] if bos is not None else []) + row[: settings.start_tokens] for row in ids]


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, settings: GenerationSettings | None = None, *,
                   starts: Sequence[str] | None = None, questions: Sequence[str] | None = None) -> list[str]:
    """The texts ``model`` writes per ``settings`` (no cache; :func:`generated_texts` caches).

    Sequences of one batch start left-padded; each text is decoded from its start to its end-of-sequence token (kept,
    so a chat answer ends its turn) or ``max_new_tokens``, special tokens of the chat template kept.
    """
    settings = settings or GenerationSettings()
    _check_model(model, tokenizer)
    begins = _starts(tokenizer, settings, starts, questions)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(settings.seed)
    texts = []
    try:
        for i in range(0, len(begins), settings.batch_size):
            chunk = begins[i: i + settings.batch_size]
            width = max(len(b) for b in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, width), left-padded
            mask = torch.zeros_like(ids)
            for row, b in enumerate(chunk):
                ids[row, width - len(b):] = torch.tensor(b)
                mask[row, width - len(b):] = 1
            sample = settings.temperature > 0
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=settings.max_new_tokens,
                do_sample=sample, temperature=settings.temperature if sample else None,
                top_p=settings.top_p if sample else None, top_k=0 if sample else None, pad_token_id=pad,
            )  # (B, width + new)
            for row, b in enumerate(chunk):
                new = out[row, width:].tolist()
                if eos is not None and eos in new:
                    new = new[: new.index(eos) + 1]
                texts.append(tokenizer.decode(b + new, skip_special_tokens=False))
            logger.info("generated %d / %d texts", len(texts), len(begins))
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return texts


def _model_identity(model: nn.Module) -> dict:
    """What tells one model's weights from another's in the cache key: its name, vocabulary and a checksum of its
    embeddings and last parameter (cheap; two different checkpoints differ there)."""
    params = list(model.parameters())
    embed = model.get_input_embeddings().weight.detach()
    return {"name": getattr(getattr(model, "config", None), "_name_or_path", None),
            "vocab": int(embed.shape[0]), "embed_sum": float(embed.double().sum()),
            "last_sum": float(params[-1].detach().double().sum())}


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    root = cache_dir or os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "hf_compress_prompt" / "generated"


def generated_texts(model: nn.Module, tokenizer, settings: GenerationSettings | None = None, *,
                    starts: Sequence[str] | None = None, questions: Sequence[str] | None = None,
                    cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> list[str]:
    """:func:`generate_texts`, cached: the same model, tokenizer vocabulary, settings and inputs read the texts
    generated the first time from ``<cache>/generated-<digest>.jsonl`` (first line: what they were made from).

    ``cache_dir`` defaults to ``$HF_COMPRESS_PROMPT_GENERATED_CACHE`` or ``~/.cache/hf_compress_prompt/generated``;
    ``use_cache=False`` neither reads nor writes it.
    """
    settings = settings or GenerationSettings()
    _check_model(model, tokenizer)
    key = {"settings": asdict(settings), "model": _model_identity(model), "vocab_size": len(tokenizer),
           "starts": list(starts or []) if settings.kind == "continuations" else [],
           "questions": list(questions or [])[: settings.count] if settings.kind == "chat" else []}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = _cache_dir(cache_dir) / f"{_FILE_PREFIX}{digest}.jsonl"
    if use_cache and path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            header, texts = json.loads(lines[0]), [json.loads(line)["text"] for line in lines[1:]]
            if header.get("digest") == digest and len(texts) == header.get("texts"):
                logger.info("generated training text read from %s (%d texts)", path, len(texts))
                return texts
        except (OSError, ValueError, KeyError, IndexError):
            pass
        logger.warning("the cached generated text %s is incomplete or unreadable: generating it again", path)
    texts = generate_texts(model, tokenizer, settings, starts=starts, questions=questions)
    if use_cache:
        _write_cache(path, digest, key, texts)
    return texts


def _write_cache(path: Path, digest: str, key: dict, texts: list[str]) -> None:
    """Writes the cache file atomically (a temporary file in the same folder, then ``os.replace``); a folder that
    cannot be written is said in one line and the texts are used uncached."""
    header = {"digest": digest, "texts": len(texts), "settings": key["settings"], "model": key["model"]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False) as handle:
            handle.write(json.dumps(header) + "\n")
            for text in texts:
                handle.write(json.dumps({"text": text}) + "\n")
            temporary = Path(handle.name)
        os.replace(temporary, path)
    except OSError as exc:
        logger.warning("could not cache the generated text in %s (%s); using it uncached", path.parent, exc)


def text_windows(texts: Sequence[str], tokenizer, seqlen: int, *, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from ``texts`` (each tokenised as written, special tokens of the
    chat template included, joined with EOS), as :func:`~.data.token_windows` cuts a corpus.

    Returns:
        `torch.LongTensor` of shape `(windows, seqlen)`.
    """
    if seqlen < 2:
        raise UserInputError(f"seqlen={seqlen} must be >= 2")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            stream.append(eos)
    count = len(stream) // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise UserInputError(f"the generated text holds {len(stream)} tokens, fewer than one window of {seqlen}; "
                             "generate more (count, max_new_tokens) or use a shorter seqlen")
    return torch.tensor(stream[: count * seqlen], dtype=torch.long).view(count, seqlen)  # (windows, seqlen)


def generated_windows(model: nn.Module, tokenizer, seqlen: int, settings: GenerationSettings | None = None, *,
                      starts: Sequence[str] | None = None, questions: Sequence[str] | None = None,
                      cache_dir: str | os.PathLike | None = None, max_windows: int | None = None) -> torch.Tensor:
    """Training windows of text ``model`` (the dense model) writes itself: :func:`generated_texts` (cached) cut by
    :func:`text_windows`. ``recover(compressed, tokenizer, train_dataset=TokenWindows(generated_windows(dense, ...)))``
    trains a prompt with no dataset at all."""
    texts = generated_texts(model, tokenizer, settings, starts=starts, questions=questions, cache_dir=cache_dir)
    return text_windows(texts, tokenizer, seqlen, max_windows=max_windows)


def settings_for(kind: str, count: int, max_new_tokens: int) -> GenerationSettings:
    """The settings :func:`~.train.recover` generates with for ``dataset="generated"``: unconditional samples at the
    model's own distribution (temperature 1, top-p 0.95), or chat answers a little sharper (temperature 0.7,
    top-p 0.9: an answer, not a ramble)."""
    if kind == "chat":
        return GenerationSettings(kind="chat", count=count, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9)
    return GenerationSettings(kind=kind, count=count, max_new_tokens=max_new_tokens)


def generated_split(model: nn.Module, tokenizer, seqlen: int, eval_windows: int,
                    settings: GenerationSettings | None = None, *, questions: Sequence[str] | None = None,
                    cache_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation windows of the text ``model`` writes (:func:`generated_windows`): the last
    ``eval_windows`` windows validate and are never trained on.

    Returns:
        `(train, valid)`: `torch.LongTensor`s of shape `(windows, seqlen)`.
    """
    windows = generated_windows(model, tokenizer, seqlen, settings, questions=questions, cache_dir=cache_dir)
    if windows.shape[0] <= eval_windows:
        raise UserInputError(f"the generated text gives {windows.shape[0]} windows of {seqlen} tokens, not more than "
                             f"eval_windows={eval_windows}: generate more texts or tokens per text, or lower "
                             "eval_windows / seqlen")
    return windows[:-eval_windows], windows[-eval_windows:]
