"""GGUF (llama architecture) -> our params, dequantised with the `gguf` package.

llama.cpp's tensors are renamed to HF's and put back into HF's layout, then handed to `hf.ParamAssembler`,
so the HF name-mapping table stays the single description of our layout. Two llama.cpp conventions are undone:
  * shapes: GGUF lists dimensions fastest-first (ggml `ne`); numpy's (and HF's) order is the reverse;
  * Q/K rows: convert_hf_to_gguf.py permutes each head's q_proj/k_proj rows from HF's rotate-half pairing
    (i, i + d/2) to llama.cpp's interleaved pairing (2i, 2i + 1); our RoPE is rotate-half, so we invert it.
Llama-3.1 RoPE scaling reaches GGUF as a `rope_freqs` tensor of per-frequency divisors, which we match back to
the llama3 parameters.
"""

import dataclasses
import os
import pathlib
import re

import gguf
import jax.numpy as jnp
import numpy as np

from rankrag_jax.convert.hf import ParamAssembler
from rankrag_jax.convert.hf_config import CheckpointError
from rankrag_jax.model import llama
from rankrag_jax.model.config import LlamaConfig, RopeScaling

PathLike = str | os.PathLike

# GGUF tensor name -> HF tensor name; "{layer}" is the block index.
GGUF_TO_HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.{layer}.attn_norm.weight": "model.layers.{layer}.input_layernorm.weight",
    "blk.{layer}.attn_q.weight": "model.layers.{layer}.self_attn.q_proj.weight",
    "blk.{layer}.attn_k.weight": "model.layers.{layer}.self_attn.k_proj.weight",
    "blk.{layer}.attn_v.weight": "model.layers.{layer}.self_attn.v_proj.weight",
    "blk.{layer}.attn_output.weight": "model.layers.{layer}.self_attn.o_proj.weight",
    "blk.{layer}.ffn_norm.weight": "model.layers.{layer}.post_attention_layernorm.weight",
    "blk.{layer}.ffn_gate.weight": "model.layers.{layer}.mlp.gate_proj.weight",
    "blk.{layer}.ffn_up.weight": "model.layers.{layer}.mlp.up_proj.weight",
    "blk.{layer}.ffn_down.weight": "model.layers.{layer}.mlp.down_proj.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_FREQS_TENSOR = "rope_freqs.weight"

# Our LlamaConfig field -> the GGUF metadata key it comes from (for error messages).
GGUF_FIELD_NAMES = {
    "vocab_size": "tokenizer.ggml.tokens (count)", "hidden_size": "llama.embedding_length",
    "intermediate_size": "llama.feed_forward_length", "num_layers": "llama.block_count",
    "num_heads": "llama.attention.head_count", "num_kv_heads": "llama.attention.head_count_kv",
    "head_dim": "llama.attention.key_length",
}


def hf_name_for(gguf_name: str) -> str | None:
  """The HF name of a llama.cpp tensor name, or None for names outside the llama layout."""
  match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
  if match:
    hf = GGUF_TO_HF_NAMES.get("blk.{layer}." + match.group(2))
    return hf.format(layer=int(match.group(1))) if hf else None
  return GGUF_TO_HF_NAMES.get(gguf_name)


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of convert_hf_to_gguf.py's `permute`: per head, rows (2i, 2i+1) go back to (i, i + d/2).

  llama.cpp viewed each head's rows as [2, d/2] and swapped to [d/2, 2]; viewing them as [d/2, 2] and
  swapping back restores HF's order. `weight` is [heads * d, in] (HF layout).
  """
  rows = weight.shape[0]
  return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


class _Metadata:
  """Typed access to a GGUFReader's key/value fields, with errors naming the file and the key."""

  def __init__(self, reader: gguf.GGUFReader, path: pathlib.Path):
    self._fields, self._path = reader.fields, path

  def has(self, key: str) -> bool:
    return key in self._fields

  def get(self, key: str, default=None):
    return self._fields[key].contents() if key in self._fields else default

  def require(self, key: str):
    if key not in self._fields:
      raise CheckpointError(f"{self._path}: metadata field {key!r} is missing")
    return self._fields[key].contents()

  def count(self, key: str) -> int | None:
    """Number of elements of an array field (e.g. the token list) without decoding them."""
    return len(self._fields[key].data) if key in self._fields else None


