"""The LoRA train state, its step, and what its checkpoints hold (the adapters and a reference to the base).

State (a plain dict, like the full fine-tuning state of `step.py`):
    {"step": int32[], "params": the base (frozen, in its own dtype), "adapters": {.../lora_a, lora_b} (f32),
     "opt_state": optax state over the adapters only, "rng": uint32[2]}
The step is `step.train_step` run on a view of this state whose "params" are the adapters and whose model is the
base with the adapters added inside each layer (`lora.AdaptedModel`): the gradient, the clipping norm, the
optimizer state and the update are the adapters' alone; the base passes through the (donated) step untouched.

Checkpoints hold the state without "params", and `<checkpoints>/lora.json` the base's reference:
    {"base_checkpoint": what init_checkpoint named (None: random init from "seed"), "seed": ...,
     "lora": {rank, alpha, dropout, targets}, "base_fingerprint": [per-leaf f32 sums]}
A resumed run reloads the base from that reference and refuses one whose fingerprint differs (another base
would make the resumed run silently different); with the same base, resume is exact.
"""

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rankrag_jax.training import lora as lora_lib
from rankrag_jax.training import step as step_lib

LORA_FILE = "lora.json"
BASE_KEY = "params"


def abstract_train_state(config, lora: lora_lib.LoraConfig, optimizer: optax.GradientTransformation):
  """(state of ShapeDtypeStructs, state of logical PartitionSpecs): the adapters' moments keep their names."""
  base, adapters = lora_lib.split_adapters(lora_lib.boxed_abstract_params(config, lora))
  boxed_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), BASE_KEY: base, "adapters": adapters,
                 "opt_state": jax.eval_shape(optimizer.init, adapters), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  return nn.unbox(boxed_state), nn.get_partition_spec(boxed_state)


def new_train_state(base: dict, adapters: dict, optimizer: optax.GradientTransformation, seed: int) -> dict:
  return {"step": jnp.zeros((), jnp.int32), BASE_KEY: base, "adapters": adapters,
          "opt_state": optimizer.init(adapters),
          "rng": jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)}


def train_step(state: dict, batch: dict, *, model, lora: lora_lib.LoraConfig, **step_kwargs) -> tuple[dict, dict]:
  """One update of the adapters (`step.train_step`'s arguments otherwise). Pure function."""
  # train_step carries on with split(rng)[0]; the other half is this step's dropout key, never reused.
  dropout_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))[1]
  keys = lora_lib.dropout_keys(dropout_key, lora, model.config.num_layers)
  view = {"step": state["step"], "params": state["adapters"], "opt_state": state["opt_state"], "rng": state["rng"]}
  adapted = lora_lib.AdaptedModel(model, lora, state[BASE_KEY], keys)
  new_view, metrics = step_lib.train_step(view, batch, model=adapted, **step_kwargs)
  return {"step": new_view["step"], BASE_KEY: state[BASE_KEY], "adapters": new_view["params"],
          "opt_state": new_view["opt_state"], "rng": new_view["rng"]}, metrics


def checkpointed(state: dict) -> dict:
  """What a LoRA checkpoint saves: everything but the base (restored from its reference)."""
  return {k: v for k, v in state.items() if k != BASE_KEY}


def eval_params(state: dict) -> dict:
  """The base and adapters in one tree: what `step.jit_eval_step(..., lora=)` takes."""
  return lora_lib.combine(state[BASE_KEY], state["adapters"])


def merged_params(state: dict, lora: lora_lib.LoraConfig) -> dict:
  """Plain Llama params with the adapters merged (a full-size copy: ranking evaluation and HF export only)."""
  return _merge_fn(lora)(state[BASE_KEY], state["adapters"])


@functools.cache
def _merge_fn(lora: lora_lib.LoraConfig):
  """One jitted merge per LoraConfig (compiled once per run, not at every evaluation)."""
  return jax.jit(lambda base, adapters: lora_lib.merge_adapters(base, adapters, lora, xp=jnp))


def base_fingerprint(base: dict) -> list[float]:
  """Per-leaf f32 sums of the base weights, in tree order: cheap on any mesh, and another base differs."""
  sums = jax.jit(lambda tree: [jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(tree)])(base)
  return [float(s) for s in jax.device_get(sums)]


def write_reference(checkpoint_dir, base_checkpoint: str | None, seed: int, lora: lora_lib.LoraConfig,
                    fingerprint: list[float]) -> None:
  if jax.process_index() == 0:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (checkpoint_dir / LORA_FILE).write_text(json.dumps(
        {"base_checkpoint": base_checkpoint, "seed": seed, "lora": dataclasses.asdict(lora),
         "base_fingerprint": fingerprint}, indent=1))


