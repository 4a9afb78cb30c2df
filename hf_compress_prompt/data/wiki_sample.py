"""The English Wikipedia sample inside the ``gensim`` wheel: the demo's corpus on a machine with no data folder
and no Hub.

The file is ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(206 pages, about 106 articles once redirects are dropped). Markup is stripped with gensim's own
``filter_wiki``. Every tenth article (index 9, 19, ...) is held out as ``test``; the rest is ``train``.
"""

from __future__ import annotations

import bz2
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from ..errors import MissingResourceError

__all__ = ["wiki_sample_path", "wiki_sample_rows"]

_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_HELD_OUT_EVERY = 10


def wiki_sample_path() -> Path:
    """The bz2 XML dump inside the installed gensim package."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(
            "dataset 'wiki_sample' needs the package gensim, which is not installed; run `pip install gensim` "
            "(or install this project with its [demo] extra)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "test" / "test_data" / _FILE
        if path.is_file():
            return path
    raise MissingResourceError(f"gensim is installed but {_FILE} is not in its test data; reinstall gensim")


def _clean(text: str) -> str:
    text = text.replace("'''", "").replace("''", "")  # bold / italic quotes that filter_wiki keeps
    lines = [line.strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


@lru_cache(maxsize=1)
def _articles() -> tuple[str, ...]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(wiki_sample_path()) as f:
        pages = list(extract_pages(f))
    articles = []
    for title, markup, _page_id in pages:
        if not markup or markup.lstrip().lower().startswith("#redirect"):
            continue
        text = _clean(filter_wiki(markup))
        if len(text) > 200:
            articles.append(f"{title}\n\n{text}")
    return tuple(articles)


def wiki_sample_rows(split: str) -> list[str]:
    """The articles of ``split`` (``"train"`` or ``"test"``), one string each."""
    articles = _articles()
    held_out = [i % _HELD_OUT_EVERY == _HELD_OUT_EVERY - 1 for i in range(len(articles))]
    if split == "test":
        return [a for a, h in zip(articles, held_out) if h]
    if split == "train":
        return [a for a, h in zip(articles, held_out) if not h]
    raise ValueError(f"wiki_sample has splits train and test, not {split!r}")
