"""Dense retrieval: sentence-encoder embeddings of a `Corpus` in a faiss inner-product index.

Embeddings are L2-normalised (see `bert.encode_texts`), so inner product is cosine similarity. Index types:

  "flat"  exact search (`IndexFlatIP`); the default, right up to a few million passages.
  "ivf"   `IndexIVFFlat`: k-means into `nlist` cells, search `nprobe` of them; approximate, needs training.
  "hnsw"  `IndexHNSWFlat`: graph search with `hnsw_m` links per node; approximate, no training.

On disk an index is a directory with faiss' own `dense.faiss` (`faiss.write_index`) and `dense_meta.json`
(passage ids in row order, the index type). faiss serialises `nprobe`/`efSearch` with the index.

    >>> retriever = build_dense_retriever(corpus)
    >>> ids, scores = retriever.search(["who wrote hamlet?"], k=10)
"""

import dataclasses
import math
import os
import pathlib
from typing import Sequence

import faiss
import gin
import numpy as np

from rankrag_jax.retrieval import bert
from rankrag_jax.retrieval import corpus as corpus_lib

INDEX_FILE = "dense.faiss"
META_FILE = "dense_meta.json"
FORMAT_VERSION = 1
INDEX_TYPES = ("flat", "ivf", "hnsw")


@dataclasses.dataclass(frozen=True, eq=False)
class DenseIndex:
  """A faiss index and the passage id of each of its rows."""
  index: faiss.Index
  doc_ids: tuple[str, ...]
  index_type: str = "flat"

  def __len__(self) -> int:
    return self.index.ntotal

  @property
  def dim(self) -> int:
    return self.index.d


@gin.configurable(denylist=["encoder", "corpus"])
def embed_corpus(encoder: bert.SentenceEncoder,
                 corpus: corpus_lib.Corpus,
                 batch_size: int = 64,
                 show_progress: bool = True) -> np.ndarray:
  """Embeds every passage (as `passage_text`) -> `[N, dim]` float32, with a tqdm progress bar."""
  return bert.encode_texts(encoder, corpus.passages(), batch_size=batch_size, show_progress=show_progress,
                           progress_desc="Embedding corpus")