def read_reference(checkpoint_dir) -> dict | None:
  """lora.json of a LoRA run's checkpoints directory (None for a full fine-tuning run); errors name the file."""
  path = checkpoint_dir / LORA_FILE
  if not path.exists():
    return None
  try:
    reference = json.loads(path.read_text())
    missing = [k for k in ("base_checkpoint", "seed", "lora", "base_fingerprint") if k not in reference]
    if missing:
      raise KeyError(f"missing fields {missing}")
    reference["lora"] = lora_lib.LoraConfig(**reference["lora"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a valid LoRA base reference ({type(e).__name__}: {e})") from e
  return reference


def base_reference(init_checkpoint) -> str | None:
  """How lora.json (and the PEFT export) name the base: local paths made absolute, so the adapters find their base
  from any working directory; asset names and remote paths as given."""
  if init_checkpoint is None:
    return None
  name = str(init_checkpoint)
  return os.path.abspath(name) if "://" not in name and os.path.exists(name) else name


def check_same_base(reference: dict, fingerprint: list[float], path) -> None:
  expected = np.asarray(reference["base_fingerprint"])
  if expected.shape != np.shape(fingerprint) or not np.allclose(expected, fingerprint, rtol=1e-5, atol=1e-3):
    raise ValueError(f"{path / LORA_FILE}: the base weights loaded from {reference['base_checkpoint']!r} are not "
                     "the ones this run's adapters were trained on (fingerprint differs); restore that base or "
                     "start a new MODEL_DIR")


def start_or_resume(checkpointer, model_dir, model_config, init_checkpoint: str | None, lora: lora_lib.LoraConfig,
                    mesh, rules, *, seed: int, max_loss_positions: int | None, num_micro_batches: int) -> dict:
  """`loop.start_or_resume` for a LoRA run: the fields of a `loop.Run`.

  A new run loads the base from `init_checkpoint` (None: random, from `seed`) and creates fresh adapters; a resumed
  one reloads the base its lora.json names (the Gin init_checkpoint must then agree) and restores the rest.
  """
  from rankrag_jax.training import initialization, optimizer as optimizer_lib  # local: they import step too
  resume_step = checkpointer.latest_step()
  reference = read_reference(checkpointer.directory)
  if resume_step is not None:
    if reference is None:
      raise ValueError(f"{checkpointer.directory} holds a full fine-tuning run (no {LORA_FILE}): resume it without "
                       "loop.train.lora, or start the LoRA run in a new MODEL_DIR")
    if reference["lora"] != lora:
      raise ValueError(f"{checkpointer.directory / LORA_FILE}: the run was started with {reference['lora']}, the Gin "
                       f"config asks for {lora}; resume with the same LoraConfig or use a new MODEL_DIR")
    if init_checkpoint is not None and base_reference(init_checkpoint) != reference["base_checkpoint"]:
      raise ValueError(f"{checkpointer.directory / LORA_FILE}: the adapters were trained on base "
                       f"{reference['base_checkpoint']!r}, but loop.train.init_checkpoint is {init_checkpoint!r}")
    base_checkpoint, seed_for_base = reference["base_checkpoint"], reference["seed"]
  else:
    base_checkpoint, seed_for_base = base_reference(init_checkpoint), seed
  config, place_base, tokenizer = initialization.initial_params(base_checkpoint, model_config)
  schedule = optimizer_lib.learning_rate_schedule()
  optimizer = optimizer_lib.make_optimizer(schedule)
  step_fn, shardings, data_shardings, abstract = step_lib.jit_train_step(
      config, optimizer, schedule, mesh, rules, max_loss_positions=max_loss_positions,
      num_micro_batches=num_micro_batches, lora=lora)
  eval_fn = step_lib.jit_eval_step(config, mesh, rules, eval_params(shardings),
                                   max_loss_positions=max_loss_positions, lora=lora)
  with step_lib.sharding_context(mesh, rules):
    base = place_base(abstract[BASE_KEY], seed_for_base)
    del place_base  # drops the host copy of HF/GGUF weights
    fingerprint = base_fingerprint(base)
    if resume_step is not None:
      check_same_base(reference, fingerprint, checkpointer.directory)
      saved, data_position = checkpointer.restore(checkpointed(abstract), resume_step)
      state = {**saved, BASE_KEY: base}
      tokenizer = initialization.load_run_tokenizer(model_dir) or tokenizer
    else:
      adapters = lora_lib.init_adapters(abstract["adapters"], seed, shardings["adapters"])
      new_state = jax.jit(lambda b, a: new_train_state(b, a, optimizer, seed),
                          in_shardings=(shardings[BASE_KEY], shardings["adapters"]), out_shardings=shardings,
                          donate_argnums=(0, 1))  # the state holds the base itself, not a copy
      state, data_position = new_state(base, adapters), None
      checkpointer.write_config(config)
      write_reference(checkpointer.directory, base_checkpoint, seed, lora, fingerprint)
      initialization.save_run_tokenizer(tokenizer, model_dir)
  return {"config": config, "tokenizer": tokenizer, "state": state, "data_position": data_position,
          "step_fn": step_fn, "eval_fn": eval_fn, "data_shardings": data_shardings,
          "resumed": resume_step is not None}


def load_merged_params(run_dir, reference: dict, load_base) -> tuple:
  """(config, params with the adapters of the run's newest step merged) for serving a LoRA run directly.

  load_base(name) -> (config, params): the base that lora.json names (None: rebuilt from its random seed)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from rankrag_jax.model import llama  # pylint: disable=g-import-not-at-top
  from rankrag_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  directory = checkpointing.find_checkpoint_directory(run_dir)
  lora = reference["lora"]
  if reference["base_checkpoint"] is None:
    config = checkpointing.read_checkpoint_config(run_dir)
    base = llama.init_params(config, jax.random.key(reference["seed"]))
  else:
    config, base = load_base(reference["base_checkpoint"])
  check_same_base(reference, base_fingerprint(base), directory)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        lora_lib.split_adapters(nn.unbox(lora_lib.boxed_abstract_params(config, lora)))[1])
  manager = ocp.CheckpointManager(directory, item_names=(checkpointing.STATE, checkpointing.DATA),
                                  options=ocp.CheckpointManagerOptions(create=False))
  target = {"adapters": shapes}
  restore = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                   partial_restore=True)  # the adapters only: not the optimizer state
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(**{checkpointing.STATE: restore}))
  manager.close()
  adapters = jax.device_get(restored[checkpointing.STATE]["adapters"])
  return config, lora_lib.merge_adapters(jax.device_get(base), adapters, lora)
