"""LoRA training: adapters computed in the layer equal the merged model, only adapters train, the base never
moves, the optimizer holds adapter state only, checkpoints hold adapters + a base reference, resume is exact."""

import dataclasses
import functools
import json
import shutil

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankrag_jax import cli
from rankrag_jax import sharding
from rankrag_jax.model import axes
from rankrag_jax.model import config as config_lib
from rankrag_jax.model import llama
from rankrag_jax.training import checkpointing
from rankrag_jax.training import data as data_lib
from rankrag_jax.training import lora as lora_lib
from rankrag_jax.training import lora_step
from rankrag_jax.training import loss as loss_lib
from rankrag_jax.training import metrics as metrics_lib
from rankrag_jax.training import optimizer as optimizer_lib
from rankrag_jax.training import step as step_lib

LORA = lora_lib.LoraConfig(rank=4, alpha=8.0)


def _batch(batch_size=8, length=32, seed=0):
  return next(data_lib.SyntheticBatches("train", batch_size, length, 0, 1, seed))


def _nonzero_adapters(config, lora, seed=0):
  """Adapters with B != 0 (fresh ones have B = 0, which would hide a wrong A·B)."""
  abstract, _ = lora_step.abstract_train_state(config, lora, optimizer_lib.make_optimizer(lambda _: 1e-3))
  adapters = lora_lib.init_adapters(abstract["adapters"], seed)
  return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed + 1), x.shape), adapters)


@pytest.mark.parametrize("targets", [lora_lib.ALL_TARGETS, ("q_proj", "o_proj", "down_proj")])
def test_in_layer_adapters_give_the_merged_models_loss_and_gradients(targets):
  """x·W + s·(x·A)·B inside the scan = the model with W + s·A·B merged: same loss, same adapter gradients."""
  config, lora = config_lib.tiny(), lora_lib.LoraConfig(rank=4, alpha=12.0, targets=targets)
  params, batch = llama.init_params(config, jax.random.key(0)), _batch()
  adapters, model = _nonzero_adapters(config, lora), llama.Llama(config)

  def in_layer(adapters):
    return loss_lib.loss_sums(adapters, batch, model=lora_lib.AdaptedModel(model, lora, params))[loss_lib.LOSS_SUM]

  def merged(adapters):
    return loss_lib.loss_sums(lora_lib.merge_adapters(params, adapters, lora, xp=jnp), batch,
                              model=model)[loss_lib.LOSS_SUM]

  (loss_a, grads_a), (loss_b, grads_b) = jax.value_and_grad(in_layer)(adapters), jax.value_and_grad(merged)(adapters)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  assert len(jax.tree.leaves(grads_a)) == 2 * len(targets)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_wrong_scaling_or_transposed_adapters_differ_from_the_merged_model():
  """The comparison above is not vacuous: merging with alpha instead of alpha/r, or A·B transposed (q_proj is
  square in the tiny model: 64 -> 8 heads x 8), gives another loss."""
  config, lora = config_lib.tiny(), lora_lib.LoraConfig(rank=4, alpha=12.0, targets=("q_proj",))
  params, batch = llama.init_params(config, jax.random.key(0)), _batch()
  adapters, model = _nonzero_adapters(config, lora), llama.Llama(config)
  tokens = batch["decoder_input_tokens"]
  adapted = lora_lib.AdaptedModel(model, lora, params).apply({"params": adapters}, tokens)
  effect = float(jnp.abs(adapted - model.apply({"params": params}, tokens)).max())
  unscaled = lora_lib.merge_adapters(params, adapters, dataclasses.replace(lora, alpha=lora.alpha * lora.rank))
  delta = lora_lib.delta_kernel(adapters, lora, "q_proj")
  transposed = jax.tree.map(lambda x: x, params)
  q = transposed["layers"]["attn"]["q_proj"]
  q["kernel"] = q["kernel"] + np.swapaxes(delta.reshape(2, 64, 64), 1, 2).reshape(delta.shape)
  correct = lora_lib.merge_adapters(params, adapters, lora)
  diffs = [float(jnp.abs(model.apply({"params": p}, tokens) - adapted).max()) for p in (correct, unscaled, transposed)]
  assert diffs[0] < 1e-3 * effect and min(diffs[1:]) > 0.1 * effect, (effect, diffs)


