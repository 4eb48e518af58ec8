"""Flax (linen) Llama decoder: RMSNorm, RoPE with llama3 scaling, GQA attention, SwiGLU, stacked layers.

Attention is driven by explicit `positions` (RoPE) and `segment_ids` (who may attend to whom), so packed
training rows, padded batches and KV-cache decoding are the same code: a query attends to a key iff both
carry the same non-zero segment id and the key's slot is not after the query's slot.

The KV cache is an explicit pytree (see `init_cache`) passed in and returned, never hidden module state:
    cache = {"k": [L, B, Kh, S, D], "v": [L, B, Kh, S, D], "segment_ids": [B, S], "index": int32[]}
`index` is the slot where the next call's first token is written. Heads-major (each row's and kv head's keys one
contiguous [S, D] matrix): see `ops.cached_attention`.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from rankrag_jax.model import attention
from rankrag_jax.model import axes
from rankrag_jax.model import ops
from rankrag_jax.model import token_layout
from rankrag_jax.model.config import LlamaConfig

Array = jax.Array


class _LogicallyPartitioned(nn.LogicallyPartitioned):
  """nn.DenseGeneral unboxes a multi-axis kernel once at its flat 2-D init shape before reshaping it; the
  constraint only applies at full rank (otherwise init/apply fail whenever a mesh is set, e.g. under jax.set_mesh)."""

  def unbox(self, apply_constraint=True):
    return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def _init(names, stddev=0.02):
  initializer = nn.initializers.normal(stddev)
  return lambda *args, **kwargs: _LogicallyPartitioned(initializer(*args, **kwargs), names)


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)  # the variance is taken in f32 even when computing in bf16, as HF does.
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32.astype(self.dtype) * scale.astype(self.dtype))


def rope_inverse_frequencies(config: LlamaConfig) -> Array:
  """Per-pair rotation frequencies, with Llama-3.1's piecewise "llama3" scaling when configured."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  rs = config.rope_scaling
  if rs is None:
    return inv_freq
  low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
  high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  # Long wavelengths are slowed by `factor`, short ones kept, and the band between interpolated smoothly.
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
  smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
      rs.high_freq_factor - rs.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def rope_sin_cos(positions: Array, config: LlamaConfig) -> tuple[Array, Array]:
  """sin/cos tables [B, T, head_dim] for integer positions [B, T] (HF rotate-half layout)."""
  freqs = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(config)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.sin(emb), jnp.cos(emb)


