"""In-training ranking / QA metrics (training/ranking_eval.py): AUC and Recall@k against direct counts."""

import itertools

import numpy as np
import pytest

from rankrag_jax import rerank
from rankrag_jax.training import ranking_eval

PASSAGES = ["Paris is the capital and largest city of France.", "Berlin is the capital of Germany.",
            "The Seine flows through Paris.", "Bread is made from flour, water and yeast."]


def _brute_force_auc(per_question):
  wins = pairs = 0.0
  for scores, labels in per_question:
    for i, j in itertools.product(range(len(scores)), repeat=2):
      if labels[i] and not labels[j]:
        pairs += 1
        wins += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
  return wins / pairs


def test_pooled_auc_counts_within_question_pairs_and_ties_half():
  rng = np.random.default_rng(0)
  per_question = [(rng.integers(0, 4, size=n).astype(float), rng.random(n) < 0.3) for n in (5, 20, 20, 7)]
  per_question = [(s, l) for s, l in per_question if l.any() and not l.all()]
  assert ranking_eval.pooled_auc(per_question) == pytest.approx(_brute_force_auc(per_question))
  perfect = [(np.array([0.9, 0.1, 0.2]), np.array([True, False, False]))]
  assert ranking_eval.pooled_auc(perfect) == 1.0
  assert ranking_eval.pooled_auc([(np.array([0.1, 0.9]), np.array([True, False]))]) == 0.0
  # Pairs never cross questions: a question whose scores are all higher than another's does not help it.
  crossed = [(np.array([0.8, 0.9]), np.array([True, False])), (np.array([0.1, 0.0]), np.array([True, False]))]
  assert ranking_eval.pooled_auc(crossed) == 0.5


def test_evaluate_reports_the_models_own_ranking(make_tiny_rag_model):
  model = make_tiny_rag_model(256)
  questions = [{"id": "q1", "question": "What is the capital of France?", "answers": ["Paris"],
                "passages": PASSAGES, "labels": np.array([True, False, True, False]),
                "on_topic": np.array([True, False, False, False])},  # passage 3: an answer by coincidence.
               {"id": "q2", "question": "What is the capital of Germany?", "answers": ["Berlin"],
                "passages": PASSAGES[::-1], "labels": np.array([False, False, True, False]),
                "on_topic": np.array([False, False, True, False])}]
  evaluator = ranking_eval.RankingEval(questions=questions, k=2, max_new_tokens=3)
  # BM25's order is the passages' order: q1 orders 3 of its 4 pairs right, q2 1 of 3; on-topic: 2 of 2, 1 of 3.
  assert evaluator.bm25_reference == {"rank/bm25_recall@1": 0.5, "rank/bm25_recall@5": 1.0,
                                      "rank/bm25_auc": pytest.approx(4 / 7),
                                      "rank/bm25_auc_on_topic": pytest.approx(3 / 5)}
  result = evaluator.evaluate(model.params, model.config, model.tokenizer)
  scores = [rerank.score_passages(model.params, model.config, model.tokenizer, q["question"], q["passages"]).p_true
            for q in questions]
  assert result["rank/auc"] == pytest.approx(_brute_force_auc([(s, q["labels"]) for s, q in zip(scores, questions)]))
  keep = [q["on_topic"] | ~q["labels"] for q in questions]
  assert result["rank/auc_on_topic"] == pytest.approx(
      _brute_force_auc([(s[k], q["on_topic"][k]) for s, q, k in zip(scores, questions, keep)]))
  top1 = [q["labels"][int(np.argmax(s))] for s, q in zip(scores, questions)]
  assert result["rank/recall@1"] == pytest.approx(np.mean(top1))
  assert result["rank/recall@5"] == 1.0 and result["rank/questions"] == 2
  assert 0.0 <= result["qa/em"] <= result["qa/f1"] <= 1.0
  assert 0.0 <= result["qa/em_bm25"] <= result["qa/f1_bm25"] <= 1.0  # the same weights on BM25's own top k
  assert "ranking AUC" in evaluator.describe(result) and "without reranking" in evaluator.describe(result)
