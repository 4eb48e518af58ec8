"""Issue #34's ranking table on the whole held-out split (EfficientQA test, 1,769 questions), and a run's curves.

    python experiments/heldout_ranking.py --tuned runs/rank_a/hf [--systems bm25,dense,zs,zsct,tuned] [--n 20]
    python experiments/heldout_ranking.py --curve runs/rank_b,runs/rank_f   # learning curves only (one figure)

Reranking reorders each question's BM25 top-N, so a question with no answer-bearing passage in its top N has
answer-Recall@k 0 under every reranker. Only the others ("rerankable") are scored by the model; Recall@k is then
counted over all held-out questions (hits / 1,769): exact, at a fraction of the cost (~17% of questions at N=20).
Dense retrieval (all-MiniLM-L6-v2) runs on every held-out question: its own top N, no reranking.
AUC is P("True")'s pairwise AUC over each rerankable question's own (answer passage, other passage) pairs.

Writes experiments/results/heldout_ranking.{md,json} and, with --curve, experiments/results/learning_curve.png.
"""

import argparse
import json
import pathlib
import re
import time

import common  # noqa: F401  (puts the repository on sys.path)
import numpy as np

from rankrag_jax import evaluate
from rankrag_jax.data.answers import has_answer
from rankrag_jax.retrieval import bm25
from rankrag_jax.retrieval import corpus as corpus_lib
from rankrag_jax.training import metrics as metrics_lib
from rankrag_jax.training.ranking_eval import pooled_auc

KS = (1, 5, 20)


def rerankable_subset(n: int, out_path: pathlib.Path) -> tuple[int, int, dict]:
  """Writes the held-out questions with an answer passage in their BM25 top n; returns (all, kept, corpus texts)."""
  rows = evaluate.read_eval_dataset(evaluate.resolve_path(common.HELDOUT))
  corpus = corpus_lib.read_corpus_jsonl(evaluate.resolve_path(common.CORPUS))
  text_of = dict(zip(corpus.ids, corpus.passages()))
  ids, _ = bm25.search_bm25(bm25.build_bm25_index(corpus), [r["question"] for r in rows], n)
  kept = [r for r, hits in zip(rows, ids) if any(has_answer(text_of[str(i)], r["answers"]) for i in hits)]
  with open(out_path, "w", encoding="utf-8") as f:
    for r in kept:
      f.write(json.dumps({"id": r["id"], "question": r["question"], "answers": r["answers"]}) + "\n")
  return len(rows), len(kept), text_of


def system_settings(key: str, tuned: str | None, n: int) -> tuple[str, dict]:
  shared = dict(retriever="bm25", n=n, generate_answers=False)
  if key == "bm25":
    return "BM25", dict(use_reranker=False, **shared)
  if key == "dense":  # its own top n: run on every held-out question, not BM25's rerankable subset
    return "dense (all-MiniLM-L6-v2, faiss)", dict(shared, retriever="dense", use_reranker=False)
  checkpoint, chat_format, label = {
      "zs": (common.ZERO_SHOT, "chatqa", "SmolLM2-135M-Instruct zero-shot (ChatQA text)"),
      "zsct": (common.ZERO_SHOT, "chat_template", "SmolLM2-135M-Instruct zero-shot (its ChatML template)"),
      "tuned": (tuned, "chatqa", f"SmolLM2-135M + our Stage II ({tuned})")}[key]
  return f"BM25 top-{n} -> {label} P(True)", dict(use_reranker=True, checkpoint=checkpoint, chat_format=chat_format,
                                                   **shared)


def score_system(records: list[dict], total: int, text_of: dict, reranked: bool) -> dict:
  hits = {k: sum(any(has_answer(text_of[c["id"]], r["answers"]) for c in r["ranked"][:k]) for r in records)
          for k in KS}
  result = {f"R@{k}": 100 * hits[k] / total for k in KS}
  if reranked:
    result["AUC"] = 100 * pooled_auc([(np.array([c["p_true"] for c in r["ranked"]]),
                                       np.array([has_answer(text_of[c["id"]], r["answers"]) for c in r["ranked"]]))
                                      for r in records])
  return result