def _lora_steps(config, lora, num_steps, learning_rate=3e-3):
  schedule = optimizer_lib.learning_rate_schedule(learning_rate, 10, 0, decay="constant")
  optimizer = optimizer_lib.make_optimizer(schedule)
  mesh, rules = sharding.make_mesh(), sharding.logical_axis_rules()
  step_fn, shardings, data_shardings, abstract = step_lib.jit_train_step(
      config, optimizer, schedule, mesh, rules, max_loss_positions=16, lora=lora)
  base = llama.init_params(config, jax.random.key(0))
  base_copy = jax.tree.map(np.array, base)
  adapters = lora_lib.init_adapters(abstract["adapters"], 0)
  state = jax.device_put(lora_step.new_train_state(base, adapters, optimizer, 0), shardings)
  losses = []
  with step_lib.sharding_context(mesh, rules):
    for _ in range(num_steps):
      state, metrics = step_fn(state, data_lib.global_batch(_batch(), data_shardings))
      losses.append(float(metrics["loss"]))
  return state, losses, base_copy, abstract


def test_lora_steps_train_only_the_adapters_and_the_optimizer_holds_only_their_state():
  config = config_lib.tiny(param_dtype=jnp.bfloat16)  # the base stays in its own dtype
  lora = lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.1)
  state, losses, base_before, abstract = _lora_steps(config, lora, 6)
  # the same batch every step: the adapters must lower its loss (slowly: the random base's activations are small)
  assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), base_before)  # bit for bit
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state["params"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["adapters"]))
  assert np.abs(np.asarray(state["adapters"]["layers"]["attn"]["q_proj"]["lora_b"])).max() > 0  # B moved off 0
  # Optimizer state: Adam's mu and nu for each adapter leaf (same shapes), plus scalar counts; nothing base-sized.
  adapter_shapes = sorted(x.shape for x in jax.tree.leaves(state["adapters"]))
  moment_shapes = sorted(x.shape for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
  assert moment_shapes == sorted(adapter_shapes * 2)
  n_adapter = lora_lib.num_adapter_params(state["adapters"])
  # layers x rank x (in + out) of q, k, v, o (64 -> 8x8, 64 -> 2x8 twice, 8x8 -> 64), gate, up, down (64 <-> 128)
  assert n_adapter == 2 * 4 * ((64 + 64) + 2 * (64 + 16) + (64 + 64) + 3 * (64 + 128))
  assert sum(x.size for x in jax.tree.leaves(state["opt_state"])) < 2 * n_adapter + 16


def test_adapters_are_sharded_by_the_kernels_logical_axes():
  _, logical = lora_step.abstract_train_state(config_lib.tiny(), LORA, optimizer_lib.make_optimizer(lambda _: 1.0))
  q = logical["adapters"]["layers"]["attn"]["q_proj"]
  o = logical["adapters"]["layers"]["attn"]["o_proj"]
  assert tuple(q["lora_a"]) == (axes.LAYERS, axes.EMBED, None)
  assert tuple(q["lora_b"]) == (axes.LAYERS, None, axes.HEADS, axes.HEAD_DIM)
  assert tuple(o["lora_a"]) == (axes.LAYERS, axes.HEADS, axes.HEAD_DIM, None)
  mu = logical["opt_state"][1][0].mu["layers"]["attn"]["q_proj"]["lora_a"]  # Adam moments: the same names
  assert tuple(mu) == (axes.LAYERS, axes.EMBED, None)


def _train(model_dir, steps=6, bindings=()):
  from rankrag_jax.training import loop  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    cli.parse_gin(["gin_configs/stage2.gin", "gin_configs/models/tiny.gin", "gin_configs/lora.gin"],
                  [f"MODEL_DIR = '{model_dir}'", "loop.train.batch_fn = @data.synthetic_batches",
                   f"TRAIN_STEPS = {steps}", "BATCH_SIZE = 8", "SEQUENCE_LENGTH = 64", "LEARNING_RATE = 3e-3",
                   "WARMUP_STEPS = 2", "MAX_LOSS_POSITIONS = 32", "CHECKPOINT_EVERY = 3", "KEEP_CHECKPOINTS = 3",
                   "EVAL_EVERY = None", "EVAL_BATCHES = 1", "LOG_EVERY = 1", "loop.train.progress_bar = False",
                   "LORA_RANK = 4", "LORA_DROPOUT = 0.1"] + list(bindings), [], finalize=False)
    return loop.train()
  finally:
    gin.clear_config()


def _saved_state(model_dir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(model_dir / "checkpoints", item_names=(checkpointing.STATE,))
  restored = manager.restore(step, args=ocp.args.Composite(**{checkpointing.STATE: ocp.args.PyTreeRestore()}))
  manager.close()
  return jax.tree.map(np.asarray, dict(restored[checkpointing.STATE]))


def _losses(model_dir):
  return {row["step"]: row["loss"] for row in metrics_lib.read_metrics(model_dir) if "loss" in row}


def test_lora_resume_is_exact_and_checkpoints_hold_adapters_and_a_base_reference(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  _train(straight)
  _train(resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")  # as if killed after step 3's checkpoint
  (resumed / "metrics.jsonl").write_text("".join(
      line + "\n" for line in (resumed / "metrics.jsonl").read_text().splitlines()
      if json.loads(line).get("step", 0) <= 3))
  summary = _train(resumed)
  assert summary.first_step == 3
  assert _losses(resumed) == _losses(straight)  # bit-identical losses, dropout masks included
  a, b = _saved_state(straight, 6), _saved_state(resumed, 6)
  assert "params" not in a and set(a) == {"step", "adapters", "opt_state", "rng"}  # no base in the checkpoint
  jax.tree.map(np.testing.assert_array_equal, a, b)
  reference = json.loads((straight / "checkpoints" / lora_step.LORA_FILE).read_text())
  assert reference["base_checkpoint"] is None and reference["lora"]["rank"] == 4
  # The run directory serves directly: its base with the adapters merged (load_model, as rag.py does).
  from rankrag_jax.convert import load_model  # pylint: disable=g-import-not-at-top
  config, merged, _ = load_model(straight)
  expected = lora_lib.merge_adapters(llama.init_params(config, jax.random.key(0)), a["adapters"],
                                     lora_step.read_reference(straight / "checkpoints")["lora"])
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), merged, expected)
  # ... and starts the next stage (Stage I LoRA -> Stage II) from those merged weights.
  from rankrag_jax.training import initialization  # pylint: disable=g-import-not-at-top
  _, place, _ = initialization.initial_params(str(straight), config_lib.tiny())
  next_stage = place(jax.eval_shape(lambda: merged), 0)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), next_stage, expected)


def test_resuming_on_another_base_or_lora_config_is_a_clear_error(tmp_path):
  from rankrag_jax.convert import save_hf_checkpoint  # pylint: disable=g-import-not-at-top
  config = config_lib.tiny()
  save_hf_checkpoint(tmp_path / "base", config, jax.device_get(llama.init_params(config, jax.random.key(0))))
  run = tmp_path / "run"
  _train(run, steps=3, bindings=[f"INIT_CHECKPOINT = '{tmp_path / 'base'}'"])
  with pytest.raises(ValueError, match=r"lora\.json.*LoraConfig"):
    _train(run, steps=4, bindings=["LORA_RANK = 8"])
  save_hf_checkpoint(tmp_path / "base", config, jax.device_get(llama.init_params(config, jax.random.key(1))))
  with pytest.raises(ValueError, match=r"lora\.json.*fingerprint differs"):
    _train(run, steps=4)  # the base directory now holds other weights
