"""Experiment 1 (the paper's Table 6 at small scale): Recall@1/5/20 on the held-out split.

BM25 vs dense MiniLM vs SmolLM2-135M zero-shot P("True") reranking BM25's top-20 vs SmolLM2 after our Stage-II blend.
Retrievers run on all 582 held-out questions (cheap); the LM rerankers on the first LIMIT questions (file order),
and every system is also reported on exactly the questions both rerankers finished, so rows are comparable.

    python experiments/ranking.py --limit 40 [--tuned /tmp/ev/stage2_smollm2_12steps/hf] [--no_run]

Writes experiments/results/ranking.{md,json} (and recall-curve data for experiments/plots.py).
"""

import argparse
import json

import common


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs_dir", default=common.DEFAULT_RUNS_DIR)
  parser.add_argument("--limit", type=int, default=40, help="held-out questions for the LM rerankers")
  parser.add_argument("--tuned", default=None, help="tuned checkpoint (HF dir); omitted -> no tuned rows")
  parser.add_argument("--no_run", action="store_true", help="only rebuild the tables from existing predictions")
  args = parser.parse_args()

  systems = common.heldout_systems(args.tuned)
  ranked_systems = ["bm25", "dense"] + [s for s in systems if s.endswith("rerank20_gen5")]
  if not args.no_run:
    for name in ranked_systems:
      limit = None if name in ("bm25", "dense") else args.limit
      common.run_system(args.runs_dir, name, systems[name], limit)

  all_ids = common.heldout_ids()
  lm_done = [set(r["id"] for r in common.read_predictions(args.runs_dir, s)) for s in ranked_systems[2:]]
  subset = [i for i in all_ids[:args.limit] if all(i in done for done in lm_done)]
  corpus = common.heldout_corpus()
  results = {"subset_ids": subset, "systems": {}}
  rows_full, rows_subset, rows_finished = [], [], []
  for name in ranked_systems:
    info = common.run_info(args.runs_dir, name)
    finished = [i for i in all_ids[:args.limit]
                if i in {r["id"] for r in common.read_predictions(args.runs_dir, name)}]
    for scope, ids, rows in (("all", all_ids, rows_full), ("subset", subset, rows_subset),
                             ("finished", finished, rows_finished)):
      records = common.read_predictions(args.runs_dir, name, ids)
      if not records or (scope == "all" and len(records) < len(all_ids)):
        continue
      metric = lambda key: common.mean(r["metrics"][key] for r in records)
      curve = common.recall_curve(records, corpus)
      entry = {"label": systems[name]["label"], "examples": len(records),
               **{key: metric(key) for key in ("R@1", "R@5", "R@20", "goldR@1", "goldR@5", "goldR@20", "MRR")},
               "curve": curve, "p_true_auc": common.pairwise_auc(records, corpus), "mean_rerank_s": sum(r["rerank_s"] for r in records) / len(records)}
      results["systems"].setdefault(name, {})[scope] = entry
      rows.append([entry["label"], entry["examples"], *(common.fmt(entry[k]) for k in
                                                       ("R@1", "R@5", "R@20", "goldR@1", "goldR@5", "MRR")),
                   common.fmt(entry["p_true_auc"]), f"{entry['mean_rerank_s']:.1f}"])
    results["systems"].setdefault(name, {})["run"] = {k: info.get(k) for k in ("checkpoint", "n", "limit",
                                                                                 "index_s", "load_s")}
  header = ["system", "questions", "Recall@1", "Recall@5", "Recall@20", "gold R@1", "gold R@5", "MRR",
            "P(True) AUC", "rerank s/question"]
  text = ("# Ranking on the held-out split (Table 6 analogue)\n\n"
          "Recall@k = a top-k passage contains an answer string (the paper's metric); gold R@k = the question's own "
          "SQuAD paragraph is in the top k. Rerankers reorder BM25's top-20, so their Recall@20 equals BM25's. "
          "P(True) AUC = how often an answer-containing candidate gets a higher P(True) than a non-containing one of "
          "the same question (50 = no signal).\n\n"
          f"## The {len(subset)} questions every reranker finished (first {args.limit} of heldout.jsonl)\n\n"
          + common.markdown_table(header, rows_subset)
          + f"\n## Each system on every question it finished (of the first {args.limit})\n\n"
          + common.markdown_table(header, rows_finished)
          + f"\n## All {len(all_ids)} held-out questions (retrievers only)\n\n" + common.markdown_table(header, rows_full))
  common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  (common.RESULTS_DIR / "ranking.md").write_text(text)
  (common.RESULTS_DIR / "ranking.json").write_text(json.dumps(results, indent=1) + "\n")
  print(text)


if __name__ == "__main__":
  main()
