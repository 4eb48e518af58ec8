"""GPU check of the fused attention (issue #33 part 3): gpu_flash's parity on the GPU, then timed steps against XLA.

    python bench/gpu_attention_check.py [--repeats=10] [--out=FILE.json]

On the device machine (one H100; the device tool runs this in the repository root, $OUT comes back):
    . /work/venv/bin/activate 2>/dev/null; pip show jax-cuda12-plugin >/dev/null || echo "needs jax[cuda12]==0.10.2"
    PYTHONPATH=$PWD python bench/gpu_attention_check.py --out=$OUT/gpu_attention.json 2>&1 | tail -40

1. Parity: `backends.gpu.flash.gpu_flash_attention` compiled for the GPU (not interpret mode) against the
   independent masked reference of tests/test_fused_attention.py on its packed rows (segments, padding, GQA),
   forward at real tokens and the gradients, f32 and bf16 inputs; then at Llama-3-8B's attention shape
   ([1, 4096] packed into 8 segments, 32 / 8 heads of 128, bf16) against XLA's attention in f32.
2. Attention alone at that shape, forward + backward: xla (jax.nn.dot_product_attention with the segment mask),
   gpu_flash, and for scale cuDNN through jax.nn.dot_product_attention(implementation="cudnn") with is_causal
   only (segments ignored: NOT a correct packed attention, the lower bound a fused kernel reaches).
3. A Llama-3-8B-shaped layer step: `hidden_states` of a 1-layer llama3_8b (embed, one decoder layer, final
   norm; bf16 compute, f32 params) on [2, 4096] packed rows, value and gradient, attention_impl xla vs gpu_flash.
4. A SmolLM2-135M train step: `training.step.jit_train_step` (AdamW, answer-only loss, remat 'dots', bf16
   compute) on [8, 2048] synthetic packed rows, attention_impl xla vs gpu_flash.
Prints a table (median seconds of --repeats after a warm-up, tokens/s) and writes the records to --out.
`--smoke`: the same script at toy shapes (tiny model; the kernel in Pallas interpret mode when there is no GPU),
to check the script itself on a CPU before spending device time.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rankrag_jax.backends.gpu import flash  # noqa: E402
from rankrag_jax.model import attention  # noqa: E402
from rankrag_jax.model import config as config_lib  # noqa: E402
from rankrag_jax.model import llama  # noqa: E402
from tests import test_fused_attention as parity  # noqa: E402

import functools  # noqa: E402

IMPLS = ("xla", "gpu_flash")
# (attention [B, T, H, Kh, D], layer-step rows [B, T], SmolLM2 rows [B, T]); --smoke replaces them.
SHAPES = {"attention": (1, 4096, 32, 8, 128), "layer": (2, 4096), "smollm2": (8, 2048)}
SMOKE_SHAPES = {"attention": (1, 256, 4, 2, 32), "layer": (1, 256), "smollm2": (2, 256)}
ON_CPU = jax.default_backend() == "cpu"


def median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile + warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def packed_rows(batch: int, length: int, segments: int) -> tuple[np.ndarray, np.ndarray]:
  """(segment_ids, positions): `segments` equal segments per row, the last 3% of slots padding."""
  real = int(length * 0.97)
  bounds = np.linspace(0, real, segments + 1).astype(int)
  ids, pos = np.zeros(length, np.int32), np.zeros(length, np.int32)
  for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
    ids[a:b], pos[a:b] = i + 1, np.arange(b - a)
  return np.tile(ids, (batch, 1)), np.tile(pos, (batch, 1))


def attention_inputs(shape):
  b, t, h, kh, d = shape
  segment_ids, _ = packed_rows(b, t, 8)
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16)
  k, v = (jax.random.normal(key, (b, t, kh, d), jnp.bfloat16) for key in keys[1:])
  return q, k, v, jnp.asarray(segment_ids)


def check_parity(shapes) -> list[dict]:
  records = []
  # Compiled for the GPU (interpret mode only where there is none: --smoke on a CPU).
  kernel = functools.partial(flash.gpu_flash_attention, interpret=ON_CPU)
  diffs = parity.parity_differences(kernel)
  records.append({"check": "parity f32 (test rows)", **diffs, "holds": parity.parity_holds(diffs)})
  q, k, v, segment_ids, _ = parity.make_inputs(dtype=jnp.bfloat16)
  out = jax.jit(kernel)(q, k, v, segment_ids)
  want = parity.reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), segment_ids)
  real = np.asarray(segment_ids != 0)
  records.append({"check": "parity bf16 (test rows)",
                  "forward": float(np.abs(np.asarray(out, np.float32) - np.asarray(want))[real].max())})
  q, k, v, segment_ids = attention_inputs(shapes["attention"])
  out = jax.jit(kernel)(q, k, v, segment_ids)
  want = attention.attend(*(x.astype(jnp.float32) for x in (q, k, v)), attention.visibility(segment_ids),
                          impl="xla")
  real = np.asarray(segment_ids != 0)
  records.append({"check": f"{shapes['attention']} bf16 vs xla f32",
                  "forward": float(np.abs(np.asarray(out, np.float32) - np.asarray(want))[real].max())})
  return records


def time_attention(shapes, repeats: int) -> list[dict]:
  q, k, v, segment_ids = attention_inputs(shapes["attention"])
  vis = attention.visibility(segment_ids)
  variants = {impl: (lambda q, k, v, impl=impl: attention.attend(q, k, v, vis, impl=impl)) for impl in IMPLS}
  variants["cudnn causal, segments ignored (bound)"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn")
  records = []
  for name, fn in variants.items():
    step = jax.jit(jax.value_and_grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                                      argnums=(0, 1, 2)))
    try:
      seconds = median_seconds(lambda step=step: step(q, k, v), repeats)
      records.append({"check": f"attention fwd+bwd {shapes['attention']}: {name}", "seconds": seconds})
    except Exception as error:  # pylint: disable=broad-except  (cuDNN may refuse a shape; say so, go on)
      records.append({"check": f"attention fwd+bwd: {name}", "error": str(error).splitlines()[0][:200]})
  return records


def time_layer_step(shapes, repeats: int, smoke: bool) -> list[dict]:
  segment_ids, positions = packed_rows(*shapes["layer"], 8)
  preset = config_lib.tiny if smoke else config_lib.llama3_8b
  records = []
  for impl in IMPLS:
    config = preset(num_layers=1, dtype="bfloat16", param_dtype="float32", remat_policy="none",
                    attention_impl=impl)
    tokens = jax.random.randint(jax.random.key(1), segment_ids.shape, 0, config.vocab_size)
    model = llama.Llama(config)
    params = jax.jit(lambda key, config=config: llama.init_params(config, key))(jax.random.key(0))

    def loss(params, model=model):
      hidden, _ = model.apply({"params": params}, tokens, positions, segment_ids, method=model.hidden_states)
      return jnp.sum(hidden.astype(jnp.float32) ** 2)
    step = jax.jit(jax.value_and_grad(loss))
    seconds = median_seconds(lambda step=step, params=params: step(params), repeats)
    records.append({"check": f"{'tiny' if smoke else 'Llama-3-8B'} layer step {shapes['layer']} bf16: {impl}",
                    "seconds": seconds,
                    "tokens_per_s": segment_ids.size / seconds})
    del params
  return records


def time_smollm2_train_step(shapes, repeats: int, smoke: bool) -> list[dict]:
  import optax  # pylint: disable=import-outside-toplevel
  from bench import train_step as train_bench  # pylint: disable=import-outside-toplevel
  from rankrag_jax import sharding  # pylint: disable=import-outside-toplevel
  from rankrag_jax.training import optimizer as optimizer_lib  # pylint: disable=import-outside-toplevel
  from rankrag_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel
  records = []
  for impl in IMPLS:
    preset = config_lib.tiny if smoke else config_lib.smollm2_135m
    config = preset(dtype="bfloat16", param_dtype="float32", remat_policy="dots", attention_impl=impl)
    rows, length = shapes["smollm2"]
    batch = train_bench.make_batch(rows, length, config.vocab_size)
    mesh, rules = sharding.make_mesh(devices=jax.devices()[:1]), sharding.logical_axis_rules()
    schedule = optax.constant_schedule(2e-5)
    optimizer = optimizer_lib.make_optimizer(schedule, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
    step_fn, state_shardings, data_shardings, _ = step_lib.jit_train_step(
        config, optimizer, schedule, mesh, rules, max_loss_positions=256)
    with step_lib.sharding_context(mesh, rules):
      params = jax.jit(lambda key, config=config: llama.init_params(config, key))(jax.random.key(0))
      holder = {"state": jax.jit(lambda p: step_lib.new_train_state(p, optimizer, 0),
                                 out_shardings=state_shardings)(params)}
      device_batch = {key: jax.device_put(batch[key], data_shardings[key]) for key in step_lib.BATCH_KEYS}

      def run(holder=holder, step_fn=step_fn, device_batch=device_batch):
        holder["state"], metrics = step_fn(holder["state"], device_batch)
        return metrics["loss"]
      seconds = median_seconds(run, repeats)
    records.append({"check": f"{'tiny' if smoke else 'SmolLM2-135M'} train step {shapes['smollm2']} bf16: {impl}",
                    "seconds": seconds, "tokens_per_s": rows * length / seconds})
  return records


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default=None)
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args()
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  print("devices:", jax.devices(), flush=True)
  records = [{"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}]
  for section in (lambda: check_parity(shapes), lambda: time_attention(shapes, args.repeats),
                  lambda: time_layer_step(shapes, args.repeats, args.smoke),
                  lambda: time_smollm2_train_step(shapes, args.repeats, args.smoke)):
    for record in section():
      records.append(record)
      print(" | ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in record.items()),
            flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
  main()
