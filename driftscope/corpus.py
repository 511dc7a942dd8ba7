"""Text for prompts and perplexity, from an installed package or the user's own file, never the network.

The default corpus is the 2016 English Wikipedia extract that gensim 4.4.0 ships as test data
(CC BY-SA), cleaned with gensim's own wiki filters: 100 articles of at least 2,000 characters, about
712k SmolLM2 tokens.
"""
from __future__ import annotations

import bz2
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from driftscope.errors import CorpusError

GENSIM_WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_ARTICLE_CHARS = 2000


@dataclass(frozen=True)
class Corpus:
    documents: tuple[tuple[str, str], ...]  # (title, text)
    source: str  # where the text came from, recorded in the run file

    def __len__(self) -> int:
        return len(self.documents)


def _clean_wiki(text: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    text = re.sub(r"'{2,}", "", text)  # bold/italic quotes survive gensim's filter
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)  # section headings -> plain lines
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def wikipedia() -> Corpus:
    from driftscope.models import cache_dir

    source = f"gensim==4.4.0:{GENSIM_WIKI}"
    cached = cache_dir() / "corpus-gensim-enwiki-v1.json"  # the cleaned articles, made once from gensim's file
    if cached.is_file():
        return Corpus(tuple((t, x) for t, x in json.loads(cached.read_text())), source=source)
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise CorpusError("the default corpus needs gensim==4.4.0 (`pip install gensim==4.4.0`), or pass --corpus FILE")
    path = Path(spec.origin).parent / GENSIM_WIKI
    if not path.is_file():
        raise CorpusError(f"gensim has no Wikipedia test extract at {path}; install gensim==4.4.0 or pass --corpus FILE")
    from gensim.corpora.wikicorpus import extract_pages

    docs = []
    with bz2.open(path, "rb") as f:
        for title, text, _pageid in extract_pages(f):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean_wiki(text)
            if len(text) >= MIN_ARTICLE_CHARS:
                docs.append([title, text])
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(docs))
    tmp.replace(cached)
    return Corpus(tuple((t, x) for t, x in docs), source=source)


def from_file(path: str | Path) -> Corpus:
    """A UTF-8 text file; blank-line-separated blocks of ≥ 2 lines are kept together as documents."""
    p = Path(path)
    if p.is_dir():
        raise CorpusError(f"corpus {str(p)!r} is a directory; expected a UTF-8 text file")
    if not p.is_file():
        raise CorpusError(f"corpus file {str(p)!r} does not exist; expected a UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CorpusError(f"corpus file {str(p)!r} is not UTF-8 text") from None
    except OSError as e:
        raise CorpusError(f"corpus file {str(p)!r} cannot be read ({e.strerror or e})") from None
    if not text.strip():
        raise CorpusError(f"corpus file {str(p)!r} is empty; expected text to draw prompts from")
    return Corpus(((p.name, text.strip()),), source=f"file:{p.resolve()}")


def load_corpus(path: str | Path | None = None) -> Corpus:
    return wikipedia() if path is None else from_file(path)


def tokenize(corpus: Corpus, tokenizer) -> list[np.ndarray]:
    """Token ids of each document (no special tokens), as int64 arrays."""
    return [np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
            for _title, text in corpus.documents]


def prompts(corpus: Corpus, tokenizer, length: int, count: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """`count` prompts of exactly `length` tokens, each from the start of a different document where possible.

    Documents are taken in corpus order for seed 0, else in an order shuffled by `seed`.
    Documents too short for `length` are skipped; a single long document (a user's file) is cut into
    consecutive windows. Returns (token ids, source) pairs; the source names the document and token offset.
    """
    if length < 1 or count < 1:
        raise CorpusError(f"prompt length and count must be positive, got length={length}, count={count}")
    order = np.arange(len(corpus)) if seed == 0 else np.random.default_rng(seed).permutation(len(corpus))
    documents = [corpus.documents[i] for i in order]
    docs = tokenize(Corpus(tuple(documents), corpus.source), tokenizer)
    out: list[tuple[np.ndarray, str]] = []
    for (title, _), ids in zip(documents, docs):
        offset = 0
        while offset + length <= len(ids) and len(out) < count:
            out.append((ids[offset:offset + length], f"{title}@{offset}"))
            offset += length
            if len(corpus.documents) > 1:
                break  # one prompt per document: more variety across articles
        if len(out) == count:
            return out
    raise CorpusError(
        f"the corpus ({corpus.source}) holds only {len(out)} prompt(s) of {length} tokens, {count} were asked; "
        f"use fewer or shorter prompts, or a longer --corpus FILE"
    )


def windows(corpus: Corpus, tokenizer, length: int, count: int | None = None) -> np.ndarray:
    """Non-overlapping windows of `length` tokens over the concatenated corpus: int64 [n_windows, length]."""
    ids = np.concatenate(tokenize(corpus, tokenizer))
    available = len(ids) // length
    if available == 0 or (count is not None and count > available):
        raise CorpusError(
            f"the corpus ({corpus.source}, {len(ids)} tokens) holds {available} window(s) of {length} tokens, "
            f"{count if count is not None else 1} were asked; use fewer windows, a shorter context or a longer corpus"
        )
    n = available if count is None else count
    return ids[: n * length].reshape(n, length)
