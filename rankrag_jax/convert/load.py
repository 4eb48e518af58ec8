"""`load_model`: one entry point from any checkpoint we read to (config, params, tokenizer).

    >>> config, params, tok = load_model("smollm2_135m_instruct")   # the registry asset (a GGUF)
    >>> config, params, tok = load_model("/ckpts/llama3_8b_hf")      # HF dir: config.json + safetensors

Dispatch: a known model asset name; a `.gguf` file; a directory with config.json (HF); any other directory is
taken for one of our training runs (`load_orbax_checkpoint`: its newest step and saved tokenizer).
"""

import dataclasses
import os
import pathlib

import jax
import jax.numpy as jnp

from rankrag_jax import assets
from rankrag_jax import tokenizer as tokenizer_lib
from rankrag_jax.convert import gguf as gguf_convert
from rankrag_jax.convert import hf
from rankrag_jax.convert import peft
from rankrag_jax.convert.hf_config import CheckpointError
from rankrag_jax.model.config import LlamaConfig

PathLike = str | os.PathLike

# Asset names (rankrag_jax.assets) that are model checkpoints, usable in place of a path.
MODEL_ASSETS = ("smollm2_135m_instruct",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_orbax_checkpoint(directory: pathlib.Path,
                          dtype=jnp.float32) -> tuple[LlamaConfig, dict, "tokenizer_lib.Tokenizer | None"]:
  """The newest step of one of our training runs (its model_dir or model_dir/checkpoints): params only, no
  optimizer state, with the tokenizer the run saved."""
  from rankrag_jax.training import checkpointing, initialization  # orbax: only needed for run directories.
  if checkpointing.find_checkpoint_directory(directory) is None:
    raise CheckpointError(f"{directory}: neither an HF checkpoint (no {hf.CONFIG_FILE}) nor a rankrag_jax training "
                          f"run (no checkpoints/{checkpointing.CONFIG_FILE} next to numbered step directories)")
  from rankrag_jax.training import lora_step  # orbax too
  reference = lora_step.read_reference(checkpointing.find_checkpoint_directory(directory))
  if reference is not None:  # a LoRA run: its base, with the adapters of its newest step merged
    config, params = lora_step.load_merged_params(directory, reference, lambda base: load_model(base, dtype)[:2])
  else:
    config, params = checkpointing.load_params_from_checkpoint(directory)
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  return dataclasses.replace(config, param_dtype=dtype), params, initialization.load_run_tokenizer(directory)


def load_model(path_or_name: PathLike, dtype=jnp.float32,
               adapter: PathLike | None = None) -> tuple[LlamaConfig, dict, "tokenizer_lib.Tokenizer | None"]:
  """(config, params, tokenizer or None) from a GGUF file, an HF directory, or a model asset name.

  The tokenizer comes from the GGUF's embedded vocabulary, or the HF directory's tokenizer.json /
  tokenizer.model; None when the directory has neither. Every failure is a CheckpointError (or the
  tokenizer's own error) naming the file.
  LoRA: `adapter` (a PEFT adapter directory) is merged into the loaded base; a PEFT directory given alone loads
  the base its adapter_config.json names; a LoRA training run loads the base its checkpoints/lora.json names.
  """
  if adapter is not None:
    return _with_peft_adapter(load_model(path_or_name, dtype), adapter, dtype)
  if pathlib.Path(path_or_name).is_dir() and (pathlib.Path(path_or_name) / peft.ADAPTER_CONFIG_FILE).is_file():
    _, base = peft.read_adapter_config(path_or_name)
    if not base:
      raise CheckpointError(f"{path_or_name}/{peft.ADAPTER_CONFIG_FILE}: no base_model_name_or_path; pass the base "
                            "checkpoint and this directory as its adapter")
    return _with_peft_adapter(load_model(base, dtype), path_or_name, dtype)
  if str(path_or_name) in MODEL_ASSETS:
    path = assets.asset_file(str(path_or_name))
  else:
    path = pathlib.Path(path_or_name)
  if path.is_file() and path.suffix == ".gguf":
    config, params = gguf_convert.load_gguf(path, dtype)
    return config, params, tokenizer_lib.load_tokenizer(path)
  if path.is_dir() and (path / hf.CONFIG_FILE).is_file():
    config, params = hf.load_hf_checkpoint(path, dtype)
    has_tokenizer = any((path / name).is_file() for name in _TOKENIZER_FILES)
    return config, params, tokenizer_lib.load_tokenizer(path) if has_tokenizer else None
  if path.is_dir():
    return load_orbax_checkpoint(path, dtype)
  if not path.exists():
    raise CheckpointError(f"{path}: no such file or directory, and not a model asset name {list(MODEL_ASSETS)}")
  raise CheckpointError(f"{path}: not a checkpoint we read (a .gguf file, or a directory with "
                        f"{hf.CONFIG_FILE} and {hf.SAFETENSORS_FILE} or {hf.SAFETENSORS_INDEX_FILE})")


def _with_peft_adapter(loaded, adapter: PathLike, dtype):
  """The loaded base with a PEFT adapter directory's LoRA update merged into its kernels (in `dtype`)."""
  config, params, tokenizer = loaded
  lora, adapters, _ = peft.load_peft_adapter(adapter, config)
  from rankrag_jax.training import lora as lora_lib  # pylint: disable=g-import-not-at-top
  merged = lora_lib.merge_adapters(jax.device_get(params), adapters, lora)
  return config, jax.tree.map(lambda x: jnp.asarray(x, dtype), merged), tokenizer
