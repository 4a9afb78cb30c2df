"""Text corpora for calibration, training and perplexity, each declared once in a registry.

A corpus yields the rows of one split as a list of strings, from local files (``data_root()``) or from the
Hugging Face Hub (``datasets.load_dataset``), and knows how its rows are joined into one evaluation stream the
way GPTQ, SparseGPT and Wanda do it (WikiText-2: ``"\\n\\n".join``; PTB: ``" ".join`` of the sentences).

``source="auto"`` reads the local copy when it exists (the same bytes as the Hub's, and no network) and the Hub
otherwise; ``"local"`` and ``"hub"`` force one. Training and calibration text (never evaluation text) may fall back
to a corpus that ships with an installed package when the asked one is unreachable (:func:`training_corpus`: C4 ->
the Wikipedia sample's training part), announced in one warning line. The local root is
``$HF_COMPRESS_PROMPT_DATA``, defaulting to ``../shared/data`` beside the checkout (layout:
``../shared/data/SOURCES.md``). Nothing is copied into the project.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from .._logging import get_logger
from ..errors import MissingResourceError, UserInputError
from .wiki_sample import wiki_sample_rows

__all__ = [
    "DATA_ENV_VAR",
    "DataSource",
    "Corpus",
    "HubSplit",
    "register_corpus",
    "get_corpus",
    "list_corpora",
    "data_root",
    "load_rows",
    "load_text",
    "training_corpus",
]

logger = get_logger(__name__)

DATA_ENV_VAR = "HF_COMPRESS_PROMPT_DATA"


class DataSource(str, Enum):
    """Where rows come from."""

    AUTO = "auto"  # local copy when present, else the Hub
    LOCAL = "local"
    HUB = "hub"


@dataclass(frozen=True)
class HubSplit:
    """How ``datasets.load_dataset`` reaches one split: ``load_dataset(path, name, data_files=..., split=split)[text_field]``."""

    path: str
    name: str | None = None
    split: str = "test"
    data_files: dict[str, str] | None = None
    text_field: str = "text"


@dataclass(frozen=True)
class Corpus:
    """One text corpus.

    Args:
        name (`str`): the name users pass (``"wikitext2"``).
        description (`str`): one line for ``--help`` and errors.
        join (`str`): the separator between rows in the evaluation stream.
        documents (`bool`): rows are independent documents (C4) rather than lines of one running text; calibration
            then samples windows inside single documents, as GPTQ does for C4.
        local_splits (`dict[str, str]`): split -> path relative to the data root.
        read_local (`Callable[[Path], list[str]]`): reads a local file into rows, exactly as the Hub split's rows.
        hub_splits (`dict[str, HubSplit]`): split -> where it lives on the Hub.
        builtin (`Callable[[str], list[str]]`, *optional*): rows that ship with an installed package (no data root).
        offline_fallback (`tuple[str, str]`, *optional*): ``(corpus, split)`` to train or calibrate on instead when
            no copy of this corpus's training split is reachable (:func:`training_corpus`); never used for evaluation.
    """

    name: str
    description: str
    join: str
    documents: bool = False
    local_splits: dict[str, str] = field(default_factory=dict)
    read_local: Callable[[Path], list[str]] | None = None
    hub_splits: dict[str, HubSplit] = field(default_factory=dict)
    builtin: Callable[[str], list[str]] | None = None
    builtin_splits: tuple[str, ...] = ()
    offline_fallback: tuple[str, str] | None = None

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.local_splits, *self.hub_splits, *self.builtin_splits]))


_CORPORA: dict[str, Corpus] = {}


def register_corpus(corpus: Corpus) -> Corpus:
    """Adds ``corpus`` to the registry; a second corpus with the same name is an error."""
    if not isinstance(corpus, Corpus):
        raise TypeError(f"register_corpus expects a Corpus, got {type(corpus).__name__}")
    if corpus.name in _CORPORA:
        raise ValueError(f"a corpus named {corpus.name!r} is already registered; pick another name")
    _CORPORA[corpus.name] = corpus
    return corpus


def list_corpora() -> list[str]:
    """The names of the registered corpora, sorted."""
    return sorted(_CORPORA)


def get_corpus(name: str) -> Corpus:
    """The registered corpus called ``name``; an unknown name is a :class:`UserInputError` listing the known ones."""
    try:
        return _CORPORA[name]
    except KeyError:
        raise UserInputError(f"unknown dataset {name!r}; choose one of {', '.join(list_corpora())}") from None


def _default_roots() -> list[Path]:
    checkout = Path(__file__).resolve().parents[2]
    return [checkout.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def data_root() -> Path | None:
    """The local data folder: ``$HF_COMPRESS_PROMPT_DATA`` (which must exist), else ``../shared/data`` beside the
    checkout or the working directory when present, else ``None``."""
    override = os.environ.get(DATA_ENV_VAR)
    if override:
        root = Path(override).expanduser()
        if not root.is_dir():
            raise MissingResourceError(
                f"{DATA_ENV_VAR}={override!r} is not a folder; point it at a folder laid out like ../shared/data "
                f"or unset it"
            )
        return root
    for root in _default_roots():
        if root.is_dir():
            return root
    return None


# --- readers: each returns the rows the Hub's copy of that split has ----------------------------------------


def _read_wikitext_raw(path: Path) -> list[str]:
    # The Hub's wikitext-2-raw-v1 rows are the raw file's lines with their "\n" kept, except that blank
    # lines (" \n" in the raw file) are empty rows "".
    with open(path, encoding="utf-8") as f:
        return ["" if line == " \n" else line for line in f]


def _read_ptb(path: Path) -> list[str]:
    # ptb_text_only's "sentence" is each line of Mikolov's file, stripped.
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f]


def _read_jsonl_text(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserInputError(
                    f"{str(path)!r} line {number} is not a JSON object with a 'text' field; "
                    "replace the file with an intact copy"
                ) from None
    return rows


def _wiki_sample(split: str) -> list[str]:
    return wiki_sample_rows(split)


register_corpus(
    Corpus(
        name="wikitext2",
        description="WikiText-2 raw (the standard LM perplexity set); rows joined with blank lines",
        join="\n\n",
        local_splits={"test": "wikitext-2-raw/wiki.test.raw", "validation": "wikitext-2-raw/wiki.valid.raw"},
        read_local=_read_wikitext_raw,
        hub_splits={
            s: HubSplit("Salesforce/wikitext", "wikitext-2-raw-v1", split=s) for s in ("train", "validation", "test")
        },
    )
)
register_corpus(
    Corpus(
        name="ptb",
        description="Penn Treebank (Mikolov's text-only version); sentences joined with spaces",
        join=" ",
        local_splits={"test": "ptb/ptb.test.txt", "validation": "ptb/ptb.valid.txt"},
        read_local=_read_ptb,
        hub_splits={
            s: HubSplit("ptb-text-only/ptb_text_only", "penn_treebank", split=s, text_field="sentence")
            for s in ("train", "validation", "test")
        },
    )
)
register_corpus(
    Corpus(
        name="c4",
        description="C4 English web text; locally the first 1000 documents of train shard 00000",
        join=" ",
        documents=True,
        local_splits={"train": "c4/c4-train.00000-of-01024.first1000.jsonl.gz"},
        read_local=_read_jsonl_text,
        offline_fallback=("wiki_sample", "train"),
        hub_splits={
            "train": HubSplit(
                "allenai/c4", split="train", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}
            ),
            "validation": HubSplit(
                "allenai/c4", split="validation", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}
            ),
        },
    )
)
register_corpus(
    Corpus(
        name="wiki_sample",
        description="English Wikipedia sample shipped inside the gensim wheel (works with no data folder and no Hub)",
        join="\n\n",
        documents=True,
        builtin=_wiki_sample,
        builtin_splits=("train", "test"),
    )
)


# --- loading ------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _hub_unreachable_reason() -> str | None:
    """Why the Hub cannot be used, or ``None``. One quick TCP probe per process, so an offline machine fails in
    seconds instead of going through ``datasets``' retries (about 25 s)."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set"
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError as exc:
        return f"{url.hostname} is unreachable: {exc.strerror or exc}"
    return None


