r"""Stage-I / Stage-II training: `python -m rankrag_jax.train --gin_file=gin_configs/stage2.gin [...]`.

    # Fine-tune SmolLM2-135M-Instruct on the embedded blend on this CPU (a few minutes):
    python -m rankrag_jax.train --gin_file=gin_configs/stage2.gin --gin_file=gin_configs/cpu.gin
    # Llama-3-8B Stage II on a TPU v5p-64 slice (run on every host; see experiments/tpu_v5p_pod.md):
    python -m rankrag_jax.train --gin_file=gin_configs/stage2.gin --gin_file=gin_configs/models/llama3_8b.gin \
        --gin_file=gin_configs/meshes/tpu_v5p_64.gin --gin_bindings="MODEL_DIR='gs://bucket/run'" --distributed

The command parses flags and Gin (`cli`: --gin_file, --gin_bindings, --gin_search_paths), starts
`jax.distributed` when launched on several hosts, and calls `training.loop.train`; everything else is in the
library. Importing JAX is fine before `jax.distributed.initialize()`; touching devices is not.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax

from rankrag_jax import cli
from rankrag_jax.training import loop

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (cluster auto-detection: Cloud TPU, SLURM, "
    "Open MPI, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID). Implied by --coordinator_address.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def initialize_distributed() -> None:
  """Joins the multi-process job when asked to (before any other JAX call)."""
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
  if jax.process_count() > 1:
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --gin_file / --gin_bindings")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO; -v 0 brings it back.
  cli.keep_freed_host_memory()  # before JAX starts its backend
  initialize_distributed()
  cli.parse_gin()  # --gin_file / --gin_bindings / --gin_search_paths
  try:
    summary = loop.train()
  except loop.NonFiniteLossError as e:
    print(f"\nTRAINING STOPPED: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if jax.process_index() == 0:
    print(format_summary(summary), flush=True)


def format_summary(summary) -> str:
  lines = [f"\nDone: steps {summary.first_step} -> {summary.last_step} in {summary.wall_seconds:.0f}s."]
  if summary.initial_eval_loss is not None or summary.final_eval_loss is not None:
    lines.append(f"  held-out loss: {summary.initial_eval_loss} -> {summary.final_eval_loss}")
  lines += [f"  run directory:     {summary.model_dir}",
            f"  checkpoints:       {summary.checkpoint_dir}",
            f"  TensorBoard:       tensorboard --logdir {summary.tensorboard_dir}",
            f"  metrics (JSONL):   {summary.metrics_file}"]
  if summary.hf_export_dir:
    lines.append(f"  HF export:         {summary.hf_export_dir}  "
                 "(transformers.AutoModelForCausalLM.from_pretrained(...))")
  if summary.peft_export_dir:
    lines.append(f"  PEFT adapter:      {summary.peft_export_dir}  (peft.PeftModel.from_pretrained(base, ...); "
                 "rag.py --checkpoint=... serves it with its base)")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
