"""Exact reformulations of the decoder's compute, and a compiler option, that XLA:CPU runs much faster
(measured in bench/README.md). `cached_attention` (the heads-major KV cache) is used on every backend; the
training forms are off by default and switched on per config (`gin_configs/cpu.gin`): TPU/GPU compile the plain
forms well.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def cached_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Attention of queries q [B, T, H, D] over a heads-major KV cache k, v [B, Kh, S, D] under mask [B, 1, T, S]
  (GQA: H is a multiple of Kh). Computes what `jax.nn.dot_product_attention` does on [B, S, Kh, D] keys.

  Why heads-major: each (row, kv head) then multiplies one contiguous [S, D] key matrix; a kv head's G query heads
  x T queries form one [G * T, D] matrix. On XLA:CPU, the usual [B, S, Kh, D] cache made these batched products
  strided (decode step ~73 -> ~64 ms, prefill ~3.05 -> ~2.82 s for SmolLM2 at batch 8; bench/README.md).
  """
  b, t, h, d = q.shape
  kv_heads, s = k.shape[1], k.shape[2]
  group = h // kv_heads
  queries = q.reshape(b, t, kv_heads, group, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, group * t, d)
  visible = jnp.broadcast_to(mask[:, :, None], (b, 1, group, t, s)).reshape(b, 1, group * t, s)
  scale = 1 / jnp.sqrt(jnp.float32(d))
  lowest = jnp.finfo(jnp.float32).min
  if t == 1:  # a decode step: XLA:CPU runs the [S, D] x [D, G] products faster keys-major ([S, G] scores).
    scores = jnp.einsum("bksd,bkqd->bksq", k, queries, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(jnp.swapaxes(visible, 2, 3), scores, lowest)
    probs = jax.nn.softmax(scores, axis=2).astype(v.dtype)
    out = jnp.einsum("bksq,bksd->bkqd", probs, v)
  else:
    scores = jnp.einsum("bkqd,bksd->bkqs", queries, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible, scores, lowest)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
  return out.reshape(b, kv_heads, group, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


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


def causal_blockwise_attention(q: Array, k: Array, v: Array, mask: Array, query_block: int) -> Array:
  """Attention under a cache-free causal mask [B, 1, T, T], one query block at a time.

  Block [i, i + n) only meets keys [0, i + n): every later key is masked anyway, so the result is exact while
  the upper triangle's scores, softmax and their gradients (~45% of them at 8 blocks) are never computed.
  q: [B, T, H, D]; k, v: [B, T, Kh, D] (GQA: H is a multiple of Kh). Keys and values are made heads-major once,
  so each block runs `cached_attention`'s plain batched products (forward + backward 80 -> 65 ms per layer at
  4 x 512 tokens on XLA:CPU).
  """
  t = q.shape[1]
  # Split (not slice) q, k and v: the gradients of split and concatenate are each other, where slicing's
  # gradient would pad every block to full length and add them up.
  bounds = list(range(query_block, t, query_block))
  q_blocks = jnp.split(q, bounds, axis=1)
  k_blocks, v_blocks = (jnp.split(jnp.swapaxes(x, 1, 2), bounds, axis=2) for x in (k, v))
  outputs = []
  for i, q_block in enumerate(q_blocks):
    start, end = i * query_block, min((i + 1) * query_block, t)
    keys, values = jnp.concatenate(k_blocks[:i + 1], axis=2), jnp.concatenate(v_blocks[:i + 1], axis=2)
    outputs.append(cached_attention(q_block, keys, values, mask[:, :, start:end, :end]))
  return jnp.concatenate(outputs, axis=1)


def token_flattened_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                                preferred_element_type=None) -> Array:
  """`lax.dot_general` (the signature Flax's Dense takes as `dot_general`) with lhs's leading free dimensions
  (batch, length) flattened into one token dimension: a 2-D [tokens, features] matmul.

  Why: for a 3-D/4-D activation, XLA:CPU computes the weight gradient (a contraction over batch and length) by
  fusing the elementwise producers (SiLU's gradient, RMSNorm, RoPE) with a transpose into one strided loop that
  runs ~10x slower than a copy. On the 2-D form the same backward runs at matmul speed (MLP forward + backward
  300 -> 205 ms at 4 x 512 tokens). Values are identical: the reshape is a bitcast.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lead = lhs.ndim - len(lhs_contract)
  if lhs_batch or rhs_batch or lead < 2 or tuple(lhs_contract) != tuple(range(lead, lhs.ndim)):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  flat = lhs.reshape((-1,) + lhs.shape[lead:])
  contract = tuple(range(1, flat.ndim))
  out = jax.lax.dot_general(flat, rhs, ((contract, tuple(rhs_contract)), ((), ())), precision=precision,
                            preferred_element_type=preferred_element_type)
  return out.reshape(lhs.shape[:lead] + out.shape[1:])


def inference_compiler_options(backend: str) -> dict | None:
  """XLA options for the jitted inference programs (scoring, generation) on `backend`.

  On CPU: XLA's own (Eigen) dots instead of the YNNPACK library fusion XLA:CPU picks by default. Decode's
  [batch, d] x [d, f] products run ~1.7x faster, prefills ~5%; training steps run the same either way.
  """
  if backend != "cpu":
    return None
  return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
