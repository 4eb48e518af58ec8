"""One Stage-II training step: our sharded jitted train step vs. a transformers/PyTorch step on the same batch.

    python bench/train_step.py                    # real Stage-II batches, 4 x 512 packed (cpu.gin), AdamW
    python bench/train_step.py --source=synthetic --repeats=5

The batches (made once by a `prepare` child, saved as .npz; step i of either side trains on batch i):
  --source=blend (default): the first `repeats + 1` batches `python -m rankrag_jax.train --gin_file=stage2.gin
        --gin_file=cpu.gin` trains on (the embedded blend's Stage-II mixture, SmolLM2 tokens, seed 0), exactly as
        its data pipeline packs them (about 80% of slots are real tokens);
  --source=synthetic: rows packed with 150..450-token prompts of random ids + 2..24-token answers (~70% real).
Either way: restarting positions, segment ids (0 = padding), loss weights on the answer tokens only.

  ours: `training.step.jit_train_step` (jit with NamedShardings on a 1-device mesh under the default logical rules,
        state donated; AdamW b1 0.9 b2 0.98 wd 0.1, clip 1.0; answer positions gathered, K = --max_loss_positions,
        before the LM head; cpu.gin's 'dots' remat and CPU forms; attention forward and backward through
        `backends.cpu.attention.training_attention` unless --cpu_kernels=0), params from `load_model` on the exported HF
        directory; with --shape_bucket=G (default 64) each batch runs at its own shape as `loop.train` picks it
        (`training/bucketing.py`: rows cut after their last real token, per-token work on the real tokens only,
        K = the rows' answer tokens, all rounded up to G; every shape compiled before timing, as a long run
        compiles each once);
  reference: `LlamaForCausalLM` from that directory (f32, sdpa, 2 threads), a 4-D boolean mask for the packed
        segments (same segment, causal), the same position ids, hidden states of the answer positions through
        `lm_head`, summed weighted cross-entropy / weight sum, `clip_grad_norm_(1.0)`, torch AdamW (same betas, eps,
        weight decay on matrices only; the fused CPU kernel when available).

Tokens/s counts every slot of the [batch, seq] step (padding included); MFU uses the matmul FLOPs of the real tokens
(forward + backward = 3 x forward, segment-causal attention, LM head on answer tokens only) of the timed steps'
batches against the f32 matmul FLOP/s probed in the same run. The ceiling is the ratio ours would reach running
the FLOPs it executes (every token slot it computes, padding included; attention blocks and remat recomputation as
configured; the LM head at K positions per row; per batch, for its shape) at 100% of that probe. Step 0
(compilation / warm-up) is not timed.
"""

import dataclasses
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

LEARNING_RATE = 2e-5
KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids", "decoder_positions",
        "decoder_loss_weights")


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
  import numpy as np
  rng = np.random.default_rng(seed)
  out = {k: np.zeros((batch, seq), np.float32 if k == "decoder_loss_weights" else np.int32) for k in KEYS}
  for r in range(batch):
    at, segment = 0, 1
    while True:
      prompt, answer = int(rng.integers(150, 451)), int(rng.integers(2, 25))
      n = prompt + answer + 1  # + stop token
      if at + n > seq:
        if segment == 1:  # always at least one (truncated-prompt) example per row
          prompt = seq - answer - 1
          n = seq
        else:
          break
      tokens = rng.integers(3, vocab, size=n + 1)  # input = tokens[:-1], target = tokens[1:]
      out["decoder_input_tokens"][r, at:at + n] = tokens[:-1]
      out["decoder_target_tokens"][r, at:at + n] = tokens[1:]
      out["decoder_segment_ids"][r, at:at + n] = segment
      out["decoder_positions"][r, at:at + n] = np.arange(n)
      out["decoder_loss_weights"][r, at + prompt:at + n] = 1.0  # the answer and the stop token
      at, segment = at + n, segment + 1
      if at >= seq:
        break
  return out


