"""Relevance scoring throughput: our jitted P("True") kernel vs. transformers on the same SmolLM2-135M weights.

    python bench/score.py                      # N=100 passages of ~128 tokens, 1 round per side
    python bench/score.py --rounds=3 --repeats=5

One question, N passages (~128 tokens each, lengths spread over 96..160 tokens like 100-word Wikipedia passages),
rendered with the paper's context-ranking prompt (ChatQA format) and tokenised once by a `prepare` child. Both
sides then compute log P("True"), log P("False") under the full next-token softmax at each prompt's last token:

  ours: `rerank.score_token_sequences` (shared-prefix KV cache, length buckets, projections and MLP on the real
        tokens only, the attention on both cores through `backends/cpu/cpu_attention.cc`, last-position LM head) on the
        params `load_model` reads from the exported HF directory;
  reference: transformers `LlamaForCausalLM` (f32, sdpa, `torch.inference_mode`, 2 threads) from that same
        directory: batches of `--ref_batch` passages in the given order, right-padded with an attention mask,
        full logits, the last real position's row, log-softmax. Also timed (interleaved, same child): the
        strongest batched forward transformers offers -- rows sorted by length, left-padded with explicit
        position ids so the last real token sits at -1, and `logits_to_keep=1` so only it reaches the LM head.

Sides run in separate child processes (alternating, `--rounds` times) after a warm-up call; the parent prints
medians, the ratio ours/reference, MFU against the f32 matmul FLOP/s probed in the same run, peak RSS, machine load,
and the largest |ΔP(True)| between the sides.
"""

import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

QUESTION = "who designed the first programmable mechanical computer and when was it built?"
_WORDS = ("the of and in to was a is for on as by with he that at from his it an were are which this also be has "
          "or had first one their its new after who they two her she been other when there all during into school "
          "would time may years more most only over city some world would where later up such used many can "
          "state about national out known university united then made through team year film series american "
          "engine machine design built computer babbage charles analytical difference punched cards memory "
          "mill store program instructions calculation mathematics lovelace ada notes steam london england "
          "government funding century war river music church station population district village county "
          "album season club company system group north south east west empire king party league game army").split()


def make_passages(tokenizer, n: int, seed: int = 0) -> list[str]:
  import numpy as np
  rng = np.random.default_rng(seed)
  passages = []
  for _ in range(n):
    target = int(rng.integers(96, 161))
    words = []
    while len(tokenizer.encode(" ".join(words))) < target:
      words += list(rng.choice(_WORDS, size=8))
    while len(tokenizer.encode(" ".join(words))) > target:
      words.pop()
    passages.append(" ".join(words).capitalize() + ".")
  return passages


def side_prepare(args) -> dict:
  from rankrag_jax import prompts, rerank
  from rankrag_jax import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load_tokenizer(pathlib.Path(args.hf_dir) / "tokenizer.json")
  passages = make_passages(tok, args.num_passages)
  sequences = [rerank.prompt_token_ids(tok, prompts.render_prompt(prompts.ranking_prompt_example(QUESTION, p)))
               for p in passages]
  true_id, false_id = prompts.true_false_token_ids(tok)
  data = {"question": QUESTION, "passages": passages, "sequences": sequences, "answer_ids": [true_id, false_id],
          "prefix_length": rerank.shared_prefix_length(sequences)}
  pathlib.Path(args.data).write_text(json.dumps(data))
  lengths = [len(s) for s in sequences]
  return {"passage_tokens_mean": sum(len(tok.encode(p)) for p in passages) / len(passages),
          "prompt_tokens_mean": sum(lengths) / len(lengths), "prompt_tokens_min": min(lengths),
          "prompt_tokens_max": max(lengths), "shared_prefix": data["prefix_length"]}


def scoring_flops(config, sequences, prefix_length: int) -> float:
  """Matmul FLOPs our kernel must do: the prefix once, each suffix token once (attending to prefix + its own
  earlier tokens), the True/False rows and one full-vocabulary row per passage. Padding is not counted."""
  n_layer_params = config.num_params - config.vocab_size * config.hidden_size - config.hidden_size  # no embed
  per_token = 2 * n_layer_params
  attn = lambda context: 2 * 2 * context * config.num_heads * config.head_dim * config.num_layers
  flops = sum(per_token + attn(i + 1) for i in range(prefix_length))
  for s in sequences:
    flops += sum(per_token + attn(i + 1) for i in range(prefix_length, len(s)))
    flops += 2 * config.hidden_size * (config.vocab_size + 2)
  return flops


