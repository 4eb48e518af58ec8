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

from rankrag_jax.model import axes
from rankrag_jax.model import cpu_kernels
from rankrag_jax.model import ops
from rankrag_jax.model import row_matmul
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


def attention_mask(q_segment_ids: Array, kv_segment_ids: Array, q_offset: Array | int = 0) -> Array:
  """Boolean [B, 1, T, S]: same non-zero segment, and key slot <= query slot (query i sits at q_offset + i)."""
  t, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
  q_slot = q_offset + jnp.arange(t)[:, None]
  causal = jnp.arange(s)[None, :] <= q_slot
  same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (q_segment_ids[:, :, None] != 0)
  return (same & causal[None])[:, None]


def _dense_kwargs(cfg: LlamaConfig, panel_kernels: bool) -> dict:
  kwargs = {"use_bias": False, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype}
  if panel_kernels:  # the kernels are in `row_matmul.to_panels` order (CPU decode weights)
    kwargs["dot_general"] = row_matmul.panel_dot_general
  elif cfg.flatten_matmul_tokens:
    kwargs["dot_general"] = ops.token_flattened_dot_general
  return kwargs


class Attention(nn.Module):
  """With cpu_attention (f32, XLA:CPU, one device), attention runs on the thread pool: over the KV cache
  `cpu_kernels.cached_attention`, without one (training) `cpu_kernels.training_attention`."""
  config: LlamaConfig
  panel_kernels: bool = False
  cpu_attention: bool = False

  @nn.compact
  def __call__(self, x, sin, cos, mask, kv_cache=None, cache_index=None, layout=None, query_slots=None):
    """With `query_slots` [B, K] (needs a cache): keys and values of every token, queries (and the output
    [B, K, ...]) only at those row slots."""
    cfg = self.config
    if query_slots is not None and kv_cache is None:
      raise ValueError("Attention: query_slots needs a KV cache (the cache-free attention paths take every query)")
    dense = functools.partial(nn.DenseGeneral, **_dense_kwargs(cfg, self.panel_kernels))
    q_x, q_sin, q_cos = x, sin, cos
    if query_slots is not None:
      q_x, q_sin, q_cos = (token_layout.take_slots(a, query_slots, layout) for a in (x, sin, cos))
      mask = jnp.take_along_axis(mask, query_slots[:, None, :, None], axis=2)
    # q, k and v in one kernel (`decode_weights.fuse_panel_projections`): one row_matmul call, not three
    if self.panel_kernels:
      qkv = dense((cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim),
                  kernel_init=_init((axes.EMBED, axes.HEADS, axes.HEAD_DIM)), name="qkv_proj")(x)
      q, k, v = jnp.split(qkv, (cfg.num_heads, cfg.num_heads + cfg.num_kv_heads), axis=-2)
      if query_slots is not None:
        q = token_layout.take_slots(q, query_slots, layout)
    else:
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
    new_cache = None
    # The CPU kernels read the queries and write the output as compact tokens through an index map (no gathers).
    q_index = None
    if layout is not None and query_slots is None and self.cpu_attention:
      q_index = token_layout.flat_compact_index(layout)
    if layout is not None:  # the projections ran on the compact real tokens; attention runs on the rows.
      k, v = token_layout.to_padded(k, layout), token_layout.to_padded(v, layout)
      q = q if query_slots is not None or q_index is not None else token_layout.to_padded(q, layout)
    if kv_cache is not None:
      # Write this call's keys/values at slots [index, index + T) of the heads-major cache, attend over all of it.
      write = lambda cache, x: jax.lax.dynamic_update_slice_in_dim(
          cache, jnp.swapaxes(x, 1, 2).astype(cache.dtype), cache_index, 2)
      k_all, v_all = write(kv_cache["k"], k), write(kv_cache["v"], v)
      new_cache = {"k": k_all, "v": v_all}
      k_all, v_all = k_all.astype(cfg.dtype), v_all.astype(cfg.dtype)
      if self.cpu_attention:
        out = cpu_kernels.cached_attention(q, k_all, v_all, mask, q_index)
      elif isinstance(cache_index, int) and q.shape[1] > ops.PREFILL_QUERY_BLOCK and query_slots is None:
        out = ops.prefill_blockwise_attention(q, k_all, v_all, mask, cache_index, ops.PREFILL_QUERY_BLOCK)
      else:
        out = ops.cached_attention(q, k_all, v_all, mask)
    elif self.cpu_attention:
      out = cpu_kernels.training_attention(q, k, v, mask, q_index)
    elif 0 < cfg.attention_query_block < q.shape[1]:
      out = ops.causal_blockwise_attention(q, k, v, mask, cfg.attention_query_block)
    else:  # GQA: jax.nn.dot_product_attention groups the query heads over the kv_heads.
      out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    if layout is not None and query_slots is None and q_index is None:
      out = token_layout.to_compact(out, layout)
    out = nn.with_logical_constraint(out, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, axes.ACT_HEAD_DIM))
    out = dense(cfg.hidden_size, axis=(-2, -1), kernel_init=_init((axes.HEADS, axes.HEAD_DIM, axes.EMBED)),
                name="o_proj")(out)
    return out, new_cache