def _load_hub(corpus: Corpus, split: str) -> list[str]:
    """The split's rows from the Hub (:func:`_locate` has already found it reachable)."""
    spec = corpus.hub_splits[split]
    import datasets

    rows = datasets.load_dataset(spec.path, spec.name, split=spec.split, data_files=spec.data_files)
    return list(rows[spec.text_field])


def load_rows(
    name: str, split: str = "test", *, source: DataSource | str = DataSource.AUTO, data_dir: str | os.PathLike | None = None
) -> list[str]:
    """The rows of one split of a registered corpus.

    Args:
        name (`str`): a registered corpus (``list_corpora()``).
        split (`str`, *optional*, defaults to `"test"`): ``"train"``, ``"validation"`` or ``"test"``.
        source (`DataSource` or `str`, *optional*, defaults to `"auto"`): ``"auto"``, ``"local"`` or ``"hub"``.
        data_dir (`str` or `os.PathLike`, *optional*): the local root; defaults to :func:`data_root`.

    Raises:
        UserInputError: unknown name, split or source; MissingResourceError: no copy could be read.
    """
    corpus, source = _checked(name, split, source)
    kind, path, reasons = _locate(corpus, split, source, data_dir)
    if kind == "builtin":
        return corpus.builtin(split)
    if kind == "local":
        logger.info("reading %s/%s from %s", name, split, path)
        return corpus.read_local(path)
    if kind == "hub":
        try:
            return _load_hub(corpus, split)
        except Exception as exc:  # offline, DNS, HTTP, parsing: all mean "not from the Hub"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reasons.append(f"the Hub could not be used ({type(exc).__name__}: {first[:160]})")
    raise MissingResourceError(
        f"dataset {name!r} split {split!r} is not available: {'; '.join(reasons)}; set {DATA_ENV_VAR} to a folder laid "
        f"out like ../shared/data, allow Hub access, or use 'wiki_sample', which ships with gensim"
    )