def full_prompt_flops(config, sequences) -> float:
  """FLOPs of scoring every prompt from scratch (what the reference does), for its MFU."""
  n_layer_params = config.num_params - config.vocab_size * config.hidden_size - config.hidden_size
  attn = lambda context: 2 * 2 * context * config.num_heads * config.head_dim * config.num_layers
  return sum(sum(2 * n_layer_params + attn(i + 1) for i in range(len(s))) + 2 * config.hidden_size *
             config.vocab_size for s in sequences)


def side_ours(args) -> dict:
  import jax
  import numpy as np
  from rankrag_jax import rerank
  from rankrag_jax.convert.load import load_model
  data = json.loads(pathlib.Path(args.data).read_text())
  config, params, tok = load_model(args.hf_dir)
  params = jax.device_put(params)
  sequences, answer_ids = data["sequences"], tuple(data["answer_ids"])
  run = lambda: rerank.score_token_sequences(params, config, sequences, answer_ids)
  log_probs = run()  # the warm-up: compiles every bucket shape
  probe = common.matmul_flops_probe()
  load = common.machine_load()
  times = common.time_repeats(run, args.repeats, warmup=0)
  end_to_end = common.time_repeats(
      lambda: rerank.score_passages(params, config, tok, data["question"], data["passages"]), 1,
      warmup=0) if args.end_to_end else []
  return {"seconds": times, "end_to_end_seconds": end_to_end, "probe_flops": probe, "load": load,
          "p_true": np.exp(log_probs[:, 0]).tolist(),
          "flops": scoring_flops(config, sequences, data["prefix_length"]),
          "full_prompt_flops": full_prompt_flops(config, sequences)}


def _reference_batches(sequences, batch_size, sort):
  order = sorted(range(len(sequences)), key=lambda i: len(sequences[i])) if sort else list(range(len(sequences)))
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def reference_log_probs(model, sequences, answer_ids, batch_size: int, strong: bool = False,
                        only_first_batch: bool = False):
  """transformers' log P(answer_ids) [N, A] after each prompt.

  strong=False: the plain batched forward (passages in the given order, right-padded, full [B, T, V] logits, the
  last real position's row). strong=True: rows sorted by length, left-padded with explicit positions so the last
  real token is at -1, and `logits_to_keep=1` (only that position reaches the LM head)."""
  import numpy as np
  import torch
  out = np.zeros((len(sequences), len(answer_ids)), np.float32)
  batches = _reference_batches(sequences, batch_size, sort=strong)
  with torch.inference_mode():
    for rows in batches[:1] if only_first_batch else batches:
      width = max(len(sequences[i]) for i in rows)
      ids = torch.zeros((len(rows), width), dtype=torch.long)
      mask = torch.zeros_like(ids)
      for r, i in enumerate(rows):
        n = len(sequences[i])
        filled = slice(width - n, width) if strong else slice(0, n)
        ids[r, filled], mask[r, filled] = torch.tensor(sequences[i]), 1
      if strong:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        last = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
      else:
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = logits[torch.arange(len(rows)), mask.sum(-1) - 1]
      out[rows] = torch.log_softmax(last.float(), dim=-1)[:, list(answer_ids)].numpy()
  return out


def side_ref(args) -> dict:
  import numpy as np
  import torch
  from transformers import LlamaForCausalLM
  torch.set_num_threads(args.torch_threads)
  data = json.loads(pathlib.Path(args.data).read_text())
  sequences, answer_ids = data["sequences"], tuple(data["answer_ids"])
  model = LlamaForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
  run = lambda strong=False, only_first_batch=False: reference_log_probs(
      model, sequences, answer_ids, args.ref_batch, strong, only_first_batch)

  run(only_first_batch=True)  # warm-up
  load = common.machine_load()
  times, strong_times, log_probs = [], [], None
  for _ in range(args.repeats):  # interleaved, so both variants see the same load
    start = time.perf_counter()
    plain = run()
    times.append(time.perf_counter() - start)
    log_probs = plain if log_probs is None else log_probs
    strong_times += common.time_repeats(lambda: run(strong=True), 1, warmup=0) if args.ref_strong else []
  return {"seconds": times, "strong_seconds": strong_times, "load": load, "end_load": common.machine_load(),
          "p_true": np.exp(log_probs[:, 0]).tolist(), "threads": torch.get_num_threads()}


