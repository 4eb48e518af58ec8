"""Issue #34's ranking table on the whole held-out split (EfficientQA test, 1,769 questions), and a run's curves.

    python experiments/heldout_ranking.py --tuned runs/rank_a/hf [--systems bm25,dense,zs,zsct,tuned] [--n 20]
    python experiments/heldout_ranking.py --tuned runs/rank_i/hf --systems tuned --rerank_from dense  # dense top N
    python experiments/heldout_ranking.py --curve runs/rank_b,runs/rank_f   # learning curves only (one figure)
    python experiments/heldout_ranking.py --systems "" --rescore /tmp/ev/runs/heldout_zs_n20  # re-score, no model

Reranking reorders each question's BM25 top-N (or, with --rerank_from dense, a dense run's), so a question with no
answer-bearing passage in its top N has answer-Recall@k 0 under every reranker. Only the others ("rerankable") are
scored by the model; Recall@k is then counted over all held-out questions (hits / 1,769): exact, at a fraction of
the cost (~17% of questions at N=20, ~27% at N=100; then also Recall@N, the pool's own). A killed run resumes
from its predictions.jsonl.
Dense retrieval (all-MiniLM-L6-v2) runs on every held-out question: its own top N, no reranking.
AUC is P("True")'s pairwise AUC over each rerankable question's own (answer passage, other passage) pairs, beside
BM25's own score's AUC on the same pairs; "on-topic AUC" counts as positive only answer passages whose title is on
the question's topic (`blend.title_on_topic`: most answer matches in this small corpus are coincidental).

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
from rankrag_jax.data import blend
from rankrag_jax.data.answers import has_answer
from rankrag_jax.retrieval import bm25
from rankrag_jax.retrieval import corpus as corpus_lib
from rankrag_jax.training import metrics as metrics_lib
from rankrag_jax.training.ranking_eval import ranking_aucs

KS = (1, 5, 20)


def recall_ks(n: int) -> tuple[int, ...]:
  """Recall@1/5/20, and @n (the candidate pool's own recall, which no reranking changes) when n is deeper."""
  return tuple(k for k in KS if k <= n) + ((n,) if n not in KS else ())


def rerankable_subset(n: int, out_path: pathlib.Path) -> tuple[int, int, dict]:
  """Writes the held-out questions with an answer passage in their BM25 top n; returns (all, kept, {"text": id ->
  passage text, "title": id -> title})."""
  rows = evaluate.read_eval_dataset(evaluate.resolve_path(common.HELDOUT))
  corpus = corpus_lib.read_corpus_jsonl(evaluate.resolve_path(common.CORPUS))
  text_of = dict(zip(corpus.ids, corpus.passages()))
  ids, _ = bm25.search_bm25(bm25.build_bm25_index(corpus), [r["question"] for r in rows], n)
  kept = [r for r, hits in zip(rows, ids) if any(has_answer(text_of[str(i)], r["answers"]) for i in hits)]
  with open(out_path, "w", encoding="utf-8") as f:
    for r in kept:
      f.write(json.dumps({"id": r["id"], "question": r["question"], "answers": r["answers"]}) + "\n")
  return len(rows), len(kept), {"text": text_of, "title": dict(zip(corpus.ids, corpus.titles))}


def dense_rerankable_subset(runs_dir: pathlib.Path, n: int, corpus: dict, out_path: pathlib.Path) -> int:
  """Writes the held-out questions with an answer passage in the dense retriever's top n, each with those n passages
  (dense order) as its `ctxs`, for rerankers to read with retriever="given"; returns how many. Reads the dense run
  (`--systems dense --n M`, M >= n): a deeper run's top n is its prefix (the same index scans the same lists)."""
  depths = {d: int(m.group(1)) for d in runs_dir.iterdir() if (m := re.fullmatch(r"heldout_dense_n(\d+)", d.name))}
  runs = sorted((depth, d) for d, depth in depths.items() if depth >= n and (d / "predictions.jsonl").is_file())
  if not runs:
    raise SystemExit(f"--rerank_from dense: no dense run of depth >= {n} in {runs_dir}; run "
                     f"`--systems dense --n {n} --runs_dir {runs_dir}` first")
  predictions = runs[0][1] / "predictions.jsonl"
  kept = 0
  with open(out_path, "w", encoding="utf-8") as f:
    for line_number, line in enumerate(predictions.read_text().splitlines(), 1):
      try:
        r = json.loads(line)
        top = [c["id"] for c in r["ranked"][:n]]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"{predictions}:{line_number}: not a prediction row with 'ranked' passage ids ({e})") from None
      if unknown := [i for i in top if i not in corpus["text"]]:
        raise SystemExit(f"{predictions}:{line_number}: passage ids not in the corpus {common.CORPUS}: {unknown[:3]} "
                         "(a dense run over another corpus?)")
      if any(has_answer(corpus["text"][i], r["answers"]) for i in top):
        # The passage exactly as the corpus shows it to models (title line included), so P(True) is the same
        # as from dense retrieval itself.
        ctxs = [{"id": i, "title": "", "text": corpus["text"][i]} for i in top]
        f.write(json.dumps({"id": r["id"], "question": r["question"], "answers": r["answers"], "ctxs": ctxs}) + "\n")
        kept += 1
  return kept


