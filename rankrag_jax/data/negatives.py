"""BM25 hard negatives and BM25-retrieved contexts for the Stage-II ranking and RA data (RankRAG §4.2).

BM25 is the project's one BM25 (`retrieval.bm25`: bm25s, Pyserini's k1/b, English stop words), the same that
`evaluate.py` retrieves with, so "BM25 hard negative" means the same ranking in training and evaluation. This
module only chooses which hits to keep:
  * `mine_bm25_negatives`: top hits that contain no answer (SQuAD-normalised, `answers.has_answer`) and are
    not the gold passage: the (q, c-) pairs of context ranking.
  * `retrieve_bm25_contexts`: top hits other than the gold passage, answer-bearing or not: the "BM25
    top-retrieved contexts" that RA-QA and RA-ranking mix with the gold context.
"""

from typing import Collection, Sequence

import gin

from rankrag_jax.data.answers import has_answer
from rankrag_jax.retrieval import bm25
from rankrag_jax.retrieval import corpus as corpus_lib


def _searchable_text(passage: dict) -> str:
  return f"{passage.get('title', '')} {passage['text']}".strip()


class Bm25Index:
  """`retrieval.bm25` over corpus passages `{id, title, text}` (indexed as `passage_text(title, text)`)."""

  def __init__(self, corpus: Sequence[dict]):
    if not corpus:
      raise ValueError("cannot index an empty corpus")
    self.corpus = list(corpus)
    self._index = bm25.build_bm25_index(corpus_lib.corpus_from_rows(self.corpus, source="BM25 corpus"))
    self._position = {p["id"]: i for i, p in enumerate(self.corpus)}

  def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
    """Top-k (corpus index, score) per query, best first; hits with score 0 (no shared term) are dropped."""
    if not queries:
      return []
    ids, scores = bm25.search_bm25(self._index, list(queries), k)
    return [[(self._position[str(i)], float(s)) for i, s in zip(row_ids, row_scores) if s > 0]
            for row_ids, row_scores in zip(ids, scores)]


def _as_id_set(gold) -> Collection[str]:
  if gold is None:
    return ()
  return {gold} if isinstance(gold, str) else set(gold)


def _filtered_hits(questions, corpus, k, *, gold_ids, keep, index, search_depth) -> list[list[dict]]:
  if gold_ids is not None and len(gold_ids) != len(questions):
    raise ValueError(f"{len(gold_ids)} gold ids for {len(questions)} questions")
  index = index or Bm25Index(corpus)
  depth = search_depth or max(4 * k, k + 20)  # room for hits that the filters reject.
  results = []
  for q, hits in enumerate(index.search(questions, depth)):
    excluded = _as_id_set(gold_ids[q] if gold_ids is not None else None)
    kept = []
    for corpus_index, _ in hits:
      passage = index.corpus[corpus_index]
      if passage["id"] in excluded or not keep(q, passage):
        continue
      kept.append(passage)
      if len(kept) == k:
        break
    results.append(kept)
  return results


@gin.configurable
def mine_bm25_negatives(questions: Sequence[str], answers: Sequence[Sequence[str]], corpus: Sequence[dict],
                        k: int, *, gold_ids: Sequence | None = None, index: Bm25Index | None = None,
                        search_depth: int | None = None) -> list[list[dict]]:
  """Up to k BM25 hard negatives per question: top hits containing no answer string, gold excluded.

  Args:
    questions: query texts.
    answers: per question, its answer strings (SQuAD-normalised containment decides "contains").
    corpus: passages `{id, title, text}`; ignored when `index` (built over the same corpus) is given.
    k: negatives wanted per question; fewer are returned when the first `search_depth` hits run out.
    gold_ids: per question, the gold passage id (or ids) never to return.
    index: a prebuilt `Bm25Index`, to share one index across calls.
    search_depth: how many BM25 hits to scan per question (default max(4k, k + 20)).

  Returns:
    Per question, the kept corpus passages, best BM25 score first.
  """
  if len(answers) != len(questions):
    raise ValueError(f"{len(answers)} answer lists for {len(questions)} questions")
  # Title and text both checked: a passage whose title names the answer is not a negative.
  return _filtered_hits(questions, corpus, k, gold_ids=gold_ids, index=index, search_depth=search_depth,
                        keep=lambda q, passage: not has_answer(_searchable_text(passage), answers[q]))


@gin.configurable
def retrieve_bm25_contexts(questions: Sequence[str], corpus: Sequence[dict], k: int, *,
                           gold_ids: Sequence | None = None, index: Bm25Index | None = None,
                           search_depth: int | None = None) -> list[list[dict]]:
  """Top-k BM25 passages per question other than the gold one(s), whether or not they contain an answer."""
  return _filtered_hits(questions, corpus, k, gold_ids=gold_ids, index=index, search_depth=search_depth,
                        keep=lambda q, passage: True)
