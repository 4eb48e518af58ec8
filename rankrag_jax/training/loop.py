"""The training loop: init or resume, step, log, evaluate, checkpoint, stop on NaN, export HF weights.

    summary = train()   # every argument from Gin (gin_configs/stage2.gin); see `train`'s docstring

Metrics are fetched from the device every `log_every` steps (not every step, so dispatch runs ahead of the
host) and always before a checkpoint is written: a checkpoint is only saved after every loss up to its step has
been seen to be finite, so the newest checkpoint is always a good one.
"""

import dataclasses
import pathlib
import time

from absl import logging
import gin
import jax
from jax.experimental import multihost_utils
import numpy as np

from rankrag_jax import sharding as sharding_lib
from rankrag_jax.model.config import LlamaConfig
from rankrag_jax.training import bucketing
from rankrag_jax.training import checkpointing
from rankrag_jax.training import data as data_lib
from rankrag_jax.training import initialization
from rankrag_jax.training import lora as lora_lib
from rankrag_jax.training import lora_step
from rankrag_jax.training import loss as loss_lib
from rankrag_jax.training import metrics as metrics_lib
from rankrag_jax.training import optimizer as optimizer_lib
from rankrag_jax.training import step as step_lib

TRAIN_POSITION_KEY = "train_batches"


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss or gradient norm; the run stopped without saving that state."""


@dataclasses.dataclass
class TrainSummary:
  model_dir: str
  checkpoint_dir: str
  tensorboard_dir: str
  metrics_file: str
  hf_export_dir: str | None
  first_step: int
  last_step: int
  initial_eval_loss: float | None = None
  final_eval_loss: float | None = None
  final_train_loss: float | None = None
  wall_seconds: float = 0.0
  peft_export_dir: str | None = None  # LoRA runs: the adapters as a PEFT directory


class HeldOut:
  """Held-out ("validation") loss over the same first `num_batches` batches every time (read once, kept)."""

  def __init__(self, batch_fn, eval_fn, data_shardings, *, num_batches: int, batch_size: int,
               sequence_length: int, seed: int):
    self._read = lambda: batch_fn(split="validation", batch_size=batch_size, sequence_length=sequence_length,
                                  shard_id=jax.process_index(), num_shards=jax.process_count(), seed=seed,
                                  start_batch=0)
    self._eval_fn, self._data_shardings, self._num_batches = eval_fn, data_shardings, num_batches
    self._batches = None

  def _local_batches(self) -> list:
    if self._batches is None:
      source, self._batches = self._read(), []
      for _ in range(self._num_batches):
        try:
          self._batches.append(next(source))
        except StopIteration:
          break
    return self._batches

  def metrics(self, params) -> dict:
    """Answer-token loss and accuracy (sums over all batches, divided once)."""
    totals = loss_lib.zero_sums()
    for local in self._local_batches():
      sums = self._eval_fn(params, data_lib.global_batch(local, self._data_shardings))
      totals = jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = jax.device_get(totals)
    weight = max(float(totals[loss_lib.WEIGHT_SUM]), 1e-8)
    return {"eval/loss": float(totals[loss_lib.LOSS_SUM]) / weight,
            "eval/accuracy": float(totals[loss_lib.CORRECT_SUM]) / weight, "eval/loss_tokens": weight,
            "eval/batches": len(self._local_batches())}

  def evaluate(self, params, step: int, writer: metrics_lib.MetricsWriter) -> float:
    result = self.metrics(params)
    writer.write(step, result)
    writer.message(f"step {step}: held-out loss {result['eval/loss']:.4f}")
    return result["eval/loss"]


def raise_if_non_finite(rows: list[dict], checkpointer: checkpointing.Checkpointer) -> None:
  """Stops the run at the first NaN/inf loss or gradient norm, before anything computed from it is saved."""
  bad = metrics_lib.first_non_finite(rows)
  if bad is None:
    return
  checkpointer.wait()  # saves already under way hold good states: let them finish.
  good = checkpointer.latest_step()
  raise NonFiniteLossError(
      f"non-finite training loss at step {bad['step']} (loss={bad['loss']}, grad_norm={bad['grad_norm']}); "
      "stopping without saving. The last good checkpoint is "
      + (f"step {good} in {checkpointer.directory}" if good is not None else "none (no step was saved)")
      + "; lower the learning rate or inspect the data at that step before resuming.")


@dataclasses.dataclass
class Run:
  """A started or resumed run: its model, compiled steps and where it stands."""
  config: LlamaConfig
  tokenizer: object
  state: dict
  data_position: dict
  step_fn: object
  eval_fn: object
  data_shardings: dict
  resumed: bool
  lora: lora_lib.LoraConfig | None = None

  def eval_params(self):
    """What eval_fn takes: the params, or for LoRA the base and adapters in one tree."""
    return self.state["params"] if self.lora is None else lora_step.eval_params(self.state)

  def model_params(self):
    """Plain Llama params (LoRA: adapters merged, a full-size copy) for ranking evaluation and HF export."""
    return self.state["params"] if self.lora is None else lora_step.merged_params(self.state, self.lora)

  def checkpointed(self) -> dict:
    """What a checkpoint holds: the whole state, or for LoRA all but the base (lora.json names it)."""
    return self.state if self.lora is None else lora_step.checkpointed(self.state)


def start_or_resume(checkpointer: checkpointing.Checkpointer, model_dir, model_config: LlamaConfig,
                    init_checkpoint: str | None, mesh, rules, *, seed: int, max_loss_positions: int | None,
                    num_micro_batches: int, lora: lora_lib.LoraConfig | None = None) -> Run:
  """Resumes from the newest checkpoint in `checkpointer`, else initialises from `init_checkpoint`.

  The architecture is the init checkpoint's (or the resumed run's); numerics are the Gin config's.
  With `lora`, init_checkpoint is the frozen base and only adapters are trained (`lora_step.start_or_resume`).
  """
  if lora is not None:
    fields = lora_step.start_or_resume(checkpointer, model_dir, model_config, init_checkpoint, lora, mesh, rules,
                                       seed=seed, max_loss_positions=max_loss_positions,
                                       num_micro_batches=num_micro_batches)
    fields["data_position"] = fields["data_position"] or {TRAIN_POSITION_KEY: 0}
    return Run(**fields, lora=lora)
  resume_step = checkpointer.latest_step()
  if resume_step is not None:
    config = initialization.merge_configs(model_config, checkpointing.read_checkpoint_config(model_dir),
                                          str(model_dir))
    tokenizer = initialization.load_run_tokenizer(model_dir)
  else:
    config, place_initial_params, tokenizer = initialization.initial_params(init_checkpoint, model_config)
  schedule = optimizer_lib.learning_rate_schedule()
  optimizer = optimizer_lib.make_optimizer(schedule)
  step_fn, state_shardings, data_shardings, abstract_state = step_lib.jit_train_step(
      config, optimizer, schedule, mesh, rules, max_loss_positions=max_loss_positions,
      num_micro_batches=num_micro_batches)
  eval_fn = step_lib.jit_eval_step(config, mesh, rules, state_shardings["params"],
                                   max_loss_positions=max_loss_positions)
  with step_lib.sharding_context(mesh, rules):
    if resume_step is not None:
      state, data_position = checkpointer.restore(abstract_state, resume_step)
      logging.info("resumed from step %d (data position %s)", resume_step, data_position)
    else:
      params = place_initial_params(abstract_state["params"], seed)
      del place_initial_params  # drops the host copy of HF/GGUF weights
      new_state = jax.jit(lambda p: step_lib.new_train_state(p, optimizer, seed),
                          in_shardings=(state_shardings["params"],), out_shardings=state_shardings)
      state, data_position = new_state(params), {TRAIN_POSITION_KEY: 0}
      checkpointer.write_config(config)
      initialization.save_run_tokenizer(tokenizer, model_dir)
  return Run(config, tokenizer, state, data_position, step_fn, eval_fn, data_shardings, resume_step is not None)


@gin.configurable
def train(model_dir: str = gin.REQUIRED, model_config: LlamaConfig = gin.REQUIRED,
          total_steps: int = gin.REQUIRED, batch_size: int = gin.REQUIRED, sequence_length: int = gin.REQUIRED,
          init_checkpoint: str | None = None, batch_fn=data_lib.blend_batches, seed: int = 0,
          num_micro_batches: int = 1, max_loss_positions: int | None = None, shape_bucket: int = 0,
          log_every: int = 10,
          eval_every: int | None = None, eval_batches: int = 4, eval_batch_size: int | None = None,
          eval_at_start: bool = True, ranking_eval: bool = False, peak_flops_per_device: float = 160e9,
          export_hf: bool = True, progress_bar: bool = True, metrics_dir: str | None = None,
          hf_export_dir: str | None = None, lora: lora_lib.LoraConfig | None = None) -> TrainSummary:
  """Trains `model_config` for `total_steps` optimizer steps of `batch_size` packed rows of `sequence_length`.

  Resumes from the newest checkpoint in `<model_dir>/checkpoints` when there is one (params, optimizer state,
  step, RNG, data position), else starts from `init_checkpoint` (see training/initialization.py).

  Args:
    model_dir: run directory (local or gs://): checkpoints/, tensorboard/, metrics.jsonl, tokenizer/, hf/.
    model_config: the model preset (Gin: `@smollm2_135m()`); architecture from init_checkpoint when given.
    total_steps, batch_size, sequence_length: optimizer steps; global rows per step; packed row length.
    init_checkpoint: None (random) | asset name | .gguf | HF dir | a previous run's model_dir.
    batch_fn: the batch source (training/data.py): `@blend_batches` or `@synthetic_batches`.
    seed: data order, random init and the RNG carried in the state.
    num_micro_batches: gradient accumulation: the step scans over this many slices of the batch.
    max_loss_positions: answer positions per row given to the LM head (None: all T; see training/loss.py).
    log_every: fetch metrics, write them and check for NaN every this many steps.
    shape_bucket: 0 runs every step at [batch_size, sequence_length]; G > 0 runs each batch at its own shape,
      rounded up to multiples of G: rows cut after their last real token, per-token work on the real tokens only,
      loss positions as many as the rows need (training/bucketing.py; exact; one compile per distinct shape).
    eval_every, eval_batches, eval_batch_size, eval_at_start: held-out ("validation") loss: every `eval_every`
      steps, at the end, and before the first step; over the same first `eval_batches` batches each time.
    ranking_eval: at the same points, P("True") AUC, reranked Recall@k and EM/F1 on a fixed slice of questions
      the run never trains on (training/ranking_eval.py; its settings: Gin `RankingEval.*`, `ranking_questions.*`).
    peak_flops_per_device: for MFU (CPU default measured on this machine's matmul; TPU v5p 459e12 bf16).
    export_hf: write an HF (transformers-loadable) directory at the end, to `hf_export_dir`.
    progress_bar: a tqdm bar on host 0.
    metrics_dir: TensorBoard + metrics.jsonl (default model_dir; set a local one when model_dir is on GCS).
    hf_export_dir: default `<model_dir>/hf` (a local path: the exporter writes with plain file I/O).
    lora: None (full fine-tuning) or `@LoraConfig()` (gin_configs/lora.gin): init_checkpoint is the frozen base,
      only the adapters are trained and checkpointed (training/lora_step.py); the export is then the merged
      model in hf_export_dir and a PEFT adapter directory beside it (`<hf_export_dir>_peft`).
  """
  start_time = time.time()
  model_dir = checkpointing.absolute_path(model_dir)
  metrics_dir = checkpointing.absolute_path(metrics_dir) if metrics_dir else model_dir
  if export_hf and not hf_export_dir and "://" in str(model_dir):
    raise ValueError(f"model_dir {model_dir} is remote: set loop.train.hf_export_dir to a local directory")
  hf_export_dir = pathlib.Path(hf_export_dir or str(model_dir / "hf"))
  hosts = jax.process_count()
  if batch_size % hosts:
    raise ValueError(f"batch_size={batch_size} must be divisible by the number of hosts ({hosts})")
  if shape_bucket < 0:
    raise ValueError(f"loop.train.shape_bucket must be 0 (fixed shapes) or a granularity > 0, got {shape_bucket}")
  mesh, rules = sharding_lib.make_mesh(), sharding_lib.logical_axis_rules()
  checkpointer = checkpointing.Checkpointer(model_dir / checkpointing.CHECKPOINTS_SUBDIR)
  writer = None
  try:
    run = start_or_resume(checkpointer, model_dir, model_config, init_checkpoint, mesh, rules, seed=seed,
                          max_loss_positions=max_loss_positions, num_micro_batches=num_micro_batches, lora=lora)
    first_step = int(jax.device_get(run.state["step"]))
    source = batch_fn(split="train", batch_size=batch_size // hosts, sequence_length=sequence_length,
                      shard_id=jax.process_index(), num_shards=hosts, seed=seed,
                      start_batch=run.data_position[TRAIN_POSITION_KEY])
    writer = metrics_lib.MetricsWriter(metrics_dir, total_steps, first_step, progress_bar=progress_bar)
    summary = TrainSummary(str(model_dir), str(checkpointer.directory), str(metrics_dir / "tensorboard"),
                           str(metrics_dir / "metrics.jsonl"), None, first_step, first_step)
    held_out = HeldOut(batch_fn, run.eval_fn, run.data_shardings, num_batches=eval_batches,
                       batch_size=(eval_batch_size or batch_size) // hosts, sequence_length=sequence_length,
                       seed=seed)
    ranking = None
    if ranking_eval:
      if run.tokenizer is None:
        raise ValueError("loop.train.ranking_eval needs the model's tokenizer: start from a checkpoint that has one "
                         "(a GGUF, an HF directory with tokenizer.json, or a previous run)")
      from rankrag_jax.training import ranking_eval as ranking_lib  # local: retrieval + generation, only if asked
      ranking = ranking_lib.RankingEval()
      if jax.process_index() == 0:
        ranking_lib.write_slice(ranking.questions, metrics_dir / "ranking_eval_questions.jsonl")

    def evaluate(step):
      loss = held_out.evaluate(run.eval_params(), step, writer) if eval_batches else None
      if ranking is not None:
        result = ranking.evaluate(run.model_params(), run.config, run.tokenizer)
        writer.write(step, result)
        writer.message(f"step {step}: {ranking.describe(result)}")
      return loss
    trained = "" if lora is None else (f" (frozen; LoRA r={lora.rank} adapters trained: "
                                       f"{lora_lib.num_adapter_params(run.state['adapters']) / 1e6:.2f}M params)")
    writer.message(f"Training {run.config.num_params / 1e6:.1f}M params{trained} on mesh {dict(mesh.shape)} "
                   f"({jax.device_count()} {jax.devices()[0].platform} devices, {hosts} host(s)): steps "
                   f"{first_step} -> {total_steps}, {batch_size} x {sequence_length} tokens/step. Run dir: "
                   f"{model_dir}")
    if run.resumed and first_step >= total_steps:
      writer.message(f"{model_dir} already holds step {first_step} of {total_steps}: nothing to train (a new "
                     "MODEL_DIR starts a new run).")
    data_shards = step_lib.num_data_shards(mesh, rules)
    if shape_bucket and data_shards % hosts:
      raise ValueError(f"shape_bucket needs the batch split over every host: {data_shards} data shards on the mesh "
                       f"{dict(mesh.shape)}, {hosts} hosts")
    local_shards = data_shards // hosts
    with step_lib.sharding_context(mesh, rules):
      if eval_at_start and first_step == 0 and (eval_batches or ranking):
        summary.initial_eval_loss = evaluate(0)
      pending = metrics_lib.PendingMetrics(batch_size * sequence_length,
                                           run.config.flops_per_token(sequence_length), peak_flops_per_device,
                                           jax.device_count())
      warned_dropped, compiled_shapes = False, set()
      for step in range(first_step + 1, total_steps + 1):  # `step` counts updates done, as checkpoints do.
        local, shape = next(source), ()
        if shape_bucket:
          planned = bucketing.plan_step_shape(local, granularity=shape_bucket, local_shards=local_shards,
                                              num_micro_batches=num_micro_batches,
                                              max_loss_positions=max_loss_positions)
          local, shape = bucketing.trim_batch(local, planned.length), (planned.num_tokens, planned.loss_positions)
        run.state, step_metrics = run.step_fn(run.state, data_lib.global_batch(local, run.data_shardings), *shape)
        pending.add(step, step_metrics)
        compiled = (np.shape(local["decoder_segment_ids"]),) + shape
        if compiled not in compiled_shapes:  # this call compiled: keep it out of tokens/s and MFU.
          compiled_shapes.add(compiled)
          jax.block_until_ready(step_metrics)
          what = "first step" if step == first_step + 1 else f"step {step} (new shape {planned})"
          writer.message(f"{what} (compile + run) took {pending.restart_clock():.1f}s")
        done = step == total_steps
        save_due = step % checkpointer.save_every_steps == 0 or done
        if not (save_due or done or step % log_every == 0):
          continue
        rows = pending.flush()
        for row in rows:
          writer.write(row["step"], {k: v for k, v in row.items() if k != "step"})
        raise_if_non_finite(rows, checkpointer)  # before anything computed from a bad step is saved
        if not warned_dropped and any(row[loss_lib.DROPPED] for row in rows):
          warned_dropped = True
          writer.message(f"warning: some rows have more than max_loss_positions={max_loss_positions} answer "
                         "tokens; the surplus is left out of the loss (see training/loss.py). Raise it.")
        summary.final_train_loss, summary.last_step = rows[-1]["loss"], step
        writer.advance(step, rows[-1])
        if (eval_batches or ranking) and (done or (eval_every and step % eval_every == 0)):
          summary.final_eval_loss = evaluate(step)
        if save_due:
          checkpointer.save(step, run.checkpointed(), {TRAIN_POSITION_KEY: source.position})
        pending.restart_clock()  # evaluation and checkpointing time is not training throughput
      if first_step >= total_steps and not run.resumed:  # a 0-step run (e.g. converting HF weights once)
        checkpointer.save(first_step, run.checkpointed(), {TRAIN_POSITION_KEY: source.position})
      checkpointer.wait()
      if export_hf:
        summary.hf_export_dir = str(export_hf_checkpoint(hf_export_dir, run.config, run.model_params(),
                                                         run.tokenizer))
        if lora is not None:
          summary.peft_export_dir = str(export_peft_adapter(
              hf_export_dir.with_name(hf_export_dir.name + "_peft"), run,
              lora_step.read_reference(checkpointer.directory)["base_checkpoint"]))
  finally:
    checkpointer.wait()
    checkpointer.close()
    if writer is not None:
      writer.close()
  summary.wall_seconds = time.time() - start_time
  return summary


def export_hf_checkpoint(directory: pathlib.Path, config: LlamaConfig, params: dict, tokenizer) -> pathlib.Path:
  """Gathers the (sharded) params to host 0 and writes an HF directory there."""
  from rankrag_jax.convert import hf  # local: safetensors, only at export time
  if jax.process_count() > 1:  # every host takes part in the gather; only host 0 writes.
    host_params = jax.tree.map(np.asarray, multihost_utils.process_allgather(params))
  else:
    host_params = jax.device_get(params)
  if jax.process_index() == 0:
    hf.save_hf_checkpoint(directory, config, host_params, tokenizer)
  multihost_utils.sync_global_devices("hf_export")
  return directory


def export_peft_adapter(directory: pathlib.Path, run: Run, base_checkpoint: str | None) -> pathlib.Path:
  """Writes a LoRA run's adapters as a PEFT directory (host 0), naming `base_checkpoint` as its base model."""
  from rankrag_jax.convert import peft  # local: safetensors, only at export time
  adapters = run.state["adapters"]
  if jax.process_count() > 1:
    adapters = jax.tree.map(np.asarray, multihost_utils.process_allgather(adapters))
  if jax.process_index() == 0:
    peft.save_peft_adapter(directory, run.config, jax.device_get(adapters), run.lora, base_checkpoint)
  multihost_utils.sync_global_devices("peft_export")
  return directory