def train_flops(config, batch: dict) -> float:
  """Matmul FLOPs of one step over the real tokens: 3 x (2 N per token + segment-causal attention) plus the LM
  head (3 x 2 D V) at the answer positions only (where the loss looks)."""
  import numpy as np
  n_layer_params = config.num_params - config.vocab_size * config.hidden_size - config.hidden_size
  real = batch["decoder_segment_ids"] != 0
  context = (batch["decoder_positions"] + 1)[real].astype(np.float64)
  attn = 2 * 2 * config.num_heads * config.head_dim * config.num_layers * context.sum()
  head = 2 * config.hidden_size * config.vocab_size * float((batch["decoder_loss_weights"] != 0).sum())
  return 3 * (2 * n_layer_params * float(real.sum()) + attn + head)


def executed_train_flops(config, batch: int, length: int, num_tokens: int, loss_positions: int, query_block: int,
                         remat: str) -> float:
  """Matmul FLOPs our step executes on a [batch, length] batch whose per-token work runs on `num_tokens` slots
  (all batch * length without token compaction): 3 x 2 N per token slot (4 x with full remat), attention over the
  causal query blocks it computes on the rows (forward, backward = 2.5 x forward with query blocks, else 2 x plus
  the recomputation under any remat), and the LM head at loss_positions positions per row. The ceiling is this at
  100% of the probe."""
  n_layer_params = config.num_params - config.vocab_size * config.hidden_size - config.hidden_size
  block = query_block if 0 < query_block < length else length
  # Query block [i, i + block) is multiplied against keys [0, i + block) (the whole row without blocks).
  scores = sum(min(block, length - start) * (min(start + block, length) if block < length else length)
               for start in range(0, length, block))
  attn_forward = 2 * 2 * config.num_heads * config.head_dim * config.num_layers * batch * scores
  layer_passes = 4 if remat == "full" else 3
  # ops.block_attention or the cpu_ffi training_attention: 2 products forward, 5 backward (the scores recomputed)
  if block < length:
    attn_passes = 3.5 + (remat == "full")  # under 'dots' remat (it keeps the output and softmax statistics)
  else:
    attn_passes = 3 if remat == "none" else 4
  head = 3 * 2 * config.hidden_size * config.vocab_size * batch * min(loss_positions, length)
  return layer_passes * 2 * n_layer_params * num_tokens + attn_passes * attn_forward + head


def step_shapes(batches: dict, args) -> list[tuple[int, tuple]]:
  """Per batch: (length, static step arguments), as `training.loop.train` picks them with
  `shape_bucket=args.shape_bucket` (0: every batch at [batch, seq], no static arguments)."""
  from rankrag_jax.training import bucketing
  shapes = []
  for i in range(len(batches[KEYS[0]])):
    if not args.shape_bucket:
      shapes.append((args.seq, ()))
      continue
    planned = bucketing.plan_step_shape({k: batches[k][i] for k in KEYS}, granularity=args.shape_bucket,
                                        local_shards=1, max_loss_positions=args.max_loss_positions)
    shapes.append((planned.length, (planned.num_tokens, planned.loss_positions)))
  return shapes


def blend_batches(count: int, batch: int, seq: int) -> list[dict]:
  """The first `count` batches of the README's Stage-II CPU run (stage2.gin + cpu.gin), as its loop gets them."""
  from rankrag_jax import cli
  from rankrag_jax.training import data
  cli.parse_gin(["gin_configs/stage2.gin", "gin_configs/cpu.gin"], [], [])
  batches = data.blend_batches("train", batch, seq, shard_id=0, num_shards=1, seed=0)
  return [{k: next_batch[k] for k in KEYS} for next_batch, _ in zip(batches, range(count))]


