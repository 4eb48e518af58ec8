"""Shared plumbing for the experiment scripts: the held-out systems, running them, reading their predictions.

Every system is one `rankrag_jax.evaluate.run_evaluation` call with its own output directory under RUNS_DIR, so
each script can be killed and re-run (finished examples are skipped) and the tables are rebuilt from the
predictions files alone.
"""

import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rankrag_jax import evaluate  # noqa: E402
from rankrag_jax.data.answers import has_answer  # noqa: E402
from rankrag_jax.retrieval import corpus as corpus_lib  # noqa: E402

RESULTS_DIR = REPO / "experiments" / "results"
DEFAULT_RUNS_DIR = os.environ.get("RANKRAG_EVAL_RUNS", "/tmp/ev/runs")
ZERO_SHOT = "smollm2_135m_instruct"
HELDOUT, CORPUS = "blend:heldout.jsonl", "blend:corpus.jsonl"


def heldout_systems(tuned_checkpoint: str | None) -> dict[str, dict]:
  """name -> run_evaluation settings, for the held-out split (BM25 / dense / zero-shot / tuned)."""
  systems = {
      "bm25": dict(retriever="bm25", n=20, use_reranker=False, generate_answers=False, label="BM25"),
      "dense": dict(retriever="dense", n=20, use_reranker=False, generate_answers=False,
                    label="dense (all-MiniLM-L6-v2, faiss)"),
  }
  # The paper's prompts in ChatQA's plain-text format (what our Stage II trains on), and, for the zero-shot
  # model, the same prompts inside SmolLM2-Instruct's own chat template (ChatML), the format it was tuned on.
  models = [("zs", ZERO_SHOT, "SmolLM2-135M-Instruct zero-shot", "chatqa"),
            ("zsct", ZERO_SHOT, "SmolLM2-135M-Instruct zero-shot, its chat template", "chat_template")]
  if tuned_checkpoint:
    models.append(("tuned", tuned_checkpoint, "SmolLM2-135M + our Stage-II", "chatqa"))
  for key, checkpoint, label, chat_format in models:
    shared = dict(retriever="bm25", k=5, checkpoint=checkpoint, chat_format=chat_format)
    systems[f"{key}_rerank20_gen5"] = dict(n=20, use_reranker=True, label=f"BM25 top-20 -> {label} P(True) rerank",
                                           **shared)
    systems[f"{key}_norerank_gen5"] = dict(n=5, use_reranker=False, label=f"BM25 top-5 -> {label} (w/o reranking)",
                                           **shared)
  return systems


def run_system(runs_dir: str, name: str, settings: dict, limit: int | None, dataset: str = HELDOUT,
               corpus: str | None = CORPUS, **extra) -> dict:
  """Runs (or resumes) one system; returns its summary over the first `limit` examples."""
  settings = {k: v for k, v in settings.items() if k != "label"}
  return evaluate.run_evaluation(dataset=dataset, corpus=corpus, out_dir=str(pathlib.Path(runs_dir) / name),
                                 limit=limit, system_name=name, recall_ks=(1, 5, 10, 20), **settings, **extra)


def read_predictions(runs_dir: str, name: str, ids: list[str] | None = None) -> list[dict]:
  """A system's prediction records, restricted to (and ordered by) `ids` when given."""
  path = pathlib.Path(runs_dir) / name / "predictions.jsonl"
  if not path.exists():
    return []
  records = {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
  return list(records.values()) if ids is None else [records[i] for i in ids if i in records]


def run_info(runs_dir: str, name: str) -> dict:
  path = pathlib.Path(runs_dir) / name / "run.json"
  return json.loads(path.read_text()) if path.exists() else {}


def heldout_ids(limit: int | None = None) -> list[str]:
  return [e["id"] for e in evaluate.read_eval_dataset(evaluate.resolve_path(HELDOUT))][:limit]


def mean(values) -> float | None:
  values = list(values)
  return 100.0 * sum(values) / len(values) if values else None


def recall_curve(records: list[dict], corpus, max_k: int = 20) -> dict[str, list[float]]:
  """Answer- and gold-Recall@k for k = 1..max_k over `records`' final rankings (in %)."""
  answer_hits, gold_hits = [], []
  for record in records:
    ids = [c["id"] for c in record["ranked"]][:max_k]
    texts = corpus.passages_by_id(ids)
    first_answer = next((i for i, t in enumerate(texts) if has_answer(t, record["answers"])), None)
    first_gold = next((i for i, p in enumerate(ids) if p in set(record["gold_ids"])), None)
    answer_hits.append(first_answer)
    gold_hits.append(first_gold)
  curve = lambda hits: [mean(h is not None and h < k for h in hits) for k in range(1, max_k + 1)]
  return {"answer_recall": curve(answer_hits), "gold_recall": curve(gold_hits)}


def pairwise_auc(records: list[dict], corpus) -> float | None:
  """P(answer-containing passage scored above a non-containing one of the same question), ties half (in %).

  50 = the scores carry no relevance signal; below 50 = they prefer the wrong passages.
  """
  wins, pairs = 0.0, 0
  for record in records:
    if "p_true" not in record["ranked"][0]:
      return None
    texts = corpus.passages_by_id([c["id"] for c in record["ranked"]])
    pos = [c["p_true"] for c, t in zip(record["ranked"], texts) if has_answer(t, record["answers"])]
    neg = [c["p_true"] for c, t in zip(record["ranked"], texts) if not has_answer(t, record["answers"])]
    for p in pos:
      for q in neg:
        wins += 1.0 if p > q else 0.5 if p == q else 0.0
        pairs += 1
  return 100.0 * wins / pairs if pairs else None


def heldout_corpus():
  return corpus_lib.read_corpus_jsonl(evaluate.resolve_path(CORPUS))


def fmt(value, digits: int = 1) -> str:
  return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"
