"""Experiment 2 (Table 3's "w/o reranking" ablation at small scale): EM/F1 with and without reranking.

For each model (zero-shot SmolLM2-135M-Instruct; SmolLM2 after our Stage-II blend), greedy answers (max 32 new
tokens, the paper's QA budget) from BM25's top-5 in BM25 order, and from the top-5 after the same model reranks
BM25's top-20 by P("True"). Reported on the held-out questions that every system finished.

    python experiments/generation.py --limit 40 [--tuned /tmp/ev/stage2_smollm2_12steps/hf] [--no_run]

Writes experiments/results/generation.{md,json}.
"""

import argparse
import json

import common


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs_dir", default=common.DEFAULT_RUNS_DIR)
  parser.add_argument("--limit", type=int, default=40)
  parser.add_argument("--tuned", default=None)
  parser.add_argument("--no_run", action="store_true")
  args = parser.parse_args()

  systems = common.heldout_systems(args.tuned)
  names = [s for s in systems if s.endswith("_gen5")]
  if not args.no_run:
    for name in names:
      common.run_system(args.runs_dir, name, systems[name], args.limit)

  done = [set(r["id"] for r in common.read_predictions(args.runs_dir, s)) for s in names]
  subset = [i for i in common.heldout_ids(args.limit) if all(i in d for d in done if d)]
  results, rows = {"subset_ids": subset, "systems": {}}, []
  for name in names:
    records = common.read_predictions(args.runs_dir, name, subset)
    if not records:
      continue
    entry = {"label": systems[name]["label"], "examples": len(records),
             "EM": common.mean(r["metrics"]["EM"] for r in records),
             "F1": common.mean(r["metrics"]["F1"] for r in records),
             "R@5 of the generator's passages": common.mean(r["metrics"]["R@5"] for r in records),
             "empty_answers": sum(not r["answer"] for r in records),
             "mean_rerank_s": sum(r["rerank_s"] for r in records) / len(records),
             "mean_generate_s": sum(r["generate_s"] for r in records) / len(records),
             "examples_shown": [{"question": r["question"], "answers": r["answers"], "prediction": r["answer"]}
                                for r in records[:5]]}
    results["systems"][name] = entry
    rows.append([entry["label"], entry["examples"], common.fmt(entry["EM"]), common.fmt(entry["F1"]),
                 common.fmt(entry["R@5 of the generator's passages"]), entry["empty_answers"],
                 f"{entry['mean_rerank_s']:.1f}", f"{entry['mean_generate_s']:.1f}"])
  header = ["system", "questions", "EM", "F1", "answer in the 5 passages (%)", "empty answers",
            "rerank s/q", "generate s/q"]
  text = ("# Generation with and without reranking (Table 3 ablation analogue)\n\n"
          f"Held-out questions finished by every system: {len(subset)} (first {args.limit} of heldout.jsonl). "
          "Greedy decoding, max 32 new tokens, the paper's prompt `Passage 1..5` + "
          "`{question}. Answer the above question with a short phrase.` in ChatQA's plain-text format, or in the "
          "model's own chat template where the label says so.\n\n" + common.markdown_table(header, rows))
  common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  (common.RESULTS_DIR / "generation.md").write_text(text)
  (common.RESULTS_DIR / "generation.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
  print(text)


if __name__ == "__main__":
  main()