def side_prepare(args) -> dict:
  import numpy as np
  count = args.repeats + 1
  if args.source == "blend":
    batches = blend_batches(count, args.batch, args.seq)
  else:
    config = json.loads((pathlib.Path(args.hf_dir) / "config.json").read_text())
    batches = [make_batch(args.batch, args.seq, config["vocab_size"], seed=i) for i in range(count)]
  np.savez(args.data, **{k: np.stack([b[k] for b in batches]) for k in KEYS})
  timed = batches[1:]
  real = [float((b["decoder_segment_ids"] != 0).mean()) for b in batches]
  return {"source": args.source, "batches": count, "real_token_fraction": real,
          "real_tokens_timed": int(sum((b["decoder_segment_ids"] != 0).sum() for b in timed)),
          "answer_tokens_timed": int(sum((b["decoder_loss_weights"] != 0).sum() for b in timed)),
          "examples": int(sum(len(set(row[row != 0])) for b in batches for row in b["decoder_segment_ids"])),
          "max_answer_tokens_per_row": int(max((b["decoder_loss_weights"] != 0).sum(1).max() for b in batches))}


def compiled_step_runner(step_fn, state, batches, shapes, data_shardings):
  """(holder, run): each `run()` trains on the next batch (holder["state"], holder["losses"]); the first call has
  run and every other shape is compiled, so timed calls only execute."""
  import jax  # pylint: disable=import-outside-toplevel
  from rankrag_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel
  device_batches = [{k: jax.device_put(batches[k][i][:, :length], data_shardings[k]) for k in step_lib.BATCH_KEYS}
                    for i, (length, _) in enumerate(shapes)]
  holder = {"state": state, "losses": []}

  def run():  # step i trains on batch i
    i = len(holder["losses"])
    holder["state"], metrics = step_fn(holder["state"], device_batches[i], *shapes[i][1])
    holder["losses"].append(float(metrics["loss"]))  # blocks until the step is done

  run()  # compile
  for i in range(1, len(shapes)):  # compile the timed steps' other shapes (a long run compiles each once)
    step_fn.lower(holder["state"], device_batches[i], *shapes[i][1]).compile()
  return holder, run