def _llama3_scaling_from_rope_freqs(divisors: np.ndarray, base: LlamaConfig, path) -> RopeScaling:
  """Recovers llama3 `rope_scaling` from llama.cpp's per-frequency divisors (inv_freq / divisor).

  llama.cpp stores only the divisors; factor is their maximum, and every Llama-3.x release uses
  low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192, which we check reproduce them.
  """
  scaling = RopeScaling(factor=float(divisors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192)
  unscaled = np.asarray(llama.rope_inverse_frequencies(base))
  scaled = np.asarray(llama.rope_inverse_frequencies(dataclasses.replace(base, rope_scaling=scaling)))
  if divisors.shape != unscaled.shape or not np.allclose(unscaled / divisors, scaled, rtol=1e-5):
    raise CheckpointError(f"{path}: tensor {ROPE_FREQS_TENSOR!r} is not llama3 RoPE scaling with "
                          "low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192")
  return scaling


def _shortest_float(value) -> float:
  """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.999999747378752e-06)."""
  return float(str(np.float32(value)))


def _dequantize(tensor, path) -> np.ndarray:
  """f32 array in numpy (= HF) dimension order; GGUF's `shape` is ggml's reversed (fastest-first) order."""
  try:
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError:
    raise CheckpointError(f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the gguf "
                          "package cannot dequantise") from None
  return np.asarray(data, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def config_from_gguf(reader: gguf.GGUFReader, path: PathLike) -> LlamaConfig:
  """LlamaConfig from a llama-architecture GGUF's metadata (rope scaling from `rope_freqs` if present)."""
  path = pathlib.Path(path)
  meta = _Metadata(reader, path)
  arch = meta.require("general.architecture")
  if arch != "llama":
    raise CheckpointError(f"{path}: general.architecture={arch!r} is not supported (only 'llama')")
  if int(meta.get("split.count", 1)) > 1:
    raise CheckpointError(f"{path}: split.count={meta.get('split.count')}: split GGUFs are not supported; "
                          "merge them first (llama-gguf-split --merge)")
  scaling_type = meta.get("llama.rope.scaling.type", "none")
  if scaling_type != "none":
    raise CheckpointError(f"{path}: llama.rope.scaling.type={scaling_type!r} is not supported")
  tensors = {t.name: t for t in reader.tensors}
  hidden, heads = int(meta.require("llama.embedding_length")), int(meta.require("llama.attention.head_count"))
  head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
  rotary_dim = int(meta.get("llama.rope.dimension_count", head_dim))
  if rotary_dim != head_dim:
    raise CheckpointError(f"{path}: llama.rope.dimension_count={rotary_dim} != head_dim={head_dim} "
                          "(partial rotary embeddings are not supported)")
  vocab = meta.count("tokenizer.ggml.tokens") or meta.get("llama.vocab_size")
  if vocab is None and "token_embd.weight" in tensors:
    vocab = int(tensors["token_embd.weight"].shape[-1])
  if vocab is None:
    raise CheckpointError(f"{path}: no vocabulary size (tokenizer.ggml.tokens, llama.vocab_size)")
  eos = meta.get("tokenizer.ggml.eos_token_id")
  config = LlamaConfig(
      vocab_size=int(vocab), hidden_size=hidden,
      intermediate_size=int(meta.require("llama.feed_forward_length")),
      num_layers=int(meta.require("llama.block_count")), num_heads=heads,
      num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)), head_dim=head_dim,
      rope_theta=_shortest_float(meta.get("llama.rope.freq_base", 10000.0)),
      rms_norm_eps=_shortest_float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
      tie_word_embeddings="output.weight" not in tensors,  # llama.cpp omits the head when it is tied.
      max_position_embeddings=int(meta.get("llama.context_length", 2048)),
      bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=None if eos is None else int(eos))
  if ROPE_FREQS_TENSOR in tensors:
    divisors = _dequantize(tensors[ROPE_FREQS_TENSOR], path).reshape(-1)
    config = dataclasses.replace(config, rope_scaling=_llama3_scaling_from_rope_freqs(divisors, config, path))
  return config


def load_gguf(path: PathLike, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
  """Reads a llama-architecture GGUF into (config, params), dequantising every tensor to `dtype`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: no such GGUF file")
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, OSError) as e:
    raise CheckpointError(f"{path}: not a readable GGUF file: {e}") from None
  config = config_from_gguf(reader, path)
  config = dataclasses.replace(config, param_dtype=dtype)
  assembler = ParamAssembler(config, dtype, config_source=f"{path.name}'s metadata", field_names=GGUF_FIELD_NAMES)
  for tensor in reader.tensors:
    if tensor.name == ROPE_FREQS_TENSOR:
      continue  # already folded into config.rope_scaling.
    hf_name = hf_name_for(tensor.name)
    if hf_name is None:
      raise CheckpointError(f"{path}: unexpected tensor {tensor.name!r} for the llama architecture")
    if assembler.expects(hf_name):  # fail on a shape mismatch before spending time dequantising.
      assembler.check_shape(hf_name, tuple(int(d) for d in reversed(tensor.shape)), str(path), tensor.name)
    weight = _dequantize(tensor, path)
    if hf_name.endswith("q_proj.weight"):
      weight = unpermute_rows(weight, config.num_heads)
    elif hf_name.endswith("k_proj.weight"):
      weight = unpermute_rows(weight, config.num_kv_heads)
    assembler.add(hf_name, weight, str(path), tensor.name)
  return config, assembler.finish(str(path))
