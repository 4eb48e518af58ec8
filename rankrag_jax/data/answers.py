"""Answer matching shared by data building and evaluation: SQuAD normalisation, containment, n-gram recall.

One place for these rules so that "relevant" means the same thing when we label training passages
(RankRAG §4.2: a retrieved context is relevant when it contains an answer) and when `evaluate.py` scores
Recall@k and exact match (§5, App. E).
"""

import collections
import re
import string
from typing import Iterable

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """SQuAD v1.1 official normalisation: lowercase, drop punctuation and articles, squeeze whitespace."""
  text = text.lower().translate(_DROP_PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(prediction: str, answers: Iterable[str]) -> bool:
  """SQuAD exact match against any of the gold answers."""
  prediction = normalize_answer(prediction)
  return any(prediction == normalize_answer(a) for a in answers)


def has_answer(text: str, answers: Iterable[str]) -> bool:
  """True when some answer occurs in `text` as a whole-word sequence, both sides SQuAD-normalised.

  Whole words (not substrings) so that the answer "two" does not match "network". An answer that normalises
  to nothing (e.g. "the") can never match: it carries no evidence.
  """
  padded_text = f" {normalize_answer(text)} "
  for answer in answers:
    normalized = normalize_answer(answer)
    if normalized and f" {normalized} " in padded_text:
      return True
  return False


def _ngrams(tokens: list[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def ngram_recall(chunk: str, reference: str, n: int = 4) -> float:
  """Fraction of the reference's n-grams that also occur in `chunk` (clipped counts, normalised words).

  RankRAG §4.2 labels conversational ranking chunks by 4-gram recall against the answer. A reference shorter
  than n words uses n = its length, so a three-word answer is judged on its trigram rather than never matching.
  An empty reference has recall 0.
  """
  reference_tokens = normalize_answer(reference).split()
  if not reference_tokens:
    return 0.0
  n = min(n, len(reference_tokens))
  reference_grams = _ngrams(reference_tokens, n)
  chunk_grams = _ngrams(normalize_answer(chunk).split(), n)
  overlap = sum(min(count, chunk_grams[gram]) for gram, count in reference_grams.items())
  return overlap / sum(reference_grams.values())