class MLP(nn.Module):
  config: LlamaConfig
  panel_kernels: bool = False

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = functools.partial(nn.Dense, **_dense_kwargs(cfg, self.panel_kernels))
    if self.panel_kernels:  # gate and up in one kernel (`decode_weights.fuse_panel_projections`)
      gate, up = jnp.split(dense(2 * cfg.intermediate_size, kernel_init=_init((axes.EMBED, axes.MLP)),
                                 name="gate_up_proj")(x), 2, axis=-1)
    else:
      gate = dense(cfg.intermediate_size, kernel_init=_init((axes.EMBED, axes.MLP)), name="gate_proj")(x)
      up = dense(cfg.intermediate_size, kernel_init=_init((axes.EMBED, axes.MLP)), name="up_proj")(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
    return dense(cfg.hidden_size, kernel_init=_init((axes.MLP, axes.EMBED)), name="down_proj")(h)


class DecoderLayer(nn.Module):
  """One pre-norm block; the scan body. Returns (x, per-layer cache) as nn.scan expects (carry, ys).

  With `query_slots` [B, K] (the last layer, when only some positions' outputs are needed; with a cache): the
  output is x at those row slots only [B, K, D]; every token still gets its keys and values (cached, attended).
  With panel_kernels, the projection kernels are fused (`decode_weights.fuse_panel_projections`) and in
  `row_matmul.to_panels` order (`generate`'s CPU decode steps); with cpu_attention, the cache attention is
  `cpu_kernels.cached_attention`."""
  config: LlamaConfig
  panel_kernels: bool = False
  cpu_attention: bool = False

  @nn.compact
  def __call__(self, x, sin, cos, mask, layout, cache_index, kv_cache, query_slots=None):
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
    attention = Attention(cfg, self.panel_kernels, self.cpu_attention, name="attn")
    h, new_cache = attention(norm(name="attn_norm")(x), sin, cos, mask, kv_cache, cache_index, layout, query_slots)
    if query_slots is not None:
      x = token_layout.take_slots(x, query_slots, layout)
    x = x + h
    x = x + MLP(cfg, self.panel_kernels, name="mlp")(norm(name="mlp_norm")(x))
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
    # The projections' outputs, and the blockwise attention's output and softmax statistics (CPU training form,
    # `ops.block_attention`) so that its backward pass needs no forward recomputation.
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(*ops.ATTENTION_RESIDUALS)),
}


class Llama(nn.Module):
  """Llama decoder. `__call__` gives full logits; `hidden_states` + `logits_from_hidden` let callers project
  only the positions and vocabulary rows they need (training loss, P("True") scoring). With cpu_attention, the
  layers' attention runs on XLA:CPU's thread pool (`Attention`; `cpu_kernels.attention_usable`)."""
  config: LlamaConfig
  cpu_attention: bool = False

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
        metadata_params={nn.PARTITION_NAME: axes.LAYERS})(cfg, cpu_attention=self.cpu_attention)
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
    `unstacked_hidden_states` runs its last layer at those slots only, but here that would need the stacked
    weights and cache split into L-1 and 1 layers, and on XLA:CPU those copies cost what the pruning saves).

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
      mask = attention_mask(segment_ids, segment_ids)
      x, _ = self.layers(x, sin, cos, mask, layout, None, None)
      return output(x), None
    kv_segments, mask = _cached_attention_mask(cache, segment_ids)
    x, kv = self.layers(x, sin, cos, mask, layout, cache["index"], {"k": cache["k"], "v": cache["v"]})
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
  L arrays [B, Kh, S, D] (for `unstacked_hidden_states`)."""
  shape = (config.num_layers, batch_size, config.num_kv_heads, max_length, config.head_dim)
  dtype = dtype or config.dtype
  if per_layer:
    k, v = ([jnp.zeros(shape[1:], dtype) for _ in range(config.num_layers)] for _ in range(2))
  else:
    k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
  return {"k": k, "v": v, "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


def _cached_attention_mask(cache: dict, segment_ids: Array) -> tuple[Array, Array]:
  """The cache's segment ids with this call's written at `index`, and the queries' mask over all its slots."""
  index = cache["index"]
  kv_segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids.astype(jnp.int32), index, 1)
  return kv_segments, attention_mask(segment_ids, kv_segments, q_offset=index)


def unstacked_hidden_states(config: LlamaConfig, params: dict, layers: list[dict], tokens: Array, positions: Array,
                            segment_ids: Array, cache: dict, layout: token_layout.TokenLayout | None = None,
                            output_slots: Array | None = None, panel_kernels: bool = False,
                            cpu_attention: bool = False) -> tuple[Array, dict]:
  """`Llama.hidden_states` with a per-layer cache (`init_cache(per_layer=True)`) over
  `decode_weights.unstack_layers(params)` (with panel_kernels: their kernels in `row_matmul.to_panels` order; with
  cpu_attention, attention through `cpu_kernels.cached_attention`).

  For decode loops: with the layers unstacked before the loop, a step neither slices each layer's weights out of
  the stack (XLA:CPU copies them, ~40% of a batch-8 SmolLM2 step) nor its cache out of the stacked cache.
  """
  model = Llama(config)
  kv_segments, mask = _cached_attention_mask(cache, segment_ids)
  new_index = cache["index"] + tokens.shape[1]
  if layout is not None:
    tokens, positions = token_layout.to_compact(tokens, layout), token_layout.to_compact(positions, layout)
  x = model.apply({"params": params}, tokens, method=Llama.embed)
  sin, cos = rope_sin_cos(positions, config)
  layer, ks, vs = DecoderLayer(config, panel_kernels, cpu_attention), [], []
  for i, (layer_params, k, v) in enumerate(zip(layers, cache["k"], cache["v"])):
    query_slots = output_slots if i == len(layers) - 1 else None
    x, kv = layer.apply({"params": layer_params}, x, sin, cos, mask, layout, cache["index"], {"k": k, "v": v},
                        query_slots)
    ks.append(kv["k"])
    vs.append(kv["v"])
  new_cache = {"k": ks, "v": vs, "segment_ids": kv_segments, "index": new_index}
  x = model.apply({"params": params}, x, method=Llama.normalize)
  return (x if layout is None or output_slots is not None else token_layout.to_padded(x, layout)), new_cache


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