def apply_rope(x: Array, sin: Array, cos: Array) -> Array:
  """x: [B, T, H, D]; rotates pairs (i, i + D/2), HF's rotate_half convention.

  rotate_half(x) = [-x2, x1] as the two halves flipped and signed, rather than sliced and concatenated: the same
  values, but its gradient (fused by XLA:CPU into the q/k weight gradients' transposes) has no slices or
  concatenation in it: a 4 x 512 SmolLM2 train step ~1.5% faster (bench/README.md)."""
  *lead, d = x.shape
  x32 = x.astype(jnp.float32)
  halves = x32.reshape(*lead, 2, d // 2)
  rotated = (jnp.flip(halves, axis=-2) * jnp.array([[-1.0], [1.0]], jnp.float32)).reshape(x.shape)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def _dense_kwargs(cfg: LlamaConfig) -> dict:
  kwargs = {"use_bias": False, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype}
  if cfg.flatten_matmul_tokens:
    kwargs["dot_general"] = ops.token_flattened_dot_general
  return kwargs


def write_kv_cache(kv_cache: dict, k: Array, v: Array, cache_index: Array | int) -> dict:
  """The heads-major cache {"k", "v"} [B, Kh, S, D] with k, v [B, T, Kh, D] written at slots [index, index + T)."""
  write = lambda cache, x: jax.lax.dynamic_update_slice_in_dim(
      cache, jnp.swapaxes(x, 1, 2).astype(cache.dtype), cache_index, 2)
  return {"k": write(kv_cache["k"], k), "v": write(kv_cache["v"], v)}


class Attention(nn.Module):
  """GQA self-attention; the attention itself is `attention.attend` with `config.attention_impl`."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, sin, cos, vis, kv_cache=None, cache_index=None, layout=None, query_slots=None):
    """With `query_slots` [B, K] (needs a cache): keys and values of every token, queries (and the output
    [B, K, ...]) only at those row slots."""
    cfg = self.config
    if query_slots is not None and kv_cache is None:
      raise ValueError("Attention: query_slots needs a KV cache (the cache-free attention paths take every query)")
    dense = functools.partial(nn.DenseGeneral, **_dense_kwargs(cfg))
    q_x, q_sin, q_cos = x, sin, cos
    if query_slots is not None:
      q_x, q_sin, q_cos = (token_layout.take_slots(a, query_slots, layout) for a in (x, sin, cos))
      vis = vis.at_query_slots(query_slots)
    q = dense((cfg.num_heads, cfg.head_dim), kernel_init=_init((axes.EMBED, axes.HEADS, axes.HEAD_DIM)),
              name="q_proj")(q_x)
    k = dense((cfg.num_kv_heads, cfg.head_dim), kernel_init=_init((axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM)),
              name="k_proj")(x)
    v = dense((cfg.num_kv_heads, cfg.head_dim), kernel_init=_init((axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM)),
              name="v_proj")(x)
    q = nn.with_logical_constraint(apply_rope(q, q_sin, q_cos), (axes.BATCH, axes.LENGTH, axes.ACT_HEADS,
                                                                   axes.ACT_HEAD_DIM))
    k = nn.with_logical_constraint(apply_rope(k, sin, cos), (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS,
                                                               axes.ACT_HEAD_DIM))
    if layout is not None:  # the projections ran on the compact real tokens; keys and values go to the rows.
      k, v = token_layout.to_padded(k, layout), token_layout.to_padded(v, layout)
    # Queries at slots are rows already; otherwise attend takes them (and gives the output) in the layout's form.
    q_layout = layout if query_slots is None else None
    new_cache = None
    if kv_cache is not None:  # attend over the whole cache, this call's keys and values written in it
      new_cache = write_kv_cache(kv_cache, k, v, cache_index)
      k, v = new_cache["k"].astype(cfg.dtype), new_cache["v"].astype(cfg.dtype)
    out = attention.attend(q, k, v, vis, impl=cfg.attention_impl, query_block=cfg.attention_query_block,
                           cache_index=cache_index if kv_cache is not None else None, layout=q_layout)
    out = nn.with_logical_constraint(out, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, axes.ACT_HEAD_DIM))
    out = dense(cfg.hidden_size, axis=(-2, -1), kernel_init=_init((axes.HEADS, axes.HEAD_DIM, axes.EMBED)),
                name="o_proj")(out)
    return out, new_cache


class MLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = functools.partial(nn.Dense, **_dense_kwargs(cfg))
    gate = dense(cfg.intermediate_size, kernel_init=_init((axes.EMBED, axes.MLP)), name="gate_proj")(x)
    up = dense(cfg.intermediate_size, kernel_init=_init((axes.EMBED, axes.MLP)), name="up_proj")(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
    return dense(cfg.hidden_size, kernel_init=_init((axes.MLP, axes.EMBED)), name="down_proj")(h)


class DecoderLayer(nn.Module):
  """One pre-norm block; the scan body. Returns (x, per-layer cache) as nn.scan expects (carry, ys).

  With `query_slots` [B, K] (the last layer, when only some positions' outputs are needed; with a cache): the
  output is x at those row slots only [B, K, D]; every token still gets its keys and values (cached, attended)."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, sin, cos, vis, layout, cache_index, kv_cache, query_slots=None):
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
    attention_layer = Attention(cfg, name="attn")
    h, new_cache = attention_layer(norm(name="attn_norm")(x), sin, cos, vis, kv_cache, cache_index, layout,
                                   query_slots)
    if query_slots is not None:
      x = token_layout.take_slots(x, query_slots, layout)
    x = x + h
    x = x + MLP(cfg, name="mlp")(norm(name="mlp_norm")(x))
    x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
    return x, new_cache


class LMHeadKernel(nn.Module):
  """Holds the untied output projection `lm_head/kernel` [D, V]; the projection itself is in Llama."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, _):
    cfg = self.config
    return self.param("kernel", _init((axes.EMBED, axes.VOCAB)), (cfg.hidden_size, cfg.vocab_size),
                      cfg.param_dtype)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # The projections' outputs, and the training attention's output and softmax statistics (`ops.block_attention`,
    # the cpu_ffi kernel) so that its backward pass needs no forward recomputation.
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(*ops.ATTENTION_RESIDUALS)),
}


class Llama(nn.Module):
  """Llama decoder. `__call__` gives full logits; `hidden_states` + `logits_from_hidden` let callers project
  only the positions and vocabulary rows they need (training loss, P("True") scoring). Attention runs as
  `config.attention_impl` says (`model/attention.py`; callers that know their mesh resolve it: `for_target`)."""
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                 embedding_init=_init((axes.VOCAB, axes.EMBED), stddev=1.0))
    layer = DecoderLayer
    if cfg.remat_policy != "none":
      layer = nn.remat(layer, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    self.layers = nn.scan(
        layer, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast,) * 5 + (0,), length=cfg.num_layers,
        unroll=1 if cfg.scan_layers else cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: axes.LAYERS})(cfg)
    self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = LMHeadKernel(cfg)

  def embed(self, tokens: Array) -> Array:
    x = self.embed_tokens(tokens)
    return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))

  def normalize(self, x: Array) -> Array:
    return self.final_norm(x)

  def hidden_states(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
                    cache: dict | None = None, layout: token_layout.TokenLayout | None = None,
                    output_slots: Array | None = None) -> tuple[Array, dict | None]:
    """Final-norm hidden states [B, T, D] and the updated cache (None without one).

    With `output_slots` int32 [B, K], only those row slots' hidden states [B, K, D] (gathered after the last layer:
    `backends.cpu.decode.unstacked_hidden_states` runs its last layer at those slots only, but here that would need
    the stacked weights and cache split into L-1 and 1 layers, and on XLA:CPU those copies cost what it saves).

    tokens/positions/segment_ids: int [B, T]. Defaults: positions 0..T-1, one segment (no padding).
    With a cache, tokens are written at slots [cache["index"], cache["index"] + T). A Python-int index (static: a
    prefill) lets the queries attend block by block to the slots up to each block's end only.
    With a `layout` (`token_layout.make_layout(segment_ids, ...)`), everything but attention runs on the real
    tokens only; padding slots of the result are 0 (with a cache: their keys/values are written as 0, and never
    attended, being padding).
    """
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    if layout is not None:
      tokens, positions = token_layout.to_compact(tokens, layout), token_layout.to_compact(positions, layout)
    x = self.embed(tokens)
    sin, cos = rope_sin_cos(positions, self.config)

    def output(x):  # the final norm is per token: gather the requested slots first
      if output_slots is not None:
        return self.normalize(token_layout.take_slots(x, output_slots, layout))
      return self.normalize(x) if layout is None else token_layout.to_padded(self.normalize(x), layout)

    if cache is None:
      x, _ = self.layers(x, sin, cos, attention.visibility(segment_ids), layout, None, None)
      return output(x), None
    kv_segments, vis = cached_visibility(cache, segment_ids)
    x, kv = self.layers(x, sin, cos, vis, layout, cache["index"], {"k": cache["k"], "v": cache["v"]})
    new_cache = {"k": kv["k"], "v": kv["v"], "segment_ids": kv_segments, "index": cache["index"] + t}
    return output(x), new_cache

  def logits_from_hidden(self, hidden: Array, vocab_ids: Array | None = None) -> Array:
    """Projects hidden [..., D] to f32 logits [..., V], or only onto the vocabulary rows `vocab_ids` [n]."""
    if self.config.tie_word_embeddings:
      table = self.embed_tokens.embedding  # [V, D]
    else:
      table = self.lm_head(None).T  # [D, V] -> [V, D]
    if vocab_ids is not None:
      table = jnp.take(table, vocab_ids, axis=0)
    dtype = self.config.dtype
    dot_general = ops.token_flattened_dot_general if self.config.flatten_matmul_tokens else jax.lax.dot_general
    logits = dot_general(hidden.astype(dtype), table.astype(dtype), (((hidden.ndim - 1,), (1,)), ((), ())))
    if logits.ndim == 3:
      logits = nn.with_logical_constraint(logits, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))
    return logits.astype(jnp.float32)

  def __call__(self, tokens, positions=None, segment_ids=None):
    hidden, _ = self.hidden_states(tokens, positions, segment_ids)
    return self.logits_from_hidden(hidden)


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype=None, per_layer: bool = False) -> dict:
  """An empty KV cache (all slots padding) for `max_length` tokens; with per_layer, "k" and "v" are lists of
  L arrays [B, Kh, S, D] (for `backends.cpu.decode.unstacked_hidden_states`)."""
  shape = (config.num_layers, batch_size, config.num_kv_heads, max_length, config.head_dim)
  dtype = dtype or config.dtype
  if per_layer:
    k, v = ([jnp.zeros(shape[1:], dtype) for _ in range(config.num_layers)] for _ in range(2))
  else:
    k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
  return {"k": k, "v": v, "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


def cached_visibility(cache: dict, segment_ids: Array) -> tuple[Array, attention.Visibility]:
  """The cache's segment ids with this call's written at `index`, and the queries' visibility over all its slots."""
  index = cache["index"]
  kv_segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids.astype(jnp.int32), index, 1)
  return kv_segments, attention.visibility(segment_ids, kv_segments, q_offset=index)


def cache_logical_axes() -> dict:
  """Logical axis names of `init_cache`'s leaves, for sharding a cache like the activations."""
  kv = (axes.LAYERS, axes.CACHE_BATCH, axes.ACT_KV_HEADS, axes.CACHE_LENGTH, axes.ACT_HEAD_DIM)
  return {"k": kv, "v": kv, "segment_ids": (axes.CACHE_BATCH, axes.CACHE_LENGTH), "index": ()}


def init_params(config: LlamaConfig, rng: Array) -> dict:
  """Random parameters (unboxed plain arrays), e.g. for tests or training from scratch."""
  model = Llama(config)
  tokens = jnp.zeros((1, 8), jnp.int32)
  return nn.unbox(model.init(rng, tokens))["params"]


def param_logical_axes(config: LlamaConfig) -> dict:
  """The logical axis names of every parameter, without allocating any (shape evaluation only)."""
  model = Llama(config)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return nn.get_partition_spec(boxed)["params"]
