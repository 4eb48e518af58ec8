"""Reranking rate of the evaluation harness against the scoring kernel, side by side in one process.

    python bench/rerank_harness.py                  # 16 held-out questions x BM25 top 20, 2 rounds
    python bench/rerank_harness.py --questions 32 --rounds 3

Real inputs: the first `--questions` EfficientQA test questions of the default blend's held-out split, each with its
BM25 top-`--n` passages from the blend corpus; SmolLM2-135M-Instruct (f32). Three ways to score the same
(question, passage) prompts, timed alternately after one warm-up each (every bucket shape compiled):

  kernel:       `rerank.score_token_sequences` on all the prompts' token ids at once (tokenised beforehand):
                what bench/score.py measures, the ceiling of any harness;
  harness:      `evaluate.rerank_candidates` on all the questions (what `run_evaluation` calls per chunk):
                rendering, tokenising and fitting the prompts, one scoring pass, sorting;
  per question: `rag.rank_passages` once per question (the harness before issue #34: one question's 20
                passages per scoring call).

Prints passages/s of each and the harness / kernel ratio (issue #34 asks >= 0.80).
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--questions", type=int, default=16)
  parser.add_argument("--n", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--checkpoint", default="smollm2_135m_instruct")
  args = parser.parse_args()

  from rankrag_jax import evaluate, prompts, rag, rerank
  from rankrag_jax.retrieval import bm25, corpus as corpus_lib

  examples = evaluate.read_eval_dataset(evaluate.resolve_path("blend:heldout.jsonl"))[:args.questions]
  corpus = corpus_lib.read_corpus_jsonl(evaluate.resolve_path("blend:corpus.jsonl"))
  index = bm25.build_bm25_index(corpus)
  ids, _ = bm25.search_bm25(index, [e["question"] for e in examples], args.n)
  candidates = [[{"id": str(i), "text": t} for i, t in zip(row, corpus.passages_by_id(row))] for row in ids]
  model = rag.load_rag_model(args.checkpoint)

  items = [(e["question"], [c["text"] for c in cands]) for e, cands in zip(examples, candidates)]
  window = model.config.max_position_embeddings
  sequences = []
  for question, passages in items:
    render = lambda one, q=question: prompts.render_prompt(prompts.ranking_prompt_example(q, one[0]), "chatqa",
                                                           model.tokenizer)
    sequences += [rerank.fit_passages_to_window(render, model.tokenizer, [p], window)[0] for p in passages]
  answer_ids = prompts.true_false_token_ids(model.tokenizer, "chatqa")

  sides = {
      "kernel": lambda: rerank.score_token_sequences(model.params, model.config, sequences, answer_ids),
      "harness": lambda: evaluate.rerank_candidates(model, examples, [list(c) for c in candidates],
                                                    "open_domain_qa", "chatqa"),
      "per question": lambda: [rag.rank_passages(model, q, ps) for q, ps in items],
  }
  for fn in sides.values():
    fn()  # warm-up: compiles every bucket shape
  times = {name: [] for name in sides}
  for _ in range(args.rounds):
    for name, fn in sides.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)

  num_passages = len(sequences)
  lengths = [len(s) for s in sequences]
  print(f"{len(items)} questions x {args.n} passages = {num_passages} prompts, "
        f"{min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / num_passages:.0f}); "
        f"load {common.machine_load()}")
  print("| path | median s | passages/s | / kernel |")
  print("|---|---|---|---|")
  kernel_rate = num_passages / common.median(times["kernel"])
  for name, ts in times.items():
    rate = num_passages / common.median(ts)
    print(f"| {name} | {common.median(ts):.2f} | {rate:.2f} | {rate / kernel_rate:.2f} |")


if __name__ == "__main__":
  main()