def learning_curve(run_dirs: list[pathlib.Path], out: pathlib.Path, rows_per_step: int) -> dict[str, list[dict]]:
  """One figure: each run's in-training AUC and reranked Recall@5 against packed rows seen (BM25's Recall@5 and
  AUC 0.5 for reference)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  curves = {}
  for run_dir in run_dirs:
    if not (run_dir / "metrics.jsonl").is_file():
      raise SystemExit(f"--curve: {run_dir} is not a training run directory (no metrics.jsonl)")
    points = [r for r in metrics_lib.read_metrics(run_dir) if "rank/auc" in r]
    if not points:
      raise SystemExit(f"--curve: {run_dir / 'metrics.jsonl'} has no ranking evaluations (rank/auc); train with "
                       "loop.train.ranking_eval = True (gin_configs/rank_smollm2_cpu.gin)")
    curves[run_dir.name] = points
    seen = [r["step"] * rows_per_step for r in points]
    axes[0].plot(seen, [r["rank/auc"] for r in points], marker="o", label=run_dir.name)
    axes[1].plot(seen, [r["rank/recall@5"] for r in points], marker="o", label=run_dir.name)
  axes[0].axhline(0.5, color="grey", ls=":", label="chance")
  bm25 = next(iter(curves.values()))[0]["rank/bm25_recall@5"]
  axes[1].axhline(bm25, color="black", ls="--", label="BM25")
  axes[0].set(xlabel=f"packed rows seen ({rows_per_step}/step)", ylabel="P(True) pairwise AUC", title="ranking AUC")
  axes[1].set(xlabel=f"packed rows seen ({rows_per_step}/step)", ylabel="answer-Recall@5 of BM25 top-20",
              title="Recall@5 of the reranked top 20")
  for ax in axes:
    ax.legend(fontsize=8)
  questions = int(next(iter(curves.values()))[0]["rank/questions"])
  fig.suptitle(f"in-training evaluation on {questions} validation-split NQ questions")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  return curves


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tuned", default=None, help="the tuned checkpoint (an HF dir, e.g. runs/rank_a/hf)")
  parser.add_argument("--systems", default="bm25,zs,zsct,tuned")
  parser.add_argument("--n", type=int, default=20)
  parser.add_argument("--runs_dir", default=common.DEFAULT_RUNS_DIR)
  parser.add_argument("--curve", default=None, help="run directories, comma-separated: plot their in-training "
                      "ranking metrics in one figure")
  parser.add_argument("--curve_out", default="learning_curve.png", help="the figure's name under results/")
  parser.add_argument("--rows_per_step", type=int, default=4)
  args = parser.parse_args()
  common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  if args.curve:
    curves = learning_curve([pathlib.Path(d) for d in args.curve.split(",")], common.RESULTS_DIR / args.curve_out,
                            args.rows_per_step)
    print(json.dumps({name: [{k: r[k] for k in ("step", "rank/auc", "rank/recall@1", "rank/recall@5", "qa/em",
                                                 "qa/f1") if k in r} for r in points]
                      for name, points in curves.items()}, indent=1))
    return
  runs_dir = pathlib.Path(args.runs_dir)
  runs_dir.mkdir(parents=True, exist_ok=True)
  subset = runs_dir / f"heldout_rerankable_n{args.n}.jsonl"
  total, kept, text_of = rerankable_subset(args.n, subset)
  print(f"{kept} of {total} held-out questions have an answer passage in their BM25 top {args.n}")
  results_path = common.RESULTS_DIR / "heldout_ranking.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  for key in args.systems.split(","):
    if key == "tuned" and not args.tuned:
      continue
    label, settings = system_settings(key, args.tuned, args.n)
    start = time.time()
    # One row per tuned checkpoint: its path is in the name, so evaluating another one adds a row.
    tag = "_" + re.sub(r"\W+", "_", args.tuned).strip("_") if key == "tuned" else ""
    name = f"heldout_{key}{tag}_n{args.n}"
    dataset = evaluate.resolve_path(common.HELDOUT) if settings["retriever"] == "dense" else str(subset)
    evaluate.run_evaluation(dataset=dataset, corpus=common.CORPUS, out_dir=str(runs_dir / name), system_name=name,
                            recall_ks=KS, show_progress=True, **settings)
    records = [json.loads(line) for line in (runs_dir / name / "predictions.jsonl").read_text().splitlines()]
    scored = len(records) if settings["retriever"] == "dense" else kept
    results[name] = {"system": label, "questions": total, "scored": scored, "n": args.n, "wall_s": time.time() - start,
                     **score_system(records, total, text_of, settings["use_reranker"])}
    print(json.dumps(results[name]))
    results_path.write_text(json.dumps(results, indent=1) + "\n")
  lines = ["| system | questions (scored) | R@1 | R@5 | R@20 | AUC | wall (s) |", "|---|---|---|---|---|---|---|"]
  for r in results.values():
    auc = f"{r['AUC']:.1f}" if "AUC" in r else "-"
    lines.append(f"| {r['system']} | {r['questions']} ({r['scored']}) | {r['R@1']:.1f} | {r['R@5']:.1f} | "
                 f"{r['R@20']:.1f} | {auc} | {r['wall_s']:.0f} |")
  (common.RESULTS_DIR / "heldout_ranking.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
