"""Training: sharded step = single-device step, exact resume after kill -9, NaN stop, HF export, real SmolLM2.

The multi-device and crash tests run in subprocesses: XLA's device count is fixed at JAX start-up, and a
kill -9 needs a process to kill. The tiny model and the synthetic copy task (training/data.py) keep them fast.
"""

import dataclasses
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankrag_jax import sharding
from rankrag_jax.convert import load as convert_load
from rankrag_jax.model import config as config_lib
from rankrag_jax.model import llama
from rankrag_jax.training import bucketing
from rankrag_jax.training import checkpointing
from rankrag_jax.training import data as data_lib
from rankrag_jax.training import loss as loss_lib
from rankrag_jax.training import metrics as metrics_lib
from rankrag_jax.training import optimizer as optimizer_lib
from rankrag_jax.training import step as step_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
  env.update(extra)
  return env


def _train_command(model_dir, *bindings, gin_files=("gin_configs/stage2.gin", "gin_configs/models/tiny.gin")):
  """`python -m rankrag_jax.train` on the tiny model and the synthetic task, with extra Gin bindings."""
  base = [f"MODEL_DIR = '{model_dir}'", "loop.train.batch_fn = @data.synthetic_batches", "TRAIN_STEPS = 24",
          "BATCH_SIZE = 8", "SEQUENCE_LENGTH = 64", "LEARNING_RATE = 3e-3", "WARMUP_STEPS = 2",
          "MAX_LOSS_POSITIONS = 32", "CHECKPOINT_EVERY = 4", "KEEP_CHECKPOINTS = 2", "EVAL_EVERY = None",
          "EVAL_BATCHES = 2", "LOG_EVERY = 1", "loop.train.export_hf = False", "loop.train.progress_bar = False"]
  command = [sys.executable, "-m", "rankrag_jax.train"] + [f"--gin_file={f}" for f in gin_files]
  return command + [f"--gin_bindings={b}" for b in base + list(bindings)]


def _losses(model_dir) -> dict[int, float]:
  return {row["step"]: row["loss"] for row in metrics_lib.read_metrics(model_dir) if "loss" in row}


# ------------------------------------------------------------------------------------------------- the step
def _copy_task_batch(batch_size=8, length=32, seed=0):
  source = data_lib.SyntheticBatches("train", batch_size, length, 0, 1, seed)
  return next(source)


def test_loss_positions_keep_answer_tokens_in_order_and_count_the_rest():
  weights = jnp.array([[0, 1, 0, 1, 1, 0], [1, 1, 1, 1, 0, 0]], jnp.float32)
  indices, dropped = loss_lib.loss_positions(weights, 3)
  np.testing.assert_array_equal(indices, [[1, 3, 4], [0, 1, 2]])
  assert int(dropped) == 1  # row 2's fourth answer token did not fit


def test_gathered_loss_equals_full_vocabulary_projection_loss():
  config = config_lib.tiny()
  params = llama.init_params(config, jax.random.key(0))
  batch = _copy_task_batch()
  model = llama.Llama(config)
  full = loss_lib.loss_sums(params, batch, model=model, max_loss_positions=None)
  gathered = loss_lib.loss_sums(params, batch, model=model, max_loss_positions=16)
  assert int(gathered[loss_lib.DROPPED]) == 0
  for key in (loss_lib.LOSS_SUM, loss_lib.WEIGHT_SUM, loss_lib.CORRECT_SUM):
    np.testing.assert_allclose(gathered[key], full[key], rtol=1e-6)
  # The reference: full logits, cross-entropy where the weight is non-zero.
  logits = model.apply({"params": params}, batch["decoder_input_tokens"], batch["decoder_positions"],
                       batch["decoder_segment_ids"])
  ce = -jax.nn.log_softmax(logits)[np.arange(8)[:, None], np.arange(32)[None], batch["decoder_target_tokens"]]
  np.testing.assert_allclose(full[loss_lib.LOSS_SUM], (ce * batch["decoder_loss_weights"]).sum(), rtol=1e-5)