def side_ours(args) -> dict:
  import jax
  import numpy as np
  import optax
  from rankrag_jax import sharding as sharding_lib
  from rankrag_jax.convert.load import load_model
  from rankrag_jax.model import attention
  from rankrag_jax.training import optimizer as optimizer_lib
  from rankrag_jax.training import step as step_lib
  batches = dict(np.load(args.data))
  config, params, _ = load_model(args.hf_dir)
  config = dataclasses.replace(config, remat_policy=args.remat, scan_layers=not args.unroll,
                               attention_impl="cpu_ffi" if args.cpu_kernels else "blockwise",
                               attention_query_block=args.attention_query_block,
                               flatten_matmul_tokens=bool(args.flatten_matmul_tokens))
  mesh, rules = sharding_lib.make_mesh(), sharding_lib.logical_axis_rules()
  schedule = optax.constant_schedule(LEARNING_RATE)
  optimizer = optimizer_lib.make_optimizer(schedule, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
  step_fn, state_shardings, data_shardings, _ = step_lib.jit_train_step(
      config, optimizer, schedule, mesh, rules, max_loss_positions=args.max_loss_positions)
  # The kernel's tiles of 8 query rows each meet the keys up to their last row: as query blocks of 8.
  cpu_ffi = attention.resolve_for_target(config, mesh) == "cpu_ffi"
  query_block = 8 if cpu_ffi else args.attention_query_block
  with step_lib.sharding_context(mesh, rules):
    params = jax.device_put(params, state_shardings["params"])
    state = jax.jit(lambda p: step_lib.new_train_state(p, optimizer, 0), out_shardings=state_shardings)(params)
    del params
    shapes = step_shapes(batches, args)
    holder, run = compiled_step_runner(step_fn, state, batches, shapes, data_shardings)
    probe = common.matmul_flops_probe()
    load = common.machine_load()
    times = common.time_repeats(run, args.repeats, warmup=0)
  timed_flops = [train_flops(config, {k: v[i] for k, v in batches.items()}) for i in range(1, 1 + len(times))]
  executed = [executed_train_flops(config, args.batch, length, static[0] if static else args.batch * length,
                                   static[1] if static else args.max_loss_positions, query_block,
                                   args.remat) for length, static in shapes[1:]]
  return {"seconds": times, "probe_flops": probe, "load": load, "losses": holder["losses"], "flops": timed_flops,
          "executed_flops": sum(executed) / len(executed), "shapes": shapes}


def side_ref(args) -> dict:
  import numpy as np
  import torch
  import torch.nn.functional as F
  from transformers import LlamaForCausalLM
  torch.set_num_threads(args.torch_threads)
  model = LlamaForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
  model.train()
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
  try:
    optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(0.9, 0.98), eps=1e-8, fused=True)
  except (RuntimeError, TypeError):
    optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(0.9, 0.98), eps=1e-8)

  def torch_batch(b):
    """The packed batch as the reference consumes it: a 4-D segment-causal mask, answer positions."""
    seg = b["decoder_segment_ids"]
    t = seg.shape[1]
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & causal
    mask = (mask | torch.eye(t, dtype=torch.bool))[:, None]  # pad rows attend to themselves: no NaN in sdpa
    rows, cols = torch.nonzero(b["decoder_loss_weights"] != 0, as_tuple=True)
    return {"inputs": b["decoder_input_tokens"].long(), "positions": b["decoder_positions"].long(), "mask": mask,
            "rows": rows, "cols": cols, "targets": b["decoder_target_tokens"].long()[rows, cols],
            "weights": b["decoder_loss_weights"][rows, cols]}

  stacked = np.load(args.data)
  batches = [torch_batch({k: torch.from_numpy(stacked[k][i]) for k in KEYS}) for i in range(len(stacked[KEYS[0]]))]
  losses = []

  def run():  # step i trains on batch i
    b = batches[len(losses)]
    optimizer.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=b["inputs"], attention_mask=b["mask"], position_ids=b["positions"],
                         use_cache=False).last_hidden_state
    logits = model.lm_head(hidden[b["rows"], b["cols"]])
    loss = (F.cross_entropy(logits, b["targets"], reduction="none") * b["weights"]).sum() / b["weights"].sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    losses.append(float(loss))

  run()  # warm-up
  load = common.machine_load()
  times = common.time_repeats(run, args.repeats, warmup=0)
  return {"seconds": times, "load": load, "losses": losses, "threads": torch.get_num_threads(),
          "fused_adamw": bool(optimizer.defaults.get("fused"))}


