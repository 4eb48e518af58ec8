"""Where a run's first parameters come from: HF safetensors, a GGUF, a model asset, a previous stage, or random.

`init_checkpoint` (Gin) is one of:
  None                      random init (tests, from-scratch runs);
  "smollm2_135m_instruct"   a model asset name (rankrag_jax.assets), loaded by convert.load_model;
  /path/model.gguf          a GGUF (dequantised);
  /path/hf_dir              an HF directory (config.json + safetensors);
  /path/stage1_model_dir    one of our training runs (its `checkpoints/`, the latest step; params only; a LoRA
                            run: its base with the adapters merged).
The architecture comes from the checkpoint; numerics (dtype, param_dtype, scan_layers, remat_policy) from the
Gin model config, which must agree with the checkpoint on every shape.
"""

from collections.abc import Callable
import dataclasses
import pathlib
import tempfile

from absl import logging
from etils import epath
import jax

from rankrag_jax import tokenizer as tokenizer_lib
from rankrag_jax.model import llama
from rankrag_jax.model.config import LlamaConfig
from rankrag_jax.training import checkpointing
from rankrag_jax.training import lora_step

SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "tie_word_embeddings")
NUMERICS_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl", "attention_query_block",
                   "flatten_matmul_tokens")
TOKENIZER_SUBDIR = "tokenizer"


class InitCheckpointError(ValueError):
  pass


def merge_configs(gin_config: LlamaConfig, checkpoint_config: LlamaConfig, source: str) -> LlamaConfig:
  """The checkpoint's architecture with the Gin config's numerics; shapes must agree."""
  mismatched = {f: (getattr(gin_config, f), getattr(checkpoint_config, f)) for f in SHAPE_FIELDS
                if getattr(gin_config, f) != getattr(checkpoint_config, f)}
  if mismatched:
    raise InitCheckpointError(
        f"init_checkpoint {source} does not match the Gin model config: "
        + ", ".join(f"{f}: gin {g} vs checkpoint {c}" for f, (g, c) in mismatched.items())
        + ". Pick the model gin that matches the checkpoint.")
  merged = dataclasses.replace(checkpoint_config, **{f: getattr(gin_config, f) for f in NUMERICS_FIELDS})
  others = [f.name for f in dataclasses.fields(LlamaConfig)
            if f.name not in SHAPE_FIELDS + NUMERICS_FIELDS
            and getattr(gin_config, f.name) != getattr(checkpoint_config, f.name)]
  if others:
    logging.info("init_checkpoint %s: using the checkpoint's %s over the Gin preset's", source, others)
  return merged


def initial_params(init_checkpoint: str | None, gin_config: LlamaConfig) -> tuple[LlamaConfig, Callable, object]:
  """(config, place(abstract_params, seed) -> params in their shards, tokenizer or None).

  Our own checkpoints are read straight into the shards given by `abstract_params` (each host reads only its
  part); HF/GGUF weights are read whole on every host, then placed; random params are created in place.
  """
  if init_checkpoint is None:
    return gin_config, lambda abstract, seed: random_params(gin_config, seed, _shardings(abstract)), None
  source = str(init_checkpoint)
  run_checkpoints = checkpointing.find_checkpoint_directory(source)
  # A LoRA run's checkpoints hold adapters, not params: load_model below merges them into the base it names.
  if run_checkpoints is not None and not (run_checkpoints / lora_step.LORA_FILE).exists():
    config = merge_configs(gin_config, checkpointing.read_checkpoint_config(source), source)
    place = lambda abstract, seed: checkpointing.load_params_from_checkpoint(source, abstract)[1]  # noqa: E731
    return config, place, load_run_tokenizer(source)
  from rankrag_jax.convert import load as convert_load  # local: reads safetensors/gguf only when asked
  checkpoint_config, params, tokenizer = convert_load.load_model(source, dtype=gin_config.param_dtype)
  config = merge_configs(gin_config, checkpoint_config, source)
  return config, lambda abstract, seed: jax.device_put(params, _shardings(abstract)), tokenizer


def _shardings(abstract):
  return jax.tree.map(lambda a: a.sharding, abstract)


def random_params(config: LlamaConfig, seed: int, param_shardings) -> dict:
  """Random init, created directly in its shards (no host copy of the whole model)."""
  init = jax.jit(lambda key: llama.init_params(config, key), out_shardings=param_shardings)
  return init(jax.random.key(seed))


def save_run_tokenizer(tokenizer, model_dir) -> None:
  """Keeps the run's tokenizer next to its checkpoints, so a later stage can start from the run alone."""
  if tokenizer is None or jax.process_index() != 0:
    return
  if "://" in str(model_dir):  # the tokenizer writes with plain file I/O: stage it locally, then copy.
    with tempfile.TemporaryDirectory() as local:
      tokenizer.save(local)
      for file in pathlib.Path(local).iterdir():
        (epath.Path(model_dir) / TOKENIZER_SUBDIR / file.name).write_bytes(file.read_bytes())
  else:
    tokenizer.save(pathlib.Path(model_dir) / TOKENIZER_SUBDIR)


def load_run_tokenizer(model_dir):
  """The tokenizer a run saved (`save_run_tokenizer`), or None."""
  directory = epath.Path(model_dir) / TOKENIZER_SUBDIR
  if not directory.is_dir():
    directory = epath.Path(model_dir).parent / TOKENIZER_SUBDIR  # given `<model_dir>/checkpoints`
  if not directory.is_dir():
    return None
  if "://" not in str(directory):
    return tokenizer_lib.load_tokenizer(pathlib.Path(directory))
  with tempfile.TemporaryDirectory() as local:
    for file in directory.iterdir():
      (pathlib.Path(local) / file.name).write_bytes(file.read_bytes())
    return tokenizer_lib.load_tokenizer(pathlib.Path(local))
