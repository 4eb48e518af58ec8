"""XLA forms of attention that `model/attention.py` dispatches to, and exact reformulations of the decoder's
compute that XLA:CPU runs much faster (measured in bench/README.md). `cached_attention` (the heads-major KV cache)
serves every platform; the blockwise forms (attention_impl="blockwise") and `token_flattened_dot_general`
(`flatten_matmul_tokens`) are switched on per config (`gin_configs/cpu.gin`): TPU/GPU compile the plain forms well.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array

_LOWEST = jnp.finfo(jnp.float32).min
# Names of the training attention's saved output and softmax statistics (`block_attention`'s output, row max and
# row sum; `backends.cpu.attention.training_attention`'s output and log-normaliser); remat policies that keep them
# spare the backward pass a forward recomputation (llama._REMAT_POLICIES).
ATTENTION_RESIDUALS = ("attention_out", "attention_row_max", "attention_row_sum", "attention_lse")


def _grouped_queries(q: Array, kv_heads: int) -> Array:
  """[B, T, H, D] -> [B, Kh, G * T, D]: each kv head's G query heads x T queries as one matrix."""
  b, t, h, d = q.shape
  return q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, -1, d)


def _ungrouped(out: Array, t: int) -> Array:
  """The inverse of `_grouped_queries`: [B, Kh, G * T, D] -> [B, T, H, D]."""
  b, kv_heads, _, d = out.shape
  return out.reshape(b, kv_heads, -1, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, -1, d)


def _grouped_mask(mask: Array, group: int) -> Array:
  """[B, 1, T, S] -> [B, 1, G * T, S], the rows of `_grouped_queries`."""
  b, _, t, s = mask.shape
  return jnp.broadcast_to(mask[:, :, None], (b, 1, group, t, s)).reshape(b, 1, group * t, s)