def system_settings(key: str, tuned: str | None, n: int, rerank_from: str = "bm25") -> tuple[str, dict]:
  shared = dict(retriever="bm25", n=n, generate_answers=False)
  if key == "bm25":
    return f"BM25 (its top {n})", dict(use_reranker=False, **shared)
  if key == "dense":  # its own top n: run on every held-out question, not BM25's rerankable subset
    return f"dense (all-MiniLM-L6-v2, faiss; its top {n})", dict(shared, retriever="dense", use_reranker=False)
  checkpoint, chat_format, label = {
      "zs": (common.ZERO_SHOT, "chatqa", "SmolLM2-135M-Instruct zero-shot (ChatQA text)"),
      "zsct": (common.ZERO_SHOT, "chat_template", "SmolLM2-135M-Instruct zero-shot (its ChatML template)"),
      "tuned": (tuned, "chatqa", f"SmolLM2-135M + our Stage II ({tuned})")}[key]
  pool = {"bm25": ("BM25", "bm25"), "dense": ("dense", "given")}[rerank_from]
  return f"{pool[0]} top-{n} -> {label} P(True)", dict(shared, retriever=pool[1], use_reranker=True,
                                                       checkpoint=checkpoint, chat_format=chat_format)


def _labelled(records: list[dict], corpus: dict) -> list[dict]:
  """Each record's answer labels and on-topic labels (`ranking_eval.ranking_questions`' rule) in its ranked order."""
  out = []
  for r in records:
    labels = np.array([has_answer(corpus["text"][c["id"]], r["answers"]) for c in r["ranked"]])
    topical = np.array([blend.title_on_topic(r["question"], {"title": corpus["title"][c["id"]]}, r["answers"])
                        for c in r["ranked"]])
    out.append({"labels": labels, "on_topic": labels & topical})
  return out


def score_system(records: list[dict], total: int, corpus: dict, reranked: bool, ks=KS) -> dict:
  """Answer-Recall@k (k in `ks`) over all `total` questions; for a reranker also its AUCs beside the retriever's own
  on the same candidates (each candidate's retrieval_score: BM25's score, or minus its rank in given passages)."""
  hits = {k: sum(any(has_answer(corpus["text"][c["id"]], r["answers"]) for c in r["ranked"][:k]) for r in records)
          for k in ks}
  result = {f"R@{k}": 100 * hits[k] / total for k in ks}
  if reranked:
    labelled = _labelled(records, corpus)
    for prefix, key in (("", "p_true"), ("bm25_", "retrieval_score")):
      scores = [np.array([c[key] for c in r["ranked"]]) for r in records]
      result.update({k.replace("auc", "AUC"): 100 * v for k, v in ranking_aucs(scores, labelled, prefix).items()})
  return result


