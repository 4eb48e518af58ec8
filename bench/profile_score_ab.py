"""Scoring A/B in ONE process, alternating ours / transformers (plain) / transformers (strong) call by call.

    python bench/score.py --side=prepare      # writes the inputs (or run score.py once)
    python bench/profile_score_ab.py --num_passages=50 --rounds=1

On a machine shared with other jobs, separate child processes minutes apart see different loads; here the three
calls alternate within seconds of each other (never overlapping: jax and torch each use 2 threads in turn), so
their ratio is much less sensitive to the load. Same inputs, same weights and same reference code as score.py.
"""

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from bench.score import reference_log_probs  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--hf_dir", default="/tmp/rankrag_bench/smollm2_135m_instruct_hf")
  parser.add_argument("--data", default="/tmp/rankrag_bench/score_inputs.json")
  parser.add_argument("--num_passages", type=int, default=50)
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--ref_batch", type=int, default=25)
  args = parser.parse_args()
  import numpy as np
  import torch
  from transformers import LlamaForCausalLM
  from rankrag_jax import rerank
  from rankrag_jax.convert.load import load_model
  torch.set_num_threads(2)
  data = json.loads(pathlib.Path(args.data).read_text())
  sequences = data["sequences"][:args.num_passages]
  true_id, false_id = data["answer_ids"]
  config, params, _ = load_model(args.hf_dir)
  model = LlamaForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()

  def ours():
    return np.exp(rerank.score_token_sequences(params, config, sequences, (true_id, false_id))[:, 0])

  def ref(strong):
    return np.exp(reference_log_probs(model, sequences, (true_id, false_id), args.ref_batch, strong)[:, 0])

  p_ours = ours()  # compile
  fns = {"ours": ours, "ref_plain": lambda: ref(False), "ref_strong": lambda: ref(True)}
  times = {k: [] for k in fns}
  probes, loads = [], []
  for _ in range(args.rounds):
    probes.append(common.matmul_flops_probe())
    loads.append(common.machine_load())
    for k, fn in fns.items():
      start = time.perf_counter()
      p = fn()
      times[k].append(time.perf_counter() - start)
      if k != "ours":
        assert np.max(np.abs(p - p_ours)) < 1e-4, (k, np.max(np.abs(p - p_ours)))
  n = len(sequences)
  med = {k: common.median(v) for k, v in times.items()}
  summary = {"benchmark": "score_ab_one_process", "num_passages": n,
             "passages_per_s": {k: n / v for k, v in med.items()},
             "ratio_vs_plain": med["ref_plain"] / med["ours"], "ratio_vs_strong": med["ref_strong"] / med["ours"],
             "probe_gflops": common.median(probes) / 1e9, "seconds": times, "load": loads,
             "end_load": common.machine_load()}
  common.emit(summary)


if __name__ == "__main__":
  main()
