"""`load_model`: one entry point from any checkpoint we read to (config, params, tokenizer).

    >>> config, params, tok = load_model("smollm2_135m_instruct")   # the registry asset (a GGUF)
    >>> config, params, tok = load_model("/ckpts/llama3_8b_hf")      # HF dir: config.json + safetensors

Dispatch: a known model asset name; a `.gguf` file; a directory with config.json (HF); any other directory is
taken for one of our training checkpoints (`load_orbax_checkpoint`).
"""

import os
import pathlib

import jax.numpy as jnp

from rankrag_jax import assets
from rankrag_jax import tokenizer as tokenizer_lib
from rankrag_jax.convert import gguf as gguf_convert
from rankrag_jax.convert import hf
from rankrag_jax.convert.hf import CheckpointError
from rankrag_jax.model.config import LlamaConfig

PathLike = str | os.PathLike

# Asset names (rankrag_jax.assets) that are model checkpoints, usable in place of a path.
MODEL_ASSETS = ("smollm2_135m_instruct",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_orbax_checkpoint(directory: pathlib.Path, dtype=jnp.float32) -> tuple[LlamaConfig, dict, None]:
  """Our own (orbax) training checkpoints: the training module provides the reader; none is wired in here."""
  raise CheckpointError(f"{directory}: not an HF/GGUF checkpoint (no {hf.CONFIG_FILE}); loading our orbax "
                        "training checkpoints is not supported by load_model")


def load_model(path_or_name: PathLike, dtype=jnp.float32) -> tuple[LlamaConfig, dict, "tokenizer_lib.Tokenizer | None"]:
  """(config, params, tokenizer or None) from a GGUF file, an HF directory, or a model asset name.

  The tokenizer comes from the GGUF's embedded vocabulary, or the HF directory's tokenizer.json /
  tokenizer.model; None when the directory has neither. Every failure is a CheckpointError (or the
  tokenizer's own error) naming the file.
  """
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