def main():
  parser = common.driver_parser(__doc__, "/tmp/rankrag_bench/train_batch.npz")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--max_loss_positions", type=int, default=192)
  parser.add_argument("--remat", default="dots", choices=("none", "full", "dots"),
                      help="ours: rematerialisation policy (cpu.gin's 'dots': also the fastest here, see README)")
  parser.add_argument("--unroll", type=int, default=0, help="unrolled layers instead of nn.scan (ours)")
  parser.add_argument("--attention_query_block", type=int, default=64,
                      help="ours: causal attention one query block at a time (cpu.gin's value); 0 = one call")
  parser.add_argument("--cpu_kernels", type=int, default=1,
                      help="ours: attention on the thread pool (cpu_attention.cc, cpu_attention_grad.cc); 0 = XLA's "
                           "blockwise form (--attention_query_block)")
  parser.add_argument("--flatten_matmul_tokens", type=int, default=1,
                      help="ours: projections as 2-D [tokens, features] matmuls (cpu.gin's value)")
  parser.add_argument("--shape_bucket", type=int, default=64,
                      help="ours: each batch at its own shape in multiples of this (loop.train.shape_bucket; "
                           "training/bucketing.py); 0 = every batch at [batch, seq]")
  parser.add_argument("--source", default="blend", choices=("blend", "synthetic"))
  parser.set_defaults(repeats=5)
  args = parser.parse_args()
  driven = common.drive(__file__, args, {"prepare": side_prepare, "ours": side_ours, "ref": side_ref},
                        lambda side, res: f"median {common.median(res['seconds']):.3f}s losses "
                                          f"{[round(x, 4) for x in res['losses'][:3]]}")
  if driven is None:
    return
  prep, runs = driven
  print(f"batch {args.batch} x {args.seq} ({prep['source']}): {prep['batches']} batches (step 0 untimed), "
        f"{prep['examples']} packed examples, real-token fraction per batch "
        f"{[round(f, 2) for f in prep['real_token_fraction']]}, {prep['answer_tokens_timed']} answer tokens in the "
        f"timed steps (max {prep['max_answer_tokens_per_row']}/row)")
  tokens = args.batch * args.seq
  # Mean seconds per timed step (pooled over rounds): with per-batch shapes our steps differ, so the mean (the
  # timed batches' total time) is what tokens/s means; the reference's steps all have one shape.
  ours_s, ref_s = (sum(sum(res["seconds"]) for res in runs[side]) / sum(len(res["seconds"]) for res in runs[side])
                   for side in ("ours", "ref"))
  probe = common.median([res["probe_flops"] for res in runs["ours"]])
  flops = runs["ours"][0]["flops"]  # per timed step, the same batches on both sides
  # MFU over the timed steps: their real-token FLOPs / their wall time (steps differ in real tokens, not in shape).
  mfu = lambda side: common.median([sum(flops) / sum(res["seconds"]) / probe for res in runs[side]])
  loss_diff = max(abs(a - b) for a, b in zip(runs["ours"][0]["losses"], runs["ref"][0]["losses"]))
  summary = {
      "benchmark": "train_step", "batch": args.batch, "seq": args.seq, "inputs": prep,
      "ours_tokens_per_s": tokens / ours_s, "ref_tokens_per_s": tokens / ref_s, "ratio": ref_s / ours_s,
      "ours_step_s": ours_s, "ref_step_s": ref_s, "probe_gflops": probe / 1e9,
      "ours_mfu": mfu("ours"), "ref_mfu": mfu("ref"),
      "ceiling_ratio": common.ceiling_ratio(ref_s, runs["ours"][0]["executed_flops"] / probe),
      "ceiling_ratio_real_tokens": common.ceiling_ratio(ref_s, sum(flops) / len(flops) / probe),
      "ours_executed_tflops_per_step": runs["ours"][0]["executed_flops"] / 1e12,
      "ours_step_shapes": runs["ours"][0]["shapes"], "shape_bucket": args.shape_bucket,
      "losses_ours": runs["ours"][0]["losses"], "losses_ref": runs["ref"][0]["losses"],
      "max_abs_loss_diff": loss_diff,
      "ours_peak_rss_mib": max(res["peak_rss_mib"] for res in runs["ours"]),
      "ref_peak_rss_mib": max(res["peak_rss_mib"] for res in runs["ref"]),
      "load": [res["load"] for side in ("ours", "ref") for res in runs[side]], "end_load": common.machine_load()}
  print(f"ours {summary['ours_tokens_per_s']:.0f} tokens/s ({ours_s:.2f}s/step), transformers "
        f"{summary['ref_tokens_per_s']:.0f} ({ref_s:.2f}s/step); ratio {summary['ratio']:.2f}x")
  print(f"probe {probe / 1e9:.1f} GFLOP/s; MFU ours {summary['ours_mfu']:.1%}, ref {summary['ref_mfu']:.1%}; "
        f"ceiling: at 100% of the probe on the FLOPs it executes ({summary['ours_executed_tflops_per_step']:.2f} "
        f"TFLOP per step on average) ours would be {summary['ceiling_ratio']:.2f}x "
        f"({summary['ceiling_ratio_real_tokens']:.2f}x on the real tokens' FLOPs alone); "
        f"losses agree to {loss_diff:.1e} over {len(runs['ours'][0]['losses'])} steps; peak RSS ours "
        f"{summary['ours_peak_rss_mib']} MiB, ref {summary['ref_peak_rss_mib']} MiB")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