def _one_step(config, batch, mesh, num_micro_batches=1, learning_rate=1e-3, max_loss_positions=16,
              shape_bucket=0):
  """One train step from the same initial state; with shape_bucket, at the batch's planned shape (as the loop)."""
  schedule = optimizer_lib.learning_rate_schedule(learning_rate, 10, 0, decay="constant")
  optimizer = optimizer_lib.make_optimizer(schedule)
  rules = sharding.logical_axis_rules()
  step_fn, state_shardings, data_shardings, _ = step_lib.jit_train_step(
      config, optimizer, schedule, mesh, rules, max_loss_positions=max_loss_positions,
      num_micro_batches=num_micro_batches)
  state = jax.device_put(step_lib.new_train_state(llama.init_params(config, jax.random.key(0)), optimizer, 0),
                         state_shardings)
  shape = ()
  if shape_bucket:
    planned = bucketing.plan_step_shape(batch, granularity=shape_bucket,
                                        local_shards=step_lib.num_data_shards(mesh, rules),
                                        num_micro_batches=num_micro_batches, max_loss_positions=max_loss_positions)
    batch, shape = bucketing.trim_batch(batch, planned.length), (planned.num_tokens, planned.loss_positions)
  with step_lib.sharding_context(mesh, rules):
    state, metrics = step_fn(state, data_lib.global_batch(batch, data_shardings), *shape)
  return state, metrics


