"""Orbax checkpoints of the whole training state plus the data position, and loading params from them.

A checkpoint directory `<model_dir>/checkpoints/<step>/` holds two items:
  state/  the train-state pytree (params, optimizer state, step, RNG key data), each array saved by its shards;
  data/   JSON: where the training data stream stands (`{"train_batches": n}`), so a resumed run reads exactly the
          batches an uninterrupted run would have read next.
Orbax writes a step into a temporary directory and renames it when every host has finished, so an interrupted
save (kill -9, pre-emption) never shows up as the latest step; leftovers are deleted on the next start.
`<model_dir>/checkpoints/config.json` records the model config, so a later stage can load params by path alone.
"""

import dataclasses
import json
import os

from absl import logging
from etils import epath
import gin
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from rankrag_jax.model import config as config_lib
from rankrag_jax.model import llama
from rankrag_jax.model.config import LlamaConfig

STATE, DATA = "state", "data"
CHECKPOINTS_SUBDIR = "checkpoints"
CONFIG_FILE = "config.json"


def absolute_path(path) -> epath.Path:
  """Orbax wants absolute paths: local ones are made absolute, remote ones (gs://...) kept."""
  return epath.Path(path) if "://" in str(path) else epath.Path(os.path.abspath(path))


def config_to_json(config: LlamaConfig) -> dict:
  fields = dataclasses.asdict(config)
  fields["dtype"] = jnp.dtype(config.dtype).name
  fields["param_dtype"] = jnp.dtype(config.param_dtype).name
  if isinstance(fields.get("eos_token_id"), list):
    fields["eos_token_id"] = list(fields["eos_token_id"])
  return fields


def config_from_json(fields: dict) -> LlamaConfig:
  fields = dict(fields)
  fields["dtype"] = jnp.dtype(fields["dtype"])
  fields["param_dtype"] = jnp.dtype(fields["param_dtype"])
  if fields.get("rope_scaling") is not None:
    fields["rope_scaling"] = config_lib.RopeScaling(**fields["rope_scaling"])
  if isinstance(fields.get("eos_token_id"), list):
    fields["eos_token_id"] = tuple(fields["eos_token_id"])
  return LlamaConfig(**fields)


@gin.configurable
class Checkpointer:
  """Periodic, keep-last-K, asynchronous checkpoints of (train state, data position) for one run.

  Args:
    directory: where steps are written (usually `<model_dir>/checkpoints`; a GCS path works on pods).
    save_every_steps: the loop's save period (it also saves the last step).
    keep: how many of the newest steps to keep.
    async_save: write in a background thread once the arrays are copied to host memory.
  """

  def __init__(self, directory, save_every_steps: int = 100, keep: int = 3, async_save: bool = True):
    self.directory = absolute_path(directory)
    self.save_every_steps = save_every_steps
    options = ocp.CheckpointManagerOptions(
        # The loop decides when to save (only after checking the losses), so every save is forced.
        save_interval_steps=1, max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: dict, data_position: dict) -> None:
    """Starts saving `state` at `step`; returns once the arrays are copied to host memory."""
    self._manager.save(step, args=ocp.args.Composite(
        **{STATE: ocp.args.PyTreeSave(state), DATA: ocp.args.JsonSave(data_position)}), force=True)
    logging.info("checkpoint: saving step %d to %s", step, self.directory)

  def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, dict]:
    """(state placed with the shardings of `abstract_state`'s ShapeDtypeStructs, data position)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args), DATA: ocp.args.JsonRestore()}))
    # Orbax hands NamedTuples (optax states) back as tuples; put the leaves back into the target's structure.
    state = jax.tree.unflatten(jax.tree.structure(abstract_state), jax.tree.leaves(restored[STATE]))
    return state, dict(restored[DATA])

  def write_config(self, config: LlamaConfig) -> None:
    if jax.process_index() == 0:
      self.directory.mkdir(parents=True, exist_ok=True)
      (self.directory / CONFIG_FILE).write_text(json.dumps(config_to_json(config), indent=1))

  def wait(self) -> None:
    """Blocks until an in-flight asynchronous save has been committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def find_checkpoint_directory(path) -> epath.Path | None:
  """The checkpoints directory for `path` (a model_dir or its `checkpoints/`), or None if it is not one of ours."""
  path = absolute_path(path)
  for candidate in (path, path / CHECKPOINTS_SUBDIR):
    if (candidate / CONFIG_FILE).is_file() and any(p.name.isdigit() for p in candidate.iterdir()):
      return candidate
  return None


def read_checkpoint_config(path) -> LlamaConfig:
  directory = find_checkpoint_directory(path)
  if directory is None:
    raise FileNotFoundError(f"{path}: not a rankrag_jax training checkpoint (no {CHECKPOINTS_SUBDIR}/{CONFIG_FILE} "
                            "next to numbered step directories)")
  return config_from_json(json.loads((directory / CONFIG_FILE).read_text()))


def load_params_from_checkpoint(path, abstract_params: dict | None = None,
                                step: int | None = None) -> tuple[LlamaConfig, dict]:
  """(config, params) from one of our training checkpoints (a previous stage's model_dir), without reading the
  optimizer state. `abstract_params`: ShapeDtypeStructs with shardings to place them (default: host-local)."""
  directory = find_checkpoint_directory(path)
  config = read_checkpoint_config(path)
  manager = ocp.CheckpointManager(directory, item_names=(STATE, DATA),
                                  options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step() if step is None else step
  if abstract_params is None:
    abstract_params = jax.eval_shape(lambda: llama.init_params(config, jax.random.key(0)))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                                   abstract_params)
  target = {"params": abstract_params}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  restored = manager.restore(step, args=ocp.args.Composite(
      **{STATE: ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)}))
  manager.close()
  logging.info("loaded params of step %d from %s", step, directory)
  return config, restored[STATE]["params"]
