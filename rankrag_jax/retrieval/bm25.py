"""Sparse retrieval: BM25 over a `Corpus` with `bm25s`.

Text is split with bm25s' own tokenizer (lowercase, `\\w\\w+` words, bm25s' English stopword list). No stemmer:
bm25s takes one only from PyStemmer, which is not a dependency. Passages are indexed as `passage_text(title,
text)`, the same string the other stages see.

On disk an index is a directory holding bm25s' own files (`params.index.json`, `vocab.index.json` and the
sparse score matrix as three `.npy` arrays, written and read with `allow_pickle=False`) plus our
`bm25_meta.json` (passage ids in row order and the tokenisation settings), so loading never unpickles.

    >>> index = build_bm25_index(corpus)
    >>> save_bm25_index(index, "/tmp/bm25")
    >>> ids, scores = search_bm25(load_bm25_index("/tmp/bm25"), ["who wrote hamlet?"], k=10)
"""

import dataclasses
import os
import pathlib
from typing import Sequence

import bm25s
import gin
import numpy as np

from rankrag_jax.retrieval import corpus as corpus_lib

META_FILE = "bm25_meta.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Bm25Index:
  """A bm25s index and the passage id of each of its rows."""
  retriever: bm25s.BM25
  doc_ids: tuple[str, ...]
  stopwords: str | None = "en"

  def __len__(self) -> int:
    return len(self.doc_ids)


def tokenize(texts: Sequence[str], stopwords: str | None) -> list[list[str]]:
  # Strings (not bm25s' per-call ids) so queries map onto the index vocabulary by word.
  return bm25s.tokenize(list(texts), stopwords=stopwords, return_ids=False, show_progress=False)


@gin.configurable(denylist=["corpus"])
def build_bm25_index(corpus: corpus_lib.Corpus,
                     k1: float = 0.9,
                     b: float = 0.4,
                     method: str = "lucene",
                     stopwords: str | None = "en",
                     show_progress: bool = False) -> Bm25Index:
  """Indexes every passage of `corpus` (as `passage_text`) for BM25 search.

  Args:
    corpus: the passages.
    k1: term-frequency saturation. The defaults (k1 0.9, b 0.4) are Pyserini's, the usual BM25 baseline
      in open-domain QA.
    b: document-length normalisation.
    method: bm25s scoring variant ("lucene", "robertson", "atire", "bm25l", "bm25+").
    stopwords: a bm25s stopword-list name ("en") or None for none.
    show_progress: show bm25s' progress bars while indexing.

  Returns:
    A `Bm25Index`.
  """
  retriever = bm25s.BM25(k1=k1, b=b, method=method, backend="numpy")
  retriever.index(tokenize(corpus.passages(), stopwords), show_progress=show_progress)
  return Bm25Index(retriever=retriever, doc_ids=tuple(corpus.ids), stopwords=stopwords)


def search_bm25(index: Bm25Index,
                queries: Sequence[str],
                k: int,
                show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """The top `k` passages of each query, best first.

  A query with no indexed word scores every passage 0 (its ranking is then arbitrary). `k` larger than the
  corpus is clipped to the corpus size.

  Returns:
    (ids, scores): passage ids `[Q, k]` (numpy strings) and BM25 scores `[Q, k]` float32.
  """
  if isinstance(queries, str):
    raise TypeError("search_bm25 takes a sequence of queries, not one string")
  k = min(k, len(index))
  if len(queries) == 0:  # len: queries may be a numpy array.
    return np.empty((0, k), dtype=str), np.empty((0, k), dtype=np.float32)
  # backend_selection="numpy": bm25s would otherwise run a jax top-k per query (one compile per corpus size).
  rows, scores = index.retriever.retrieve(tokenize(queries, index.stopwords), k=k, sorted=True,
                                          show_progress=show_progress, backend_selection="numpy")
  doc_ids = np.asarray(index.doc_ids)
  return doc_ids[np.asarray(rows)], np.asarray(scores, dtype=np.float32)


def save_bm25_index(index: Bm25Index, directory: str | os.PathLike) -> None:
  """Writes `index` into `directory` (created if needed) with bm25s' save plus our `bm25_meta.json`."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  # corpus=None: the passages live in the corpus file; the index stores only ids (in our meta file).
  index.retriever.save(str(directory), corpus=None, allow_pickle=False, show_progress=False)
  meta = {"format_version": FORMAT_VERSION, "stopwords": index.stopwords, "doc_ids": list(index.doc_ids)}
  corpus_lib.write_index_meta(directory, META_FILE, meta)


def load_bm25_index(directory: str | os.PathLike, mmap: bool = False) -> Bm25Index:
  """Reads an index written by `save_bm25_index`; `mmap=True` memory-maps the score matrix (large corpora)."""
  meta = corpus_lib.read_index_meta(directory, META_FILE, "BM25", FORMAT_VERSION, ("doc_ids", "stopwords"))
  retriever = bm25s.BM25.load(str(directory), load_corpus=False, mmap=mmap, allow_pickle=False,
                              show_progress=False)
  num_docs = retriever.scores["num_docs"]
  if num_docs != len(meta["doc_ids"]):
    raise ValueError(f"{directory}: the index has {num_docs} rows but {META_FILE} lists "
                     f"{len(meta['doc_ids'])} passage ids")
  return Bm25Index(retriever=retriever, doc_ids=tuple(meta["doc_ids"]), stopwords=meta["stopwords"])
