"""LoRA vs full fine-tuning on SmolLM2-135M: step time, peak memory, trainable parameters, side by side.

    python bench/lora.py                        # real Stage-II blend batches, 4 x 512 (cpu.gin), rank 16, all 7
    python bench/lora.py --source=synthetic --repeats=3 --rounds=2 --rank=16 --targets=q_proj,v_proj

Both sides are children of one parent run (`common.run_side`, so each peak RSS is its own) and train on the same
batches (a `prepare` child writes them, as bench/train_step.py does) from the same HF export of the registry's
SmolLM2-135M-Instruct, with the same step `loop.train` runs (`step.jit_train_step`; cpu.gin's 'dots' remat, CPU
attention kernels, f32, AdamW b1 0.9 b2 0.98 wd 0.1, clip 1.0, per-batch shapes with --shape_bucket=64):
  full: every parameter trained, AdamW moments for all of them;
  lora: `jit_train_step(lora=LoraConfig(rank, alpha, dropout, targets))`: the base frozen, adapters computed beside
        each targeted projection inside the layer scan, moments for the adapters only.
Trainable parameters and optimizer-state bytes are counted from each side's state. Step 0 (compile) is not timed;
the other shapes are compiled before timing. Ratios are of medians measured in the same parent run.
"""

import dataclasses
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from bench import train_step as train_step_bench  # noqa: E402

LEARNING_RATE = 2e-5


def side_train(args, lora_side: bool) -> dict:
  import jax
  import numpy as np
  import optax
  from rankrag_jax import sharding as sharding_lib
  from rankrag_jax.convert.load import load_model
  from rankrag_jax.training import lora as lora_lib
  from rankrag_jax.training import lora_step
  from rankrag_jax.training import optimizer as optimizer_lib
  from rankrag_jax.training import step as step_lib
  batches = dict(np.load(args.data))
  config, params, _ = load_model(args.hf_dir)
  config = dataclasses.replace(config, remat_policy=args.remat)
  mesh, rules = sharding_lib.make_mesh(), sharding_lib.logical_axis_rules()
  schedule = optax.constant_schedule(args.learning_rate)
  optimizer = optimizer_lib.make_optimizer(schedule, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
  lora = None
  if lora_side:
    lora = lora_lib.LoraConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                               targets=tuple(args.targets.split(",")))
  step_fn, shardings, data_shardings, abstract = step_lib.jit_train_step(
      config, optimizer, schedule, mesh, rules, max_loss_positions=args.max_loss_positions, lora=lora)
  with step_lib.sharding_context(mesh, rules):
    params = jax.device_put(params, shardings["params"])
    if lora is None:
      state = jax.jit(lambda p: step_lib.new_train_state(p, optimizer, 0), out_shardings=shardings,
                      donate_argnums=(0,))(params)
      trainable = state["params"]
    else:
      adapters = lora_lib.init_adapters(abstract["adapters"], 0, shardings["adapters"])
      state = jax.jit(lambda p, a: lora_step.new_train_state(p, a, optimizer, 0), out_shardings=shardings,
                      donate_argnums=(0, 1))(params, adapters)
      trainable = state["adapters"]
    del params
    shapes = train_step_bench.step_shapes(batches, args)
    holder, run = train_step_bench.compiled_step_runner(step_fn, state, batches, shapes, data_shardings)
    load = common.machine_load()
    times = common.time_repeats(run, args.repeats, warmup=0)
  count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))  # noqa: E731
  nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))  # noqa: E731
  return {"seconds": times, "load": load, "losses": holder["losses"], "trainable_params": count(trainable),
          "total_params": config.num_params + (count(trainable) if lora else 0),
          "optimizer_state_mib": nbytes(holder["state"]["opt_state"]) / 2**20,
          "state_mib": nbytes(holder["state"]) / 2**20}


def main():
  parser = common.driver_parser(__doc__, "/tmp/rankrag_bench/lora_batches.npz")
  parser.add_argument("--source", choices=("blend", "synthetic"), default="blend")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--max_loss_positions", type=int, default=192)
  parser.add_argument("--shape_bucket", type=int, default=64)
  parser.add_argument("--remat", default="dots")
  parser.add_argument("--learning_rate", type=float, default=LEARNING_RATE)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--alpha", type=float, default=32.0)
  parser.add_argument("--dropout", type=float, default=0.05)
  parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
  parser.set_defaults(repeats=3)
  side = next(action for action in parser._actions if action.dest == "side")  # pylint: disable=protected-access
  side.choices = ("parent", "prepare", "full", "lora")  # this benchmark's children
  args = parser.parse_args()
  sides = {"prepare": train_step_bench.side_prepare, "full": lambda a: side_train(a, False),
           "lora": lambda a: side_train(a, True)}
  if args.side != "parent":
    from rankrag_jax import host_memory
    kept = host_memory.keep_freed_host_memory()
    result = sides[args.side](args)
    result["kept_freed_host_memory"] = kept
    common.emit(result)
    return
  pathlib.Path(args.data).parent.mkdir(parents=True, exist_ok=True)
  common.ensure_hf_dir(args.hf_dir)
  child_args = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("side", "rounds", "concurrent")]
  script = str(pathlib.Path(__file__).resolve())
  prep = common.run_side(script, "prepare", child_args)
  runs = {"full": [], "lora": []}
  for r in range(args.rounds):
    for side in runs:
      res = common.run_side(script, side, child_args)
      runs[side].append(res)
      print(f"round {r} {side}: {common.median(res['seconds']):.2f} s/step, losses {res['losses']}, "
            f"load {res['load']}, rss {res['peak_rss_mib']} MiB", flush=True)
  full, lora = (common.pooled_median(runs[s], "seconds") for s in ("full", "lora"))
  first = {side: runs[side][0] for side in runs}
  print(f"\nbatches: {prep['source']}, {args.batch} x {args.seq}, shape_bucket {args.shape_bucket}; LoRA r={args.rank} "
        f"alpha={args.alpha} dropout={args.dropout} on {args.targets}")
  print("| | full fine-tuning | LoRA | LoRA / full |\n|---|---|---|---|")
  print(f"| step time (median s) | {full:.2f} | {lora:.2f} | {lora / full:.2f}x |")
  rss = {s: max(res["peak_rss_mib"] for res in runs[s]) for s in runs}
  print(f"| peak RSS (MiB) | {rss['full']:,.0f} | {rss['lora']:,.0f} | {rss['lora'] / rss['full']:.2f}x |")
  print(f"| trainable params | {first['full']['trainable_params']:,} | {first['lora']['trainable_params']:,} | "
        f"{first['lora']['trainable_params'] / first['full']['trainable_params']:.4f} |")
  print(f"| optimizer state (MiB) | {first['full']['optimizer_state_mib']:.1f} | "
        f"{first['lora']['optimizer_state_mib']:.1f} | "
        f"{first['lora']['optimizer_state_mib'] / first['full']['optimizer_state_mib']:.4f} |")
  print(f"| train state (MiB) | {first['full']['state_mib']:.1f} | {first['lora']['state_mib']:.1f} | "
        f"{first['lora']['state_mib'] / first['full']['state_mib']:.2f}x |")


if __name__ == "__main__":
  main()
