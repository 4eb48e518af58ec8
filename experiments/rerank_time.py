"""Experiment 3b (the paper's Fig. 5 at small scale): reranking time vs the number of candidates N.

For each N, BM25 retrieves the top-N for a question, SmolLM2-135M scores all N with P("True")
(`rerank.score_passages`: shared-prefix KV cache, length-bucketed batches), and the model generates an answer
from the top-5 (`generate`, max 32 new tokens). Every (N, question) is run once untimed first, so compilation is
excluded; the timed second run is the steady state. Fig. 5 plots the time of RAG with reranking relative to RAG
without it: (retrieve + rerank(N) + generate) / (retrieve + generate).

    python experiments/rerank_time.py --questions 2 --ns 5,10,20,40

Writes experiments/results/rerank_time.{md,json}. Wall times depend on the machine's load (recorded).
"""

import argparse
import json
import os
import time

import common
from rankrag_jax import evaluate, rag
from rankrag_jax.generate import generate


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default=common.ZERO_SHOT)
  parser.add_argument("--questions", type=int, default=2)
  parser.add_argument("--offset", type=int, default=100, help="first held-out question used")
  parser.add_argument("--ns", default="5,10,20,40")
  args = parser.parse_args()
  ns = [int(n) for n in args.ns.split(",")]

  examples = evaluate.read_eval_dataset(evaluate.resolve_path(common.HELDOUT))[args.offset:args.offset + args.questions]
  corpus = common.heldout_corpus()
  search = rag.build_search(corpus, "bm25")
  model = rag.load_rag_model(args.checkpoint)
  timings = {n: [] for n in ns}
  for example in examples:
    for n in ns:
      measured = []
      for _ in range(2):  # untimed warm-up (compilation), then the timed run.
        start = time.perf_counter()
        candidates = evaluate.retrieve([example], corpus, search, n)[0]
        retrieve_s = time.perf_counter() - start
        start = time.perf_counter()
        [(ranked, _)] = evaluate.rerank_candidates(model, [example], [candidates], "open_domain_qa", "chatqa")
        rerank_s = time.perf_counter() - start
        ids, _ = rag.generation_prompt(model, example["question"], [c["text"] for c in ranked[:5]],
                                       "open_domain_qa", "chatqa", 32)
        start = time.perf_counter()
        generate(model.params, model.config, [ids], 32, model.tokenizer.stop_ids, batch_size=1)
        generate_s = time.perf_counter() - start
        measured.append({"retrieve_s": retrieve_s, "rerank_s": rerank_s, "generate_s": generate_s,
                         "passages": len(candidates)})
      timings[n].append(measured[-1])
      print(f"{example['id']} N={n}: {measured[-1]}", flush=True)

  rows, results = [], {"checkpoint": args.checkpoint, "questions": [e["id"] for e in examples],
                       "load_average": os.getloadavg(), "cpus": os.cpu_count(), "per_n": {}}
  for n in ns:
    mean = lambda key: sum(t[key] for t in timings[n]) / len(timings[n])
    base = mean("retrieve_s") + mean("generate_s")
    entry = {"rerank_s": mean("rerank_s"), "rerank_s_per_passage": mean("rerank_s") / n,
             "generate_s": mean("generate_s"), "retrieve_s": mean("retrieve_s"),
             "relative_time": (base + mean("rerank_s")) / base, "extra_time": mean("rerank_s") / base,
             "runs": timings[n]}
    results["per_n"][n] = entry
    rows.append([n, f"{entry['rerank_s']:.1f}", f"{entry['rerank_s_per_passage']:.2f}", f"{entry['generate_s']:.1f}",
                 f"{entry['relative_time']:.1f}x", f"{entry['extra_time']:.1f}x"])
  text = ("# Reranking time vs N (Fig. 5 analogue)\n\n"
          f"SmolLM2-135M ({args.checkpoint}), {len(examples)} held-out questions (heldout.jsonl rows "
          f"{args.offset}..{args.offset + len(examples) - 1}), steady state after an untimed warm-up run; "
          f"{os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.1f} (shared machine).\n\n"
          + common.markdown_table(["N", "rerank s", "s/passage", "generate s (top-5, 32 tokens)",
                                   "time with / without reranking", "extra time"], rows)
          + "\nThe paper (Fig. 5, 8B on A100s, vLLM-style serving): N=20..100 costs 0.9x..6.0x extra time.\n")
  (common.RESULTS_DIR / "rerank_time.md").write_text(text)
  (common.RESULTS_DIR / "rerank_time.json").write_text(json.dumps(results, indent=1) + "\n")
  print(text)


if __name__ == "__main__":
  main()
