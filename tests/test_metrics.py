"""The paper's metrics on hand-checked cases (SQuAD normalisation, DPR-style has_answer)."""
import pytest

from rankrag_jax import metrics


def test_exact_match_uses_squad_normalisation():
  assert metrics.exact_match_score("The  Paris!", ["paris"]) == 1.0
  assert metrics.exact_match_score("Paris, France", ["paris"]) == 0.0


def test_f1_is_token_overlap_best_over_answers():
  # pred {eiffel, tower}; gold {eiffel, tower, in, paris}: P=1, R=0.5 -> F1=2/3.
  assert metrics.f1_score("the Eiffel tower", ["Eiffel Tower in Paris", "London"]) == pytest.approx(2 / 3)
  assert metrics.f1_score("nothing shared", ["Paris"]) == 0.0


@pytest.mark.parametrize("prediction,label,expected", [
    ("True", True, 1.0), ("false.", "REFUTES", 1.0), ("True, because", "false", 0.0), ("Maybe", True, 0.0)])
def test_true_false_accuracy(prediction, label, expected):
  assert metrics.true_false_accuracy(prediction, label) == expected


def test_recall_and_mrr():
  ranked = ["a passage about London", "the capital is Paris", "other"]
  assert metrics.answer_recall_at_k(ranked, ["Paris"], 1) == 0.0
  assert metrics.answer_recall_at_k(ranked, ["Paris"], 2) == 1.0
  assert metrics.gold_recall_at_k(["p3", "p7"], ["p7"], 1) == 0.0
  assert metrics.gold_recall_at_k(["p3", "p7"], ["p7"], 2) == 1.0
  assert metrics.reciprocal_rank(["p3", "p7"], ["p7"]) == 0.5
  assert metrics.reciprocal_rank(["p3"], ["p7"]) == 0.0


def test_summary_table(tmp_path):
  rows = [{"em": 1.0, "f1": 1.0}, {"em": 0.0, "f1": 0.5}]
  summary = metrics.summarize(rows, ["em", "f1"])
  assert summary == {"examples": 2, "em": 50.0, "f1": 75.0}
  path = metrics.write_summary_table({"bm25": summary}, tmp_path, "demo")
  assert "| bm25 | 2 | 50.0 | 75.0 |" in path.read_text()


def test_summary_table_keeps_the_metrics_order(tmp_path):
  summaries = {"bm25": {"examples": 3, "recall@5": 80.0, "recall@10": 90.0},
               "rerank": {"examples": 3, "recall@5": 85.0, "recall@10": 90.0, "mrr": 70.0}}
  lines = metrics.write_summary_table(summaries, tmp_path, "demo").read_text().splitlines()
  assert lines[2] == "| system | examples | recall@5 | recall@10 | mrr |"
  assert lines[5] == "| rerank | 3 | 85.0 | 90.0 | 70.0 |"