def main():
  parser = common.driver_parser(__doc__, "/tmp/rankrag_bench/score_inputs.json")
  parser.add_argument("--num_passages", type=int, default=100)
  parser.add_argument("--ref_batch", type=int, default=25)
  parser.add_argument("--end_to_end", type=int, default=0, help="also time score_passages incl. tokenisation")
  parser.add_argument("--ref_strong", type=int, default=1,
                      help="also time the strongest transformers variant (sorted, left-padded, logits_to_keep=1)")
  args = parser.parse_args()
  driven = common.drive(__file__, args, {"prepare": side_prepare, "ours": side_ours, "ref": side_ref},
                        lambda side, res: f"median {common.median(res['seconds']):.3f}s")
  if driven is None:
    return
  prep, runs = driven
  print(f"inputs: {args.num_passages} passages, passage tokens mean {prep['passage_tokens_mean']:.0f}, prompt "
        f"tokens {prep['prompt_tokens_min']}..{prep['prompt_tokens_max']} (mean {prep['prompt_tokens_mean']:.0f}),"
        f" shared prefix {prep['shared_prefix']}")
  n = args.num_passages
  ours_s = common.pooled_median(runs["ours"], "seconds")
  ref_s = common.pooled_median(runs["ref"], "seconds")
  ref_strong_s = common.pooled_median(runs["ref"], "strong_seconds")
  probe = common.median([res["probe_flops"] for res in runs["ours"]])
  flops, full_flops = runs["ours"][0]["flops"], runs["ours"][0]["full_prompt_flops"]
  dp = max(abs(a - b) for a, b in zip(runs["ours"][0]["p_true"], runs["ref"][0]["p_true"]))
  summary = {
      "benchmark": "score", "num_passages": n, "inputs": prep,
      "ours_passages_per_s": n / ours_s, "ref_passages_per_s": n / ref_s,
      "ref_strong_passages_per_s": n / ref_strong_s,
      "ratio": ref_s / ours_s, "ratio_vs_ref_strong": ref_strong_s / ours_s,
      "probe_gflops": probe / 1e9,
      "ours_mfu": flops / ours_s / probe, "ref_mfu": full_flops / ref_s / probe, "ref_strong_mfu": full_flops / ref_strong_s / probe,
      "ours_full_prompt_equivalent_mfu": full_flops / ours_s / probe,
      "ceiling_ratio": common.ceiling_ratio(ref_s, flops / probe),
      "max_abs_p_true_diff": dp,
      "ours_peak_rss_mib": max(res["peak_rss_mib"] for res in runs["ours"]),
      "ref_peak_rss_mib": max(res["peak_rss_mib"] for res in runs["ref"]),
      "load": [res["load"] for side in ("ours", "ref") for res in runs[side]], "end_load": common.machine_load(),
      "concurrent": bool(args.concurrent)}
  end_to_end = ""
  if args.end_to_end:  # only measured on request: the JSON line holds no NaN
    e2e_s = common.pooled_median(runs["ours"], "end_to_end_seconds")
    summary["ours_end_to_end_passages_per_s"] = n / e2e_s
    end_to_end = f" (end-to-end incl. tokenisation {n / e2e_s:.1f})"
  print(f"ours {summary['ours_passages_per_s']:.1f} passages/s{end_to_end}, transformers "
        f"{summary['ref_passages_per_s']:.1f} "
        f"(sorted/left-pad/logits_to_keep=1 variant {summary['ref_strong_passages_per_s']:.1f}); ratio "
        f"{summary['ratio']:.2f}x ({summary['ratio_vs_ref_strong']:.2f}x vs the strong variant)")
  print(f"probe {probe / 1e9:.1f} GFLOP/s f32; MFU ours {summary['ours_mfu']:.1%} (executed FLOPs), "
        f"{summary['ours_full_prompt_equivalent_mfu']:.1%} (full-prompt equivalent); ref {summary['ref_mfu']:.1%}; "
        f"ceiling: at 100% of the probe on its executed FLOPs ours would be {summary['ceiling_ratio']:.2f}x")
  print(f"peak RSS ours {summary['ours_peak_rss_mib']} MiB, ref {summary['ref_peak_rss_mib']} MiB; "
        f"max |dP(True)| {dp:.2e}")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
