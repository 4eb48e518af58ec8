"""Llama-family model configuration and the named presets.

A frozen dataclass is passed into the Flax modules; presets are plain functions returning it, so a Gin file
selects one with `model_config = @llama3_8b()` and overrides fields with `dataclasses.replace` bindings.
"""

import dataclasses
from typing import Any

import gin
import jax.numpy as jnp

# The attention implementations `model/attention.py` dispatches to ("auto": chosen for the target platform).
ATTENTION_IMPLS = ("auto", "xla", "blockwise", "splash", "gpu_flash", "cpu_ffi")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 "llama3" RoPE frequency scaling (HF `rope_scaling` with rope_type="llama3")."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture + numerics of a Llama decoder. Field names follow HF's LlamaConfig where they exist."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 500000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 8192
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  # Numerics: parameters are stored in `param_dtype`; matmuls run in `dtype` (f32 or bf16).
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Layers are always stacked on a leading axis; scan_layers=False unrolls that scan (same parameter layout).
  scan_layers: bool = True
  # Rematerialisation of each decoder layer: "none" | "full" | "dots" (save matmul outputs only).
  remat_policy: str = "none"
  # How attention is computed (`model/attention.py`): one of ATTENTION_IMPLS; "auto" picks for the target platform
  # and dtype (TPU splash, GPU gpu_flash, CPU the C++ kernels or blockwise).
  attention_impl: str = "auto"
  # attention_impl="blockwise" without a KV cache (training): split queries into blocks of this many slots, each
  # attending only to the keys up to its end: the causal upper triangle is never computed (0 = one [T, T] call).
  attention_query_block: int = 0
  # Projections and the LM head as 2-D [tokens, features] matmuls (ops.token_flattened_dot_general): XLA:CPU
  # runs their backward ~1.5x faster.
  flatten_matmul_tokens: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.remat_policy not in ("none", "full", "dots"):
      raise ValueError(f"remat_policy must be none|full|dots, got {self.remat_policy!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
    if not isinstance(self.attention_query_block, int) or self.attention_query_block < 0:
      raise ValueError(f"attention_query_block must be an int >= 0 (0 = off), got {self.attention_query_block!r}")

  @property
  def num_params(self) -> int:
    """Parameter count (embeddings included), for FLOP and memory estimates."""
    d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.vocab_size * d + l * per_layer + d + head

  def flops_per_token(self, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token: 2·N (forward) per non-embedding parameter plus causal attention.

    Training triples it (forward + two backward matmuls). Attention scores+values cost
    2·2·seq·heads·head_dim per token per layer, halved for the causal mask.
    """
    n_matmul = self.num_params - self.vocab_size * self.hidden_size * (1 if not self.tie_word_embeddings else 0)
    attn = 2 * 2 * seq_len * self.num_heads * self.head_dim * self.num_layers / 2
    forward = 2 * n_matmul + attn
    return 3 * forward if training else forward


# ---------------------------------------------------------------------------------------------------------
# Presets. Numbers from the models' published HF config.json files.

@gin.configurable
def tiny(**overrides) -> LlamaConfig:
  """A few-hundred-kilobyte Llama with GQA and llama3 RoPE scaling, for tests."""
  cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                    num_kv_heads=2, head_dim=8, rope_theta=10000.0,
                    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=64),
                    max_position_embeddings=512)
  return dataclasses.replace(cfg, **overrides)


@gin.configurable
def smollm2_135m(**overrides) -> LlamaConfig:
  """SmolLM2-135M(-Instruct): 30 layers, d 576, 9 heads / 3 KV heads, tied embeddings."""
  cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
  return dataclasses.replace(cfg, **overrides)


@gin.configurable
def llama3_8b(**overrides) -> LlamaConfig:
  cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                    num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
                    bos_token_id=128000, eos_token_id=(128001, 128009))
  return dataclasses.replace(cfg, **overrides)


@gin.configurable
def llama3_1_8b(**overrides) -> LlamaConfig:
  cfg = dataclasses.replace(llama3_8b(), rope_scaling=RopeScaling(), max_position_embeddings=131072)
  return dataclasses.replace(cfg, **overrides)


@gin.configurable
def llama3_2_1b(**overrides) -> LlamaConfig:
  cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                    num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                    rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=8192),
                    tie_word_embeddings=True, max_position_embeddings=131072,
                    bos_token_id=128000, eos_token_id=(128001, 128008, 128009))
  return dataclasses.replace(cfg, **overrides)


@gin.configurable
def llama3_70b(**overrides) -> LlamaConfig:
  cfg = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                    num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
                    bos_token_id=128000, eos_token_id=(128001, 128009))
  return dataclasses.replace(cfg, **overrides)


PRESETS = {"tiny": tiny, "smollm2_135m": smollm2_135m, "llama3_8b": llama3_8b, "llama3_1_8b": llama3_1_8b,
           "llama3_2_1b": llama3_2_1b, "llama3_70b": llama3_70b}


def get_config(name: str, **overrides) -> LlamaConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name](**overrides)