def learning_curve(run_dirs: list[pathlib.Path], out: pathlib.Path, rows_per_step: list[int]) -> dict[str, list[dict]]:
  """One figure: each run's in-training AUC and reranked Recall@5 against packed rows seen (BM25's Recall@5 and
  AUC 0.5 for reference); `rows_per_step[i]` is run i's batch size."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  curves = {}
  for run_dir, rows in zip(run_dirs, rows_per_step, strict=True):
    if not (run_dir / "metrics.jsonl").is_file():
      raise SystemExit(f"--curve: {run_dir} is not a training run directory (no metrics.jsonl)")
    points = [r for r in metrics_lib.read_metrics(run_dir) if "rank/auc" in r]
    if not points:
      raise SystemExit(f"--curve: {run_dir / 'metrics.jsonl'} has no ranking evaluations (rank/auc); train with "
                       "loop.train.ranking_eval = True (gin_configs/rank_smollm2_cpu.gin)")
    curves[run_dir.name] = points
    seen = [r["step"] * rows for r in points]
    axes[0].plot(seen, [r["rank/auc"] for r in points], marker="o", label=run_dir.name)
    axes[1].plot(seen, [r["rank/recall@5"] for r in points], marker="o", label=run_dir.name)
  axes[0].axhline(0.5, color="grey", ls=":", label="chance")
  bm25 = next(iter(curves.values()))[0]["rank/bm25_recall@5"]
  axes[1].axhline(bm25, color="black", ls="--", label="BM25")
  axes[0].set(xlabel="packed rows of 512 tokens seen", ylabel="P(True) pairwise AUC", title="ranking AUC")
  axes[1].set(xlabel="packed rows of 512 tokens seen", ylabel="answer-Recall@5 of BM25 top-20",
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
  parser.add_argument("--rerank_from", choices=("bm25", "dense"), default="bm25", help="whose top n the rerankers "
                      "reorder; dense reads a dense run of this --runs_dir (`--systems dense`, same or deeper --n)")
  parser.add_argument("--rescore", default=None, help="prediction directories (comma-separated) of systems already "
                      "in results/heldout_ranking.json: recompute their metrics from predictions.jsonl, no model run")
  parser.add_argument("--runs_dir", default=common.DEFAULT_RUNS_DIR)
  parser.add_argument("--curve", default=None, help="run directories, comma-separated: plot their in-training "
                      "ranking metrics in one figure")
  parser.add_argument("--curve_out", default="learning_curve.png", help="the figure's name under results/")
  parser.add_argument("--rows_per_step", default="4", help="each --curve run's batch size (packed rows per "
                      "step), comma-separated in the same order; one value applies to all")
  args = parser.parse_args()
  common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  if args.curve:
    run_dirs = [pathlib.Path(d) for d in args.curve.split(",")]
    try:
      rows = [int(r) for r in args.rows_per_step.split(",")]
    except ValueError:
      raise SystemExit(f"--rows_per_step {args.rows_per_step!r}: expected comma-separated integers") from None
    if len(rows) not in (1, len(run_dirs)):
      raise SystemExit(f"--rows_per_step: {len(rows)} values for {len(run_dirs)} --curve runs")
    curves = learning_curve(run_dirs, common.RESULTS_DIR / args.curve_out, rows * len(run_dirs) if len(rows) == 1
                            else rows)
    print(json.dumps({name: [{k: r[k] for k in ("step", "rank/auc", "rank/recall@1", "rank/recall@5", "qa/em",
                                                 "qa/f1") if k in r} for r in points]
                      for name, points in curves.items()}, indent=1))
    return
  runs_dir = pathlib.Path(args.runs_dir)
  runs_dir.mkdir(parents=True, exist_ok=True)
  subset = runs_dir / f"heldout_rerankable_n{args.n}.jsonl"
  total, kept, corpus = rerankable_subset(args.n, subset)
  if args.rerank_from == "dense":
    subset = runs_dir / f"heldout_dense_rerankable_n{args.n}.jsonl"
    kept = dense_rerankable_subset(runs_dir, args.n, corpus, subset)
  print(f"{kept} of {total} held-out questions have an answer passage in their {args.rerank_from} top {args.n}")
  results_path = common.RESULTS_DIR / "heldout_ranking.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  for directory in map(pathlib.Path, args.rescore.split(",") if args.rescore else []):
    if directory.name not in results:
      raise SystemExit(f"--rescore: {directory.name} is not a system of {results_path}")
    if not (directory / "predictions.jsonl").is_file():
      raise SystemExit(f"--rescore: {directory / 'predictions.jsonl'} does not exist")
    records = [json.loads(line) for line in (directory / "predictions.jsonl").read_text().splitlines()]
    results[directory.name].update(score_system(records, total, corpus, "AUC" in results[directory.name],
                                                recall_ks(results[directory.name].get("n", 20))))
    results_path.write_text(json.dumps(results, indent=1) + "\n")
  for key in args.systems.split(",") if args.systems else []:
    if key == "tuned" and not args.tuned:
      continue
    label, settings = system_settings(key, args.tuned, args.n, args.rerank_from)
    start = time.time()
    # One row per tuned checkpoint: its path is in the name, so evaluating another one adds a row.
    tag = "_" + re.sub(r"\W+", "_", args.tuned).strip("_") if key == "tuned" else ""
    pool = "_from_dense" if settings["use_reranker"] and args.rerank_from == "dense" else ""
    name = f"heldout_{key}{tag}{pool}_n{args.n}"
    dataset = evaluate.resolve_path(common.HELDOUT) if settings["retriever"] == "dense" else str(subset)
    evaluate.run_evaluation(dataset=dataset, corpus=common.CORPUS, out_dir=str(runs_dir / name), system_name=name,
                            recall_ks=recall_ks(args.n), show_progress=True, **settings)
    records = [json.loads(line) for line in (runs_dir / name / "predictions.jsonl").read_text().splitlines()]
    scored = len(records) if settings["retriever"] == "dense" else kept
    # wall_s is this invocation's; rerank_s sums every scored question's share of its batch, so a run resumed
    # across sessions still reports its whole scoring time.
    scoring = {"rerank_s": sum(r["rerank_s"] for r in records)} if settings["use_reranker"] else {}
    # Re-read: a reranking run takes hours, and other runs may have added rows meanwhile.
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results[name] = {"system": label, "questions": total, "scored": scored, "n": args.n, "wall_s": time.time() - start,
                     **scoring, **score_system(records, total, corpus, settings["use_reranker"], recall_ks(args.n))}
    print(json.dumps(results[name]))
    results_path.write_text(json.dumps(results, indent=1) + "\n")
  lines = ["| system | N | questions (scored) | R@1 | R@5 | R@20 | R@N | AUC (retriever's) | on-topic AUC (retr.'s) | "
           "wall (s) |", "|---|---|---|---|---|---|---|---|---|---|"]

  def pair(r, key):
    return f"{r[key]:.1f} ({r['bm25_' + key]:.1f})" if key in r and "bm25_" + key in r else r.get(key, "-")

  for r in results.values():
    n = r.get("n", 20)
    wall = f"{r['wall_s']:.0f}" + (f" (scoring {r['rerank_s']:.0f})" if r.get("rerank_s") else "")
    lines.append(f"| {r['system']} | {n} | {r['questions']} ({r['scored']}) | {r['R@1']:.1f} | {r['R@5']:.1f} | "
                 f"{r['R@20']:.1f} | {r[f'R@{n}']:.1f} | {pair(r, 'AUC')} | {pair(r, 'AUC_on_topic')} | "
                 f"{wall} |")
  (common.RESULTS_DIR / "heldout_ranking.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
