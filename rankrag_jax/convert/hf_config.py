"""HF config.json <-> LlamaConfig, and the error every checkpoint reader raises.

Both spellings transformers has used are read (rope_theta + rope_scaling, and 5.x's rope_parameters); what we
write loads in transformers 4.x and 5.x. Anything a Llama checkpoint may say that our model does not implement
(another architecture, biases, a rope type other than llama3) is refused with the file and field named.
"""

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np

from rankrag_jax.model.config import LlamaConfig, RopeScaling

PathLike = str | os.PathLike
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or written; the message names the file and the tensor or field."""


def np_dtype(dtype) -> np.dtype:
  """numpy dtype for a jnp/np dtype or name; bfloat16 via ml_dtypes (which safetensors' numpy API uses)."""
  if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype)


def _rope_scaling_from_hf(rope: Mapping[str, Any] | None, source: str, field: str) -> RopeScaling | None:
  if not rope:
    return None
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    return None
  if rope_type != "llama3":
    raise CheckpointError(f"{source}: {field}.rope_type={rope_type!r} is not supported "
                          "(only llama3 scaling or none)")
  try:
    return RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                       high_freq_factor=float(rope["high_freq_factor"]),
                       original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
  except KeyError as e:
    raise CheckpointError(f"{source}: {field} (llama3) lacks {e.args[0]!r}") from None


def config_from_hf(config_json: Mapping[str, Any], source: str = CONFIG_FILE) -> LlamaConfig:
  """LlamaConfig from an HF Llama config.json dict; `source` names the file in errors.

  Missing optional fields take HF LlamaConfig's defaults. Both rope spellings are read: `rope_theta` +
  `rope_scaling` (transformers 4, published Llama configs) and `rope_parameters` (transformers 5).
  """
  cfg = dict(config_json)
  architectures = cfg.get("architectures") or ["LlamaForCausalLM"]
  if cfg.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in architectures:
    raise CheckpointError(f"{source}: model_type={cfg.get('model_type')!r}, architectures={architectures} is "
                          "not supported (only model_type 'llama' / LlamaForCausalLM)")
  for field, allowed in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
    if cfg.get(field, allowed) != allowed:
      raise CheckpointError(f"{source}: {field}={cfg[field]!r} is not supported (only {allowed!r})")

  def required(field):
    if field not in cfg:
      raise CheckpointError(f"{source}: required field {field!r} is missing")
    return int(cfg[field])

  hidden, heads = required("hidden_size"), required("num_attention_heads")
  rope_field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
  rope = cfg.get(rope_field) or {}
  eos = cfg.get("eos_token_id")
  try:
    return LlamaConfig(
        vocab_size=required("vocab_size"), hidden_size=hidden, intermediate_size=required("intermediate_size"),
        num_layers=required("num_hidden_layers"), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling_from_hf(rope, source, rope_field),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos)
  except ValueError as e:  # LlamaConfig's own consistency checks (e.g. heads vs kv heads).
    raise CheckpointError(f"{source}: {e}") from None


def _dtype_name(dtype) -> str:
  return "bfloat16" if np_dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else np_dtype(dtype).name


def config_to_hf(config: LlamaConfig, dtype=None) -> dict[str, Any]:
  """The config.json dict transformers (4.x and 5.x) reads as this LlamaForCausalLM."""
  rope_scaling = None
  if config.rope_scaling is not None:
    rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
  eos = config.eos_token_id
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": rope_scaling,
      "tie_word_embeddings": config.tie_word_embeddings,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
      "torch_dtype": _dtype_name(dtype or config.param_dtype),
      "use_cache": True,
  }


def generation_config_dict(config: LlamaConfig, stop_ids: Sequence[int] = ()) -> dict[str, Any]:
  """generation_config.json: bos/eos (plus the tokenizer's end-of-turn ids) and greedy decoding."""
  eos = config.eos_token_id
  eos_ids = list(eos) if isinstance(eos, tuple) else ([] if eos is None else [eos])
  eos_ids += [i for i in stop_ids if i not in eos_ids]
  gen = {"do_sample": False}
  if config.bos_token_id is not None:
    gen["bos_token_id"] = config.bos_token_id
  if eos_ids:
    gen["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
  return gen


def read_hf_config(directory: PathLike) -> LlamaConfig:
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f"{path}: no such file (an HF checkpoint directory needs {CONFIG_FILE})")
  try:
    config_json = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not readable as JSON: {e}") from None
  return config_from_hf(config_json, source=str(path))