def test_gradient_accumulation_gives_the_same_update_as_one_batch():
  config = config_lib.tiny()
  batch = _copy_task_batch()
  mesh = sharding.make_mesh()
  one, metrics_one = _one_step(config, batch, mesh)
  four, metrics_four = _one_step(config, batch, mesh, num_micro_batches=4)
  np.testing.assert_allclose(metrics_four["loss"], metrics_one["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(four["params"])):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("overrides", [{"remat_policy": "full"}, {"remat_policy": "dots"}, {"scan_layers": False}])
def test_remat_and_unrolled_layers_take_the_same_step(overrides):
  batch, mesh = _copy_task_batch(), sharding.make_mesh()
  reference, metrics = _one_step(config_lib.tiny(), batch, mesh)
  variant, variant_metrics = _one_step(config_lib.tiny(**overrides), batch, mesh)
  np.testing.assert_allclose(variant_metrics["grad_norm"], metrics["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(reference["params"]), jax.tree.leaves(variant["params"])):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"shape_bucket": 16, "num_micro_batches": 2}])
def test_cpu_attention_kernels_take_the_same_step_as_xla(options):
  # On one CPU device "auto" resolves to cpu_attention.cc / cpu_attention_grad.cc; the same step through XLA's
  # blockwise attention (what a CPU without a compiler runs) must update the params alike.
  config, batch, mesh = config_lib.tiny(attention_query_block=16), _copy_task_batch(length=64), sharding.make_mesh()
  assert step_lib._model(config, mesh).config.attention_impl == "cpu_ffi"  # pylint: disable=protected-access
  xla, xla_metrics = _one_step(dataclasses.replace(config, attention_impl="blockwise"), batch, mesh, **options)
  ours, metrics = _one_step(config, batch, mesh, **options)
  np.testing.assert_allclose(metrics["loss"], xla_metrics["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], xla_metrics["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ours["params"]), jax.tree.leaves(xla["params"])):
    np.testing.assert_allclose(a, b, atol=1e-5)


SHARDED_STEP_SCRIPT = textwrap.dedent("""
    import json, jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from rankrag_jax import sharding
    from rankrag_jax.model import config as config_lib
    from tests.test_train import _one_step, _copy_task_batch
    config, batch = config_lib.tiny(), _copy_task_batch()
    sharded, m8 = _one_step(config, batch, sharding.make_mesh(data=2, fsdp=2, tensor=2))
    single, m1 = _one_step(config, batch, sharding.make_mesh(devices=jax.devices()[:1]))
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(sharded["params"]), jax.tree.leaves(single["params"]))]
    specs = {jax.tree_util.keystr(p): [str(s) for s in x.sharding.spec]
             for p, x in jax.tree_util.tree_flatten_with_path(sharded)[0]}
    shards = {jax.tree_util.keystr(p): list(x.addressable_shards[0].data.shape)
              for p, x in jax.tree_util.tree_flatten_with_path(sharded)[0]}
    print("RESULT" + json.dumps({"loss8": float(m8["loss"]), "loss1": float(m1["loss"]), "max_param_diff": max(diffs),
                                 "grad_norm8": float(m8["grad_norm"]), "grad_norm1": float(m1["grad_norm"]),
                                 "devices": jax.device_count(), "specs": specs, "shards": shards}))
""")


def _run_on_8_cpu_devices(script: str) -> dict:
  """Runs `script` in a child with 8 host devices; returns the JSON it printed after "RESULT"."""
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.split("RESULT")[-1])
  assert result["devices"] == 8
  return result


def test_sharded_2x2x2_step_equals_single_device_step():
  result = _run_on_8_cpu_devices(SHARDED_STEP_SCRIPT)
  assert abs(result["loss8"] - result["loss1"]) <= 1e-5
  # Adam's first update is ~lr·sign(g): scale-blind, so the gradient's size is checked through its norm.
  assert abs(result["grad_norm8"] - result["grad_norm1"]) <= 1e-5 * result["grad_norm1"]
  assert result["max_param_diff"] <= 1e-5
  specs, shards = result["specs"], result["shards"]
  # Really sharded: q_proj [L, embed, heads, head_dim] = [2, 64, 8, 8] over (fsdp, tensor) -> [2, 32, 4, 8].
  q = "['params']['layers']['attn']['q_proj']['kernel']"
  assert specs[q] == ["None", "fsdp", "tensor", "None"] and shards[q] == [2, 32, 4, 8]
  # Adam's moments are sharded like their parameter.
  mu = [k for k in specs if k.startswith("['opt_state']") and ".mu" in k and "q_proj" in k]
  assert mu and all(specs[k] == specs[q] and shards[k] == shards[q] for k in mu)
  embed = "['params']['embed_tokens']['embedding']"
  assert specs[embed] == ["tensor", "fsdp"] and shards[embed] == [128, 32]


# ------------------------------------------------------------------------------------------ resume, NaN
def _run_until(command, env, model_dir, predicate, timeout=600):
  """Starts `command`; kill -9 once predicate(losses) holds. Returns the losses seen at the kill."""
  process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + timeout
  try:
    while time.time() < deadline:
      if process.poll() is not None:
        raise AssertionError(f"run ended before it could be killed: {process.stderr.read().decode()[-3000:]}")
      metrics_file = pathlib.Path(model_dir) / "metrics.jsonl"
      losses = _losses(model_dir) if metrics_file.exists() else {}
      if predicate(losses):
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        return losses
      time.sleep(0.05)
    raise AssertionError("timed out waiting to kill the run")
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()


def _assert_latest_checkpoint_restores(model_dir):
  """The newest finished step (if any) restores with finite params and its data position; returns it."""
  latest = checkpointing.Checkpointer(pathlib.Path(model_dir) / "checkpoints").latest_step()
  if latest is None:  # killed before the first save was committed: only a *.orbax-checkpoint-tmp dir, ignored.
    return None
  _, params = checkpointing.load_params_from_checkpoint(model_dir)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  data = json.loads((pathlib.Path(model_dir) / "checkpoints" / str(latest) / "data" / "metadata").read_text())
  assert data["train_batches"] == latest
  return latest


def test_resume_after_kill_9_repeats_the_uninterrupted_losses_exactly(tmp_path):
  env = _env()
  reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
  subprocess.run(_train_command(reference), cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
  expected = _losses(reference)
  assert sorted(expected) == list(range(1, 25))

  # Kill twice: the moment step 8 is logged (its checkpoint is then usually still being written: a
  # `8.orbax-checkpoint-tmp` directory), and later in the resumed run.
  for kill_after in (8, 17):
    _run_until(_train_command(interrupted), env, interrupted, lambda losses, k=kill_after: max(losses, default=0) >= k)
    latest = _assert_latest_checkpoint_restores(interrupted)  # never a half-written step as "latest"
    assert latest is None or (latest % 4 == 0 and latest <= kill_after)
  subprocess.run(_train_command(interrupted), cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
  resumed = _losses(interrupted)
  assert sorted(resumed) == list(range(1, 25))
  assert [resumed[s] for s in range(1, 25)] == [expected[s] for s in range(1, 25)]  # exact, step for step
  assert not [p for p in (interrupted / "checkpoints").iterdir() if "tmp" in p.name]


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
  model_dir = tmp_path / "nan"
  out = subprocess.run(_train_command(model_dir, "data.synthetic_batches.nan_at_batch = 10"), cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=900)
  assert out.returncode == 1
  assert "non-finite training loss at step 11" in out.stderr
  assert "last good checkpoint is step 8" in out.stderr
  losses = _losses(model_dir)
  assert all(math.isfinite(losses[s]) for s in range(1, 11)) and math.isnan(losses[11])
  assert _assert_latest_checkpoint_restores(model_dir) == 8


def test_next_stage_starts_from_the_previous_runs_params(tmp_path):
  """Stage I -> Stage II by run directory, given as relative paths (the README's MODEL_DIR is relative)."""
  stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
  relative1, relative2 = os.path.relpath(stage1, REPO), os.path.relpath(stage2, REPO)
  subprocess.run(_train_command(relative1, "TRAIN_STEPS = 2"), cwd=REPO, env=_env(), check=True,
                 capture_output=True, timeout=900)
  # lr 0 (AdamW's decay is scaled by the lr too): Stage II's one step leaves Stage I's params exactly as read.
  subprocess.run(_train_command(relative2, "TRAIN_STEPS = 1", f"INIT_CHECKPOINT = '{relative1}'",
                                "LEARNING_RATE = 0.0", "WARMUP_STEPS = 0", "DECAY = 'constant'"), cwd=REPO,
                 env=_env(), check=True, capture_output=True, timeout=900)
  _, before = checkpointing.load_params_from_checkpoint(stage1)
  _, after = checkpointing.load_params_from_checkpoint(stage2)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert checkpointing.Checkpointer(stage2 / "checkpoints").latest_step() == 1
  # The serving/evaluation loader takes a run directory too: the newest step's params, nothing else.
  config, loaded, _ = convert_load.load_model(stage2)
  assert config == checkpointing.read_checkpoint_config(stage2)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -------------------------------------------------------------------------------------------- HF export
def test_exported_checkpoint_loads_in_transformers_with_our_logits_and_starts_a_run(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model_dir = tmp_path / "export"
  subprocess.run(_train_command(model_dir, "TRAIN_STEPS = 3", "loop.train.export_hf = True"), cwd=REPO,
                 env=_env(), check=True, capture_output=True, timeout=900)
  config, params = checkpointing.load_params_from_checkpoint(model_dir)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir / "hf", torch_dtype=torch.float32)
  tokens = np.random.default_rng(0).integers(3, config.vocab_size, (2, 24))
  with torch.no_grad():
    expected = hf_model(torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(llama.Llama(config).apply({"params": params}, jnp.asarray(tokens, jnp.int32)))
  np.testing.assert_allclose(ours, expected, atol=1e-4)

  # The HF directory is also an init checkpoint: a run from it (lr 0) holds exactly the exported params.
  from_hf = tmp_path / "from_hf"
  subprocess.run(_train_command(from_hf, "TRAIN_STEPS = 1", f"INIT_CHECKPOINT = '{model_dir / 'hf'}'",
                                "LEARNING_RATE = 0.0", "WARMUP_STEPS = 0", "DECAY = 'constant'"), cwd=REPO,
                 env=_env(), check=True, capture_output=True, timeout=900)
  _, reloaded = checkpointing.load_params_from_checkpoint(from_hf)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reloaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------- real SmolLM2 runs
PASSAGE = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region "
           "in France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, "
           "under their leader Rollo, agreed to swear fealty to King Charles III of West Francia.")
QUESTIONS = [("In what country is Normandy located?", "France"),
             ("Who was the Norse leader?", "Rollo"),
             ("What is the capital of Japan?", None)]


def _real_batch(tokenizer, length):
  """Three RankRAG examples (context-rich QA and a negative context-ranking one), one per row, unpacked."""
  from rankrag_jax import prompts
  from rankrag_jax.data import packing
  rows = []
  for i, (question, answer) in enumerate(QUESTIONS):
    if answer is None:
      turns = [{"user": prompts.context_ranking_question(question), "assistant": prompts.ranking_answer(False)}]
      task = "context_ranking"
    else:
      turns = [{"user": prompts.context_rich_qa_question(question), "assistant": answer}]
      task = "context_rich_qa"
    example = prompts.make_example(component="test", example_id=str(i), task=task, turns=turns, passages=[PASSAGE])
    tokenized = packing.tokenize_example(example, tokenizer, length, "chatqa")
    rows.append(tokenized)
  batch = {k: np.zeros((4, length), np.int32) for k in step_lib.BATCH_KEYS}
  for r, row in enumerate(rows + rows[:1]):
    n = len(row["targets"])
    batch["decoder_target_tokens"][r, :n] = row["targets"]
    batch["decoder_input_tokens"][r, 1:n] = row["targets"][:-1]
    batch["decoder_loss_weights"][r, :n] = row["loss_weights"]
    batch["decoder_segment_ids"][r, :n] = 1
    batch["decoder_positions"][r, :n] = np.arange(n)
  return batch


def test_smollm2_fine_tuning_lowers_the_loss_on_a_fixed_real_batch(tmp_path):
  """The whole loop on the real model: GGUF init, 4 steps on one real batch, checkpoint, HF export."""
  import gin
  from rankrag_jax import tokenizer as tokenizer_lib
  from rankrag_jax.assets import asset_file
  from rankrag_jax import cli
  from rankrag_jax.training import loop
  batch = _real_batch(tokenizer_lib.load_tokenizer(asset_file("smollm2_135m_instruct")), 128)
  assert batch["decoder_loss_weights"].sum() >= 8

  def fixed_batches(split, batch_size, sequence_length, shard_id, num_shards, seed, start_batch=0):
    class Fixed:
      position = start_batch
      def __next__(self):
        self.position += 1
        return batch
    return Fixed()

  gin.clear_config()
  try:
    cli.parse_gin(["gin_configs/stage2.gin", "gin_configs/cpu.gin"],
              [f"MODEL_DIR = '{tmp_path}'", "TRAIN_STEPS = 4", "BATCH_SIZE = 4", "SEQUENCE_LENGTH = 128",
               "LEARNING_RATE = 5e-5", "WARMUP_STEPS = 0", "DECAY = 'constant'", "MAX_LOSS_POSITIONS = 16",
               "CHECKPOINT_EVERY = 4", "EVAL_BATCHES = 0", "loop.train.progress_bar = False"], [], finalize=False)
    summary = loop.train(batch_fn=fixed_batches)
  finally:
    gin.clear_config()
  losses = _losses(tmp_path)
  assert sorted(losses) == [1, 2, 3, 4]
  assert losses[4] < losses[3] < losses[1]  # same batch every step: the loss must fall
  assert checkpointing.Checkpointer(tmp_path / "checkpoints").latest_step() == 4
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
  assert summary.hf_export_dir == str(tmp_path / "hf")


@pytest.mark.slow
def test_stage2_smollm2_on_the_embedded_blend_lowers_held_out_loss(tmp_path):
  """The README command (stage2.gin + cpu.gin): real data, real model, held-out loss before vs after."""
  command = [sys.executable, "-m", "rankrag_jax.train", "--gin_file=gin_configs/stage2.gin",
             "--gin_file=gin_configs/cpu.gin", f"--gin_bindings=MODEL_DIR = '{tmp_path}'",
             "--gin_bindings=loop.train.progress_bar = False"]
  out = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=7200)
  assert out.returncode == 0, out.stderr[-3000:]
  evals = [row for row in metrics_lib.read_metrics(tmp_path) if "eval/loss" in row]
  assert evals[0]["step"] == 0 and evals[-1]["step"] > 0
  assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
  assert (tmp_path / "hf" / "model.safetensors").is_file()
