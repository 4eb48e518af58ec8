"""Generation throughput with a KV cache: our jitted `generate` vs. `transformers.generate`, same SmolLM2-135M weights.

    python bench/generate.py                  # batch 8, 32 new tokens, greedy, prompts of ~100-200 tokens
    python bench/generate.py --rounds=3 --prompt_passage_tokens=600

Eight RAG generation prompts (the paper's open-domain QA prompt over one passage, ChatQA format; lengths differ, so
both sides pad) are tokenised once by a `prepare` child. Both sides decode greedily exactly `--new_tokens` tokens per
row (no stop ids, so neither stops early) in one batch:

  ours: `generate.generate` (one jitted prefill, the batch's common prompt prefix computed once and only the rest
        of each prompt padded, its projections and MLP on the real tokens only, then a `lax.while_loop` of
        one-token steps over an explicit per-layer KV cache, per-layer weights and the LM head in 8-column panels
        whose few-row products run on both cores (`backends/cpu/row_matmul`), the prompt's and the steps' attention
        over the KV cache on both cores too (`backends/cpu/cpu_attention.cc`); the weights are made once at load by
        `backends.cpu.decode.make_decode_weights`, as `rag.load_rag_model` does, so the copy is
        not inside the timed call; the calls reuse their KV cache memory through one `generate.KVBuffers`, as a
        `rag.RagModel`'s do);
  reference: `LlamaForCausalLM.generate` (f32, sdpa, DynamicCache, `torch.inference_mode`, 2 threads), left-padded
        with an attention mask (transformers derives the positions from it).

New tokens/s = batch * new_tokens / wall time of the whole call (prefill included); also reported: the prefill
alone, the fraction of greedy tokens on which the two sides agree, MFU (ours on the FLOPs it executes, and on the
full prompts' FLOPs that the reference executes), peak RSS, machine load.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from bench.score import QUESTION, make_passages  # noqa: E402


def side_prepare(args) -> dict:
  from rankrag_jax import prompts, rerank
  from rankrag_jax import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load_tokenizer(pathlib.Path(args.hf_dir) / "tokenizer.json")
  passages = make_passages(tok, args.batch, seed=1)
  if args.prompt_passage_tokens:
    passages = [" ".join([p] * (1 + args.prompt_passage_tokens // 128)) for p in passages]
  sequences = [rerank.prompt_token_ids(tok, prompts.render_prompt(prompts.generation_prompt_example(QUESTION, [p])))
               for p in passages]
  pathlib.Path(args.data).write_text(json.dumps({"sequences": sequences, "pad_id": tok.pad_id or 0}))
  lengths = [len(s) for s in sequences]
  return {"prompt_tokens_min": min(lengths), "prompt_tokens_max": max(lengths),
          "prompt_tokens_mean": sum(lengths) / len(lengths)}


def generation_flops(config, sequences, new_tokens: int, shared_prefix: int = 0,
                     last_layer_at_last_token: bool = False) -> float:
  """Matmul FLOPs of a cached greedy decode: every prompt token once, then each new token attending to its
  context, and the LM head at the last prompt token and every new token (padding not counted). With
  `shared_prefix`, the first that many tokens count once for all sequences, and with `last_layer_at_last_token`
  the last layer's queries, attention, output projection and MLP run only at the prefix's and each prompt's last
  token (what our generate executes)."""
  n_layer_params = config.num_params - config.vocab_size * config.hidden_size - config.hidden_size
  attn = lambda context: 2 * 2 * context * config.num_heads * config.head_dim * config.num_layers
  head = 2 * config.hidden_size * config.vocab_size
  flops = 0.0
  for s in sequences:
    flops += sum(2 * n_layer_params + attn(i + 1) for i in range(len(s) + new_tokens - 1))
    flops += new_tokens * head
  flops -= (len(sequences) - 1) * sum(2 * n_layer_params + attn(i + 1) for i in range(shared_prefix))
  if last_layer_at_last_token:
    query_side = 2 * config.hidden_size * (2 * config.num_heads * config.head_dim + 3 * config.intermediate_size)
    skipped = lambda i: query_side + attn(i + 1) / config.num_layers
    flops -= sum(skipped(i) for i in range(shared_prefix - 1))
    flops -= sum(skipped(i) for s in sequences for i in range(shared_prefix, len(s) - 1))
  return flops


def generation_lower_bound(config, sequences, new_tokens: int, shared_prefix: int, flops_per_s: float,
                           bytes_per_s: float) -> float:
  """Seconds our generate would take at the probes' limits: the prefill's executed FLOPs at `flops_per_s`, then
  each decode step at the slower of its FLOPs and its reads (every f32 weight once, each row's KV cache) at
  `bytes_per_s`."""
  prefill = generation_flops(config, sequences, 1, shared_prefix, last_layer_at_last_token=True)
  kv_bytes_per_slot = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4
  seconds = prefill / flops_per_s
  for step in range(1, new_tokens):
    step_flops = (generation_flops(config, sequences, step + 1) - generation_flops(config, sequences, step))
    step_bytes = 4 * config.num_params + kv_bytes_per_slot * sum(len(s) + step for s in sequences)
    seconds += max(step_flops / flops_per_s, step_bytes / bytes_per_s)
  return seconds


def side_ours(args) -> dict:
  import jax
  from rankrag_jax import generate
  from rankrag_jax.convert.load import load_model
  from rankrag_jax.backends.cpu import decode as decode_weights
  sequences = json.loads(pathlib.Path(args.data).read_text())["sequences"]
  config, params, _ = load_model(args.hf_dir)
  params = jax.device_put(params)
  weights = decode_weights.make_decode_weights(params, config)  # made once at load, as rag.load_rag_model does
  buffers = generate.KVBuffers()  # KV cache memory reused by the calls, as rag.RagModel holds one
  run = lambda: generate.generate(params, config, sequences, args.new_tokens, stop_ids=[], batch_size=args.batch,
                                  decode_weights=weights, kv_buffers=buffers)
  out = run()  # compiles
  # Prefill alone: the same jitted decode with a budget of one new token (prefill + first LM head).
  prefill = lambda: generate.generate(params, config, sequences, 1, stop_ids=[], batch_size=args.batch,
                                      decode_weights=weights, kv_buffers=buffers)
  prefill()
  probe = common.matmul_flops_probe()
  bandwidth = common.memory_read_probe()
  load = common.machine_load()
  times = common.time_repeats(run, args.repeats, warmup=0)
  prefill_times = common.time_repeats(prefill, args.repeats, warmup=0)
  shared = generate.shared_prefix_length(sequences, generate.PREFIX_MULTIPLE) if len(sequences) <= args.batch else 0
  return {"seconds": times, "prefill_seconds": prefill_times, "probe_flops": probe, "load": load,
          "tokens": out, "flops": generation_flops(config, sequences, args.new_tokens),
          "executed_flops": generation_flops(config, sequences, args.new_tokens, shared,
                                             last_layer_at_last_token=True),
          "shared_prefix": shared,
          "bandwidth": bandwidth, "lower_bound_seconds": generation_lower_bound(
              config, sequences, args.new_tokens, shared, probe, bandwidth)}


def side_ref(args) -> dict:
  import torch
  from transformers import LlamaForCausalLM
  torch.set_num_threads(args.torch_threads)
  data = json.loads(pathlib.Path(args.data).read_text())
  sequences = data["sequences"]
  model = LlamaForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
  model.generation_config.eos_token_id = None  # decode exactly new_tokens per row, as ours does
  width = max(len(s) for s in sequences)
  ids = torch.full((len(sequences), width), data["pad_id"], dtype=torch.long)
  mask = torch.zeros((len(sequences), width), dtype=torch.long)
  for r, s in enumerate(sequences):
    ids[r, width - len(s):], mask[r, width - len(s):] = torch.tensor(s), 1

  def run(new_tokens):
    with torch.inference_mode():
      return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=data["pad_id"],
                            eos_token_id=None)[:, width:]

  out = run(args.new_tokens)
  load = common.machine_load()
  times = common.time_repeats(lambda: run(args.new_tokens), args.repeats, warmup=0)
  prefill_times = common.time_repeats(lambda: run(1), args.repeats, warmup=0)
  return {"seconds": times, "prefill_seconds": prefill_times, "load": load, "tokens": out.tolist(),
          "threads": torch.get_num_threads()}


def main():
  parser = common.driver_parser(__doc__, "/tmp/rankrag_bench/generate_inputs.json")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--prompt_passage_tokens", type=int, default=0,
                      help="repeat each passage to about this many tokens (0: one ~128-token passage)")
  args = parser.parse_args()
  driven = common.drive(__file__, args, {"prepare": side_prepare, "ours": side_ours, "ref": side_ref},
                        lambda side, res: f"median {common.median(res['seconds']):.3f}s (prefill "
                                          f"{common.median(res['prefill_seconds']):.3f}s)")
  if driven is None:
    return
  prep, runs = driven
  print(f"inputs: batch {args.batch}, prompt tokens {prep['prompt_tokens_min']}..{prep['prompt_tokens_max']}, "
        f"{args.new_tokens} new tokens, greedy")
  new = args.batch * args.new_tokens
  med = lambda side, key: common.pooled_median(runs[side], key)
  ours_s, ref_s = med("ours", "seconds"), med("ref", "seconds")
  probe = common.median([res["probe_flops"] for res in runs["ours"]])
  a, b = runs["ours"][0]["tokens"], runs["ref"][0]["tokens"]
  agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / new
  # Greedy paths diverge for good once they differ; first-divergence index per row says more than agreement.
  first_diff = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), len(ra)) for ra, rb in zip(a, b)]
  summary = {
      "benchmark": "generate", "batch": args.batch, "new_tokens": args.new_tokens, "inputs": prep,
      "ours_new_tokens_per_s": new / ours_s, "ref_new_tokens_per_s": new / ref_s, "ratio": ref_s / ours_s,
      "ours_prefill_s": med("ours", "prefill_seconds"), "ref_prefill_s": med("ref", "prefill_seconds"),
      "ours_decode_new_tokens_per_s": (new - args.batch) / max(ours_s - med("ours", "prefill_seconds"), 1e-9),
      "ref_decode_new_tokens_per_s": (new - args.batch) / max(ref_s - med("ref", "prefill_seconds"), 1e-9),
      "probe_gflops": probe / 1e9, "ours_mfu": runs["ours"][0]["executed_flops"] / ours_s / probe,
      "ours_mfu_full_prompts": runs["ours"][0]["flops"] / ours_s / probe,
      "ref_mfu": runs["ours"][0]["flops"] / ref_s / probe, "ours_shared_prefix": runs["ours"][0]["shared_prefix"],
      "read_probe_gb_per_s": common.median([res["bandwidth"] for res in runs["ours"]]) / 1e9,
      "ceiling_ratio": common.ceiling_ratio(ref_s, common.median([res["lower_bound_seconds"] for res in runs["ours"]])),
      "greedy_token_agreement": agree, "first_divergence_per_row": first_diff,
      "ours_peak_rss_mib": max(res["peak_rss_mib"] for res in runs["ours"]),
      "ref_peak_rss_mib": max(res["peak_rss_mib"] for res in runs["ref"]),
      "load": [res["load"] for side in ("ours", "ref") for res in runs[side]], "end_load": common.machine_load()}
  print(f"ours {summary['ours_new_tokens_per_s']:.1f} new tokens/s, transformers {summary['ref_new_tokens_per_s']:.1f};"
        f" ratio {summary['ratio']:.2f}x (decode only: {summary['ours_decode_new_tokens_per_s']:.1f} vs "
        f"{summary['ref_decode_new_tokens_per_s']:.1f})")
  print(f"probe {probe / 1e9:.1f} GFLOP/s; MFU ours {summary['ours_mfu']:.1%} (executed FLOPs; shared prefix "
        f"{summary['ours_shared_prefix']} tokens computed once), {summary['ours_mfu_full_prompts']:.1%} (full-prompt "
        f"equivalent), ref {summary['ref_mfu']:.1%}; "
        f"read probe {summary['read_probe_gb_per_s']:.1f} GB/s; ceiling: at the probes' limits ours would be "
        f"{summary['ceiling_ratio']:.2f}x; greedy agreement {agree:.1%}; peak RSS ours "
        f"{summary['ours_peak_rss_mib']} MiB, ref "
        f"{summary['ref_peak_rss_mib']} MiB")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