def _checked(name: str, split: str, source: DataSource | str) -> tuple[Corpus, DataSource]:
    corpus = get_corpus(name)
    try:
        source = DataSource(source)
    except ValueError:
        raise UserInputError(f"unknown data source {source!r}; choose one of auto, local, hub") from None
    if split not in corpus.splits:
        raise UserInputError(f"dataset {name!r} has no split {split!r}; choose one of {', '.join(corpus.splits)}")
    return corpus, source


def _locate(corpus: Corpus, split: str, source: DataSource, data_dir) -> tuple[str | None, Path | None, list[str]]:
    """Where a split would be read from, without reading it: ``("builtin" | "local" | "hub" | None, local path,
    reasons the earlier places failed)``. ``"hub"`` means the Hub is reachable and has the split."""
    if corpus.builtin is not None and split in corpus.builtin_splits and source is not DataSource.HUB:
        return "builtin", None, []
    reasons = []
    if source is not DataSource.HUB:
        root = Path(data_dir).expanduser() if data_dir is not None else data_root()
        relative = corpus.local_splits.get(split)
        if relative is None:
            reasons.append(f"no local copy of split {split!r} is known")
        elif root is None:
            reasons.append(f"no local data folder (set {DATA_ENV_VAR})")
        elif not (root / relative).is_file():
            reasons.append(f"{str(root / relative)!r} is missing")
        else:
            return "local", root / relative, reasons
    if source is not DataSource.LOCAL:
        if split not in corpus.hub_splits:
            reasons.append(f"the Hub has no split {split!r} for it")
        elif (unreachable := _hub_unreachable_reason()) is not None:
            reasons.append(f"the Hub could not be used ({unreachable})")
        else:
            return "hub", None, reasons
    return None, None, reasons


def training_corpus(
    name: str, split: str = "train", *, source: DataSource | str = DataSource.AUTO, data_dir: str | os.PathLike | None = None
) -> tuple[str, str]:
    """The ``(corpus, split)`` to calibrate or train on when ``name``/``split`` is asked for.

    That is ``(name, split)`` itself when a copy is reachable (a local file, the Hub), and otherwise the corpus's
    ``offline_fallback`` (C4 -> the Wikipedia sample's training part, which ships inside gensim; its test part,
    which evaluation uses, is never trained on), said in one warning line. When the fallback is not available either,
    ``(name, split)`` comes back unchanged, so reading it fails with the full reason. Evaluation never falls back.
    """
    corpus, source = _checked(name, split, source)
    kind, _, reasons = _locate(corpus, split, source, data_dir)
    if kind is not None or corpus.offline_fallback is None or source is not DataSource.AUTO:
        return name, split
    fallback, fallback_split = corpus.offline_fallback
    try:
        load_rows(fallback, fallback_split)
    except MissingResourceError as exc:
        logger.info("the offline fallback for %s is not available either: %s", name, exc)
        return name, split
    logger.warning("%s/%s is not available (%s): calibrating / training on %s/%s instead, which ships with an installed "
                   "package (its held-out test part is never trained on)", name, split, "; ".join(reasons), fallback, fallback_split)
    return fallback, fallback_split


def load_text(
    name: str, split: str = "test", *, source: DataSource | str = DataSource.AUTO, data_dir: str | os.PathLike | None = None
) -> str:
    """The evaluation stream of one split: its rows joined by the corpus's separator (GPTQ's convention)."""
    return get_corpus(name).join.join(load_rows(name, split, source=source, data_dir=data_dir))
