"""Metrics as RankRAG reports them (§5, App. E): EM / F1 (SQuAD normalisation), True/False accuracy,
answer-Recall@k (a top-k passage contains an answer string, DPR `has_answer` style), gold-passage Recall@k, MRR.

Per-example functions return floats in [0, 1]; `summarize` averages them into a table.
"""

import collections
import json
import pathlib
from typing import Iterable, Sequence

from rankrag_jax.data.answers import exact_match, has_answer, normalize_answer


def f1_score(prediction: str, answers: Iterable[str]) -> float:
  """SQuAD token F1, the best over gold answers."""
  pred_tokens = normalize_answer(prediction).split()
  best = 0.0
  for answer in answers:
    gold_tokens = normalize_answer(answer).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if not pred_tokens or not gold_tokens:
      best = max(best, float(pred_tokens == gold_tokens))
      continue
    if overlap == 0:
      continue
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    best = max(best, 2 * precision * recall / (precision + recall))
  return best


def exact_match_score(prediction: str, answers: Iterable[str]) -> float:
  return float(exact_match(prediction, answers))


def true_false_accuracy(prediction: str, label: bool | str) -> float:
  """FEVER-style accuracy: the prediction's first word read as True/False (anything else is wrong)."""
  words = normalize_answer(prediction).split()
  predicted = {"true": True, "false": False}.get(words[0] if words else "")
  if isinstance(label, str):
    label = {"true": True, "supports": True, "false": False, "refutes": False}[label.strip().lower()]
  return float(predicted is not None and predicted == label)


def answer_recall_at_k(ranked_passages: Sequence[str], answers: Iterable[str], k: int) -> float:
  """1 when any of the top-k passages contains an answer string (Table 6's Recall@k)."""
  answers = list(answers)
  return float(any(has_answer(p, answers) for p in ranked_passages[:k]))


def gold_recall_at_k(ranked_ids: Sequence[str], gold_ids: Iterable[str], k: int) -> float:
  """1 when a gold passage id is among the top k."""
  gold = set(gold_ids)
  return float(any(pid in gold for pid in ranked_ids[:k]))


def reciprocal_rank(ranked_ids: Sequence[str], gold_ids: Iterable[str]) -> float:
  gold = set(gold_ids)
  for rank, pid in enumerate(ranked_ids, start=1):
    if pid in gold:
      return 1.0 / rank
  return 0.0


def summarize(rows: Sequence[dict], metric_names: Sequence[str]) -> dict:
  """Mean of each metric over rows that have it, with the count."""
  summary = {"examples": len(rows)}
  for name in metric_names:
    values = [row[name] for row in rows if name in row]
    if values:
      summary[name] = 100.0 * sum(values) / len(values)
  return summary


def write_summary_table(summaries: dict[str, dict], out_dir: str | pathlib.Path, title: str) -> pathlib.Path:
  """Writes `summary.json` and `summary.md` (one row per system, metrics as columns, in %)."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "summary.json").write_text(json.dumps(summaries, indent=2))
  columns = []  # first-seen order (the summaries' own: EM, F1, recall@1, @5, @20, ...), not alphabetical.
  for summary in summaries.values():
    columns += [key for key in summary if key != "examples" and key not in columns]
  lines = [f"# {title}", "", "| system | examples | " + " | ".join(columns) + " |",
           "|---|---|" + "---|" * len(columns)]
  for system, summary in summaries.items():
    cells = [f"{summary[c]:.1f}" if c in summary else "" for c in columns]
    lines.append(f"| {system} | {summary.get('examples', '')} | " + " | ".join(cells) + " |")
  path = out_dir / "summary.md"
  path.write_text("\n".join(lines) + "\n")
  return path