def cached_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Attention of queries q [B, T, H, D] over a heads-major KV cache k, v [B, Kh, S, D] under mask [B, 1, T, S]
  (GQA: H is a multiple of Kh). Computes what `jax.nn.dot_product_attention` does on [B, S, Kh, D] keys.

  Why heads-major: each (row, kv head) then multiplies one contiguous [S, D] key matrix; a kv head's G query heads
  x T queries form one [G * T, D] matrix. On XLA:CPU, the usual [B, S, Kh, D] cache made these batched products
  strided (decode step ~73 -> ~64 ms, prefill ~3.05 -> ~2.82 s for SmolLM2 at batch 8; bench/README.md).
  attention_impl="blockwise" runs a decode step per query head instead (`decode_step_attention`).
  """
  t, d = q.shape[1], q.shape[3]
  kv_heads = k.shape[1]
  scale = 1 / jnp.sqrt(jnp.float32(d))
  queries = _grouped_queries(q, kv_heads)
  visible = _grouped_mask(mask, q.shape[2] // kv_heads)
  scores = jnp.einsum("bkqd,bksd->bkqs", queries, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(visible, scores, _LOWEST)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
  return _ungrouped(out, t)


def decode_step_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """`cached_attention` of one query per row (q [B, 1, H, D]) on XLA:CPU: one matrix-vector product per query
  head of a kv head's group.

  Why: with the G query heads of a kv head as one [G, D] matrix, XLA:CPU runs 2 x B x Kh small batched Eigen
  products per layer; per head, it emits matrix-vector loops instead. SmolLM2 (G = 3), batch 8, 280 cache slots:
  30 layers' attention 18 -> 13.5 ms, a whole decode step ~5 ms faster (bench/README.md, session 12). CPU only:
  each head reads its kv head's keys and values again, from cache on a CPU but from HBM on an accelerator.
  """
  b, _, h, d = q.shape
  kv_heads = k.shape[1]
  scale = 1 / jnp.sqrt(jnp.float32(d))
  queries = q.reshape(b, kv_heads, h // kv_heads, d)  # query head j belongs to kv head j // G
  scores = jnp.stack([jnp.einsum("bkd,bksd->bks", queries[:, :, g], k, preferred_element_type=jnp.float32)
                      for g in range(h // kv_heads)], axis=2) * scale  # [B, Kh, G, S]
  probs = jax.nn.softmax(jnp.where(mask, scores, _LOWEST), axis=-1).astype(v.dtype)
  out = jnp.stack([jnp.einsum("bks,bksd->bkd", probs[:, :, g], v) for g in range(h // kv_heads)], axis=2)
  return out.reshape(b, 1, h, d)


# Query block of `prefill_blockwise_attention`.
PREFILL_QUERY_BLOCK = 64


def prefill_blockwise_attention(q: Array, k: Array, v: Array, mask: Array, start: int, query_block: int) -> Array:
  """`cached_attention` for T queries written at cache slots [start, start + T) (a prefill), one query block at a
  time: block [a, b) meets only slots [0, start + b). The later slots are masked anyway (causally, or still empty),
  so a real query's result is exact while their scores and softmax are never computed (a 192-token prefill after
  a 56-token prefix into a 280-slot cache: 66% of the work). `start` must be static.
  """
  t = q.shape[1]
  outputs = []
  for a in range(0, t, query_block):
    b = min(a + query_block, t)
    end = start + b
    outputs.append(cached_attention(q[:, a:b], k[:, :, :end], v[:, :, :end], mask[:, :, a:b, :end]))
  return jnp.concatenate(outputs, axis=1)


def _block_attention_forward(queries: Array, keys: Array, values: Array, visible: Array):
  """Grouped queries [B, Kh, M, D] over keys/values [B, Kh, S, D] under visible [B, 1, M, S]: the output and the
  softmax's row max and row sum [B, Kh, M] (f32). The output is normalised after the value product ([M, D], not
  [M, S])."""
  scale = 1 / jnp.sqrt(jnp.float32(queries.shape[-1]))
  scores = jnp.einsum("bkqd,bksd->bkqs", queries, keys, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(visible, scores, _LOWEST)
  row_max = jnp.max(scores, axis=-1)
  weights = jnp.exp(scores - row_max[..., None])
  row_sum = jnp.sum(weights, axis=-1)
  out = jnp.einsum("bkqs,bksd->bkqd", weights.astype(values.dtype), values, preferred_element_type=jnp.float32)
  return (out / row_sum[..., None]).astype(values.dtype), row_max, row_sum


@jax.custom_vjp
def block_attention(queries: Array, keys: Array, values: Array, visible: Array) -> Array:
  """Softmax attention of grouped queries (see `_block_attention_forward`), with a FlashAttention-style backward
  pass: it recomputes the probabilities from the saved row max and sum rather than differentiating the softmax."""
  return _block_attention_forward(queries, keys, values, visible)[0]


def _block_attention_fwd(queries, keys, values, visible):
  out, row_max, row_sum = (checkpoint_name(x, name) for x, name in
                           zip(_block_attention_forward(queries, keys, values, visible), ATTENTION_RESIDUALS))
  return out, (queries, keys, values, visible, out, row_max, row_sum)


def _block_attention_bwd(residuals, d_out):
  queries, keys, values, visible, out, row_max, row_sum = residuals
  scale = 1 / jnp.sqrt(jnp.float32(queries.shape[-1]))
  # Keys-major [S, M] probabilities and score gradients: the dK and dV products then contract the minor dimension
  # of both operands. XLA:CPU runs a contraction over the leading dimension of both (queries-major scores) at
  # about half speed (bench/README.md, session 10).
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  visible_t = jnp.swapaxes(visible, 2, 3)
  scores_t = jnp.where(visible_t, f32("bksd,bkqd->bksq", keys, queries) * scale, _LOWEST)
  probs_t = jnp.exp(scores_t - row_max[:, :, None]) / row_sum[:, :, None]
  d_probs_t = f32("bksd,bkqd->bksq", values, d_out)
  # sum_s P[q, s] dP[q, s] = d_out[q] . out[q], since out = P V.
  delta = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1)
  # where(): the forward's mask has no gradient (a row with no visible key averages the values uniformly).
  d_scores_t = jnp.where(visible_t, probs_t * (d_probs_t - delta[:, :, None]), 0.0) * scale
  d_values = f32("bksq,bkqd->bksd", probs_t.astype(d_out.dtype), d_out)
  d_keys = f32("bksq,bkqd->bksd", d_scores_t.astype(queries.dtype), queries)
  d_queries = f32("bksq,bksd->bkqd", d_scores_t.astype(keys.dtype), keys)
  return d_queries.astype(queries.dtype), d_keys.astype(keys.dtype), d_values.astype(values.dtype), None


block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)


def causal_blockwise_attention(q: Array, k: Array, v: Array, mask: Array, query_block: int) -> Array:
  """Attention under a cache-free causal mask [B, 1, T, T], one query block at a time (the training form on CPU).

  Block [i, i + n) only meets keys [0, i + n): every later key is masked anyway, so the result is exact while
  the upper triangle's scores, softmax and their gradients (~45% of them at 8 blocks) are never computed.
  q: [B, T, H, D]; k, v: [B, T, Kh, D] (GQA: H is a multiple of Kh). Keys and values are made heads-major once,
  so each block runs plain batched products (forward + backward 80 -> 65 ms per layer at 4 x 512 tokens on
  XLA:CPU), and `block_attention`'s backward pass (with a remat policy that keeps ATTENTION_RESIDUALS, no
  forward recomputation) ran 30 layers' forward + backward in 1.92 instead of 2.10-2.17 s (session 10).
  """
  t, kv_heads = q.shape[1], k.shape[2]
  group = q.shape[2] // kv_heads
  # Split (not slice) q, k and v: the gradients of split and concatenate are each other, where slicing's
  # gradient would pad every block to full length and add them up.
  bounds = list(range(query_block, t, query_block))
  q_blocks = jnp.split(q, bounds, axis=1)
  k_blocks, v_blocks = (jnp.split(jnp.swapaxes(x, 1, 2), bounds, axis=2) for x in (k, v))
  outputs = []
  for i, q_block in enumerate(q_blocks):
    start, end = i * query_block, min((i + 1) * query_block, t)
    keys, values = jnp.concatenate(k_blocks[:i + 1], axis=2), jnp.concatenate(v_blocks[:i + 1], axis=2)
    out = block_attention(_grouped_queries(q_block, kv_heads), keys, values,
                          _grouped_mask(mask[:, :, start:end, :end], group))
    outputs.append(_ungrouped(out, end - start))
  return jnp.concatenate(outputs, axis=1)


def token_flattened_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                                preferred_element_type=None) -> Array:
  """`lax.dot_general` (the signature Flax's Dense takes as `dot_general`) as one 2-D matmul: lhs's leading free
  dimensions (batch, length) flattened into one token dimension, its contracted dimensions into one feature
  dimension, and the kernel's into [in, out] (a q/k/v projection's [d, heads, head_dim] kernel as [d, heads x
  head_dim], o_proj's [heads, head_dim, d] as [heads x head_dim, d]).

  Why: for a 3-D/4-D activation, XLA:CPU computes the weight gradient (a contraction over batch and length) by
  fusing the elementwise producers (SiLU's gradient, RMSNorm, RoPE) with a transpose into one strided loop that
  runs ~10x slower than a copy. On the 2-D form the same backward runs at matmul speed (MLP forward + backward
  300 -> 205 ms at 4 x 512 tokens; with the kernels 2-D too, the q and k weight gradients stopped transposing RoPE's
  gradient, ~9 ms per layer: SmolLM2 train step 8.64 -> 8.50 s, session 18). Values are identical: the reshapes
  are bitcasts.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lead, kernel_in = lhs.ndim - len(lhs_contract), len(rhs_contract)
  if (lhs_batch or rhs_batch or lead < 2 or tuple(lhs_contract) != tuple(range(lead, lhs.ndim))
      or tuple(rhs_contract) != tuple(range(kernel_in))):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  out = jax.lax.dot_general(lhs.reshape(-1, math.prod(lhs.shape[lead:])),
                            rhs.reshape(math.prod(rhs.shape[:kernel_in]), -1), (((1,), (0,)), ((), ())),
                            precision=precision, preferred_element_type=preferred_element_type)
  return out.reshape(lhs.shape[:lead] + rhs.shape[kernel_in:])