def _default_nlist(num_vectors: int) -> int:
  # ~4*sqrt(N) cells (faiss' guideline), but >= 39 training points per cell so k-means is not degenerate.
  return max(1, min(round(4 * math.sqrt(num_vectors)), num_vectors // 39))


@gin.configurable(denylist=["embeddings", "doc_ids"])
def build_dense_index(embeddings: np.ndarray,
                      doc_ids: Sequence[str],
                      index_type: str = "flat",
                      nlist: int | None = None,
                      nprobe: int = 16,
                      hnsw_m: int = 32,
                      ef_construction: int = 200,
                      ef_search: int = 128,
                      seed: int = 0) -> DenseIndex:
  """Builds a faiss inner-product index over `embeddings` `[N, dim]` whose row `i` is passage `doc_ids[i]`.

  Args:
    embeddings: passage embeddings (L2-normalised for cosine scores).
    doc_ids: passage id of each row.
    index_type: "flat" (exact), "ivf" (IVFFlat) or "hnsw" (HNSWFlat); see the module docstring.
    nlist: IVF cells; default ~4*sqrt(N).
    nprobe: IVF cells searched per query (recall vs speed).
    hnsw_m: HNSW links per node.
    ef_construction: HNSW candidate list size while building.
    ef_search: HNSW candidate list size while searching (recall vs speed).
    seed: IVF k-means seed, for reproducible indexes.
  """
  embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
  if embeddings.ndim != 2 or not len(embeddings):
    raise ValueError(f"embeddings must be a non-empty [N, dim] array, got shape {embeddings.shape}")
  if len(doc_ids) != len(embeddings):
    raise ValueError(f"{len(doc_ids)} doc_ids for {len(embeddings)} embeddings")
  dim = embeddings.shape[1]
  if index_type == "flat":
    index = faiss.IndexFlatIP(dim)
  elif index_type == "ivf":
    nlist = nlist or _default_nlist(len(embeddings))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(embeddings)
    index.nprobe = min(nprobe, nlist)
  elif index_type == "hnsw":
    index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.hnsw.efSearch = ef_search
  else:
    raise ValueError(f"unknown index_type {index_type!r}; choose one of {INDEX_TYPES}")
  index.add(embeddings)
  return DenseIndex(index=index, doc_ids=tuple(doc_ids), index_type=index_type)


def search_dense(index: DenseIndex, query_embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The top `k` passages for each query embedding `[Q, dim]`, best first.

  `k` larger than the index is clipped to its size. Approximate indexes may find fewer than `k` passages;
  the missing slots get id "" and score -inf.

  Returns:
    (ids, scores): passage ids `[Q, k]` (numpy strings) and inner products `[Q, k]` float32.
  """
  query_embeddings = np.ascontiguousarray(query_embeddings, dtype=np.float32)
  if query_embeddings.ndim != 2 or query_embeddings.shape[1] != index.dim:
    raise ValueError(f"query embeddings must be [Q, {index.dim}], got shape {query_embeddings.shape}")
  k = min(k, len(index))
  if not len(query_embeddings):
    return np.empty((0, k), dtype=str), np.empty((0, k), dtype=np.float32)
  scores, rows = index.index.search(query_embeddings, k)
  # faiss marks missing results with row -1, which picks the appended "" below.
  ids = np.asarray(index.doc_ids + ("",))[rows]
  return ids, np.where(rows >= 0, scores, -np.inf).astype(np.float32)


def save_dense_index(index: DenseIndex, directory: str | os.PathLike) -> None:
  """Writes `index` into `directory` (created if needed): `dense.faiss` + `dense_meta.json`."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  faiss.write_index(index.index, str(directory / INDEX_FILE))
  meta = {"format_version": FORMAT_VERSION, "index_type": index.index_type, "dim": index.dim,
          "doc_ids": list(index.doc_ids)}
  corpus_lib.write_index_meta(directory, META_FILE, meta)


def load_dense_index(directory: str | os.PathLike, mmap: bool = False) -> DenseIndex:
  """Reads an index written by `save_dense_index`; `mmap=True` memory-maps it (large corpora)."""
  directory = pathlib.Path(directory)
  meta = corpus_lib.read_index_meta(directory, META_FILE, "dense", FORMAT_VERSION, ("doc_ids", "dim", "index_type"))
  flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
  index = faiss.read_index(str(directory / INDEX_FILE), flags)
  if index.ntotal != len(meta["doc_ids"]) or index.d != meta["dim"]:
    raise ValueError(f"{directory}: {INDEX_FILE} holds {index.ntotal} x {index.d} vectors but {META_FILE} "
                     f"lists {len(meta['doc_ids'])} ids of dim {meta['dim']}")
  return DenseIndex(index=index, doc_ids=tuple(meta["doc_ids"]), index_type=meta["index_type"])


@dataclasses.dataclass(frozen=True, eq=False)
class DenseRetriever:
  """A sentence encoder for queries plus the dense index of the corpus it embedded."""
  encoder: bert.SentenceEncoder
  index: DenseIndex

  def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeds `queries` and returns `search_dense`'s (ids `[Q, k]`, scores `[Q, k]`)."""
    return search_dense(self.index, bert.encode_texts(self.encoder, queries), k)


@gin.configurable(denylist=["corpus", "encoder"])
def build_dense_retriever(corpus: corpus_lib.Corpus,
                          encoder: bert.SentenceEncoder | None = None,
                          show_progress: bool = True) -> DenseRetriever:
  """Embeds `corpus` and indexes it. The encoder defaults to `load_sentence_encoder()`; the index type and its
  settings come from `build_dense_index` (Gin-configurable)."""
  encoder = encoder or bert.load_sentence_encoder()
  embeddings = embed_corpus(encoder, corpus, show_progress=show_progress)
  return DenseRetriever(encoder=encoder, index=build_dense_index(embeddings, corpus.ids))
