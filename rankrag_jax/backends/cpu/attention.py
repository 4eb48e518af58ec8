"""The attention kernels' `jax.ffi` wrappers (`cpu_attention.cc`, `cpu_attention_grad.cc`; built by `build.py`):
`cached_attention` over the heads-major KV cache and `training_attention` (cache-free, with its backward pass).
`model/attention.py` dispatches to them for attention_impl="cpu_ffi"."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from rankrag_jax.backends.cpu import build
from rankrag_jax.model import ops

Array = jax.Array


def _query_tokens(q: Array, q_index: Array | None, batch: int, length: int, name: str) -> tuple[Array, Array]:
  """q as the kernels take it, [N, H, D] query tokens, and q_index [B, T]: each row position's token (N or more:
  a padding position, no query). Without q_index, q is [B, T, H, D] (the rows' own queries); with it, q is
  [..., H, D] (a token layout's compact tokens, q_index from `token_layout.flat_compact_index`)."""
  if q_index is None:
    if q.ndim != 4 or q.shape[:2] != (batch, length):
      raise ValueError(f"cpu attention {name}: expected q [B, T, H, D] with B, T = {batch}, {length}; got {q.shape}")
    # A numpy constant, not an iota op in every decode step's program.
    return q.reshape(batch * length, *q.shape[2:]), np.arange(batch * length, dtype=np.int32).reshape(batch, length)
  if q_index.shape != (batch, length) or q.ndim < 3:
    raise ValueError(f"cpu attention {name}: expected q [..., H, D] and q_index [B, T] = [{batch}, {length}]; "
                     f"got q {q.shape}, q_index {q_index.shape}")
  return q.reshape(-1, *q.shape[-2:]), q_index.astype(jnp.int32)


def _check_heads(name: str, q: Array, k: Array, v: Array, kv_heads: int, k_form: str, mask: Array,
                 mask_form: tuple):
  """Raises a ValueError naming the shapes unless H is a multiple of Kh, D of 8 and k, v, mask are as named."""
  h, d = q.shape[-2:]
  if not (k.ndim == 4 and k.shape == v.shape and k.shape[-1] == d and h % kv_heads == 0 and d % 8 == 0
          and mask.shape == mask_form):
    raise ValueError(f"cpu attention {name}: expected k and v {k_form} with H a multiple of Kh and D of 8, "
                     f"mask {list(mask_form)}; got q {q.shape}, k {k.shape}, v {v.shape}, mask {mask.shape}")


def cached_attention(q: Array, k: Array, v: Array, mask: Array, q_index: Array | None = None) -> Array:
  """`ops.cached_attention` (q [B, T, H, D], heads-major k, v [B, Kh, S, D], mask [B, 1, T, S]) in f32 on the
  thread pool (`cpu_attention.cc`; built and registered on first call by `build.require()`). A query row that
  sees no slot gets zeros. With `q_index` [B, T], q and the output are compact query tokens [..., H, D] instead
  (`_query_tokens`)."""
  b, _, t, s = mask.shape
  queries, q_index = _query_tokens(q, q_index, b, t, "cached_attention")
  _check_heads("cached_attention", q, k, v, k.shape[1], "[B, Kh, S, D]", mask, (b, 1, t, k.shape[2]))
  build.require()
  out = jax.ffi.ffi_call(build.ATTENTION, jax.ShapeDtypeStruct(queries.shape, jnp.float32))(
      queries.astype(jnp.float32), q_index, k.astype(jnp.float32), v.astype(jnp.float32),
      mask.reshape(b, t, s).astype(jnp.bool_))
  return out.reshape(q.shape)


# Partial sums of dk and dv that `training_attention`'s backward pass keeps apart (one per thread of this
# machine's two cores, and more work items to share out than kv heads x rows alone).
GRAD_PARTS = 2


def _mask_rows(mask: Array) -> Array:
  return mask.reshape(mask.shape[0], mask.shape[2], mask.shape[3]).astype(jnp.bool_)


def _training_attention_forward(q, k, v, mask, q_index):
  b, t = mask.shape[0], mask.shape[2]
  if k.ndim != 4 or k.shape[:2] != (b, t) or k.shape != v.shape:
    raise ValueError(f"cpu attention training_attention: expected k and v [B, T, Kh, D] with B, T = {b}, {t} (mask "
                     f"[B, 1, T, T]); got k {k.shape}, v {v.shape}, mask {mask.shape}")
  queries, q_index = _query_tokens(q, q_index, b, t, "training_attention")
  _check_heads("training_attention", q, k, v, k.shape[2], "[B, T, Kh, D]", mask, (b, 1, t, t))
  keys, values = (jnp.swapaxes(x, 1, 2).astype(jnp.float32) for x in (k, v))
  build.require()
  out, lse = jax.ffi.ffi_call(build.ATTENTION_STATS, (jax.ShapeDtypeStruct(queries.shape, jnp.float32),
                                                jax.ShapeDtypeStruct((b, queries.shape[1], t), jnp.float32)))(
      queries.astype(jnp.float32), q_index, keys, values, _mask_rows(mask))
  return out.reshape(q.shape), lse


@jax.custom_vjp
def training_attention(q: Array, k: Array, v: Array, mask: Array, q_index: Array | None = None) -> Array:
  """Cache-free attention (training's form): q [B, T, H, D], k and v [B, T, Kh, D], mask [B, 1, T, T] (causal and
  per segment), f32 on the thread pool (`cpu_attention.cc` forward, `cpu_attention_grad.cc` backward; needs
  `available()`). The forward pass keeps its output and each row's softmax log-normaliser (named in
  `ops.ATTENTION_RESIDUALS`, so the "dots" remat policy saves them) and the backward pass recomputes the
  probabilities from them. A query row that sees no key gets zeros and no gradient. With `q_index` [B, T], q and
  the output are compact query tokens [..., H, D] instead (`_query_tokens`).
  """
  return _training_attention_forward(q, k, v, mask, q_index)[0].astype(q.dtype)


def _training_attention_fwd(q, k, v, mask, q_index=None):
  out, lse = _training_attention_forward(q, k, v, mask, q_index)
  out, lse = checkpoint_name(out, ops.ATTENTION_RESIDUALS[0]), checkpoint_name(lse, ops.ATTENTION_RESIDUALS[-1])
  return out.astype(q.dtype), (q, k, v, mask, q_index, out, lse)


def _training_attention_bwd(residuals, d_out):
  q, k, v, mask, q_index, out, lse = residuals
  b, t, kv_heads, d = k.shape
  queries, q_index_rows = _query_tokens(q, q_index, b, t, "training_attention")
  keys, values = (jnp.swapaxes(x, 1, 2).astype(jnp.float32) for x in (k, v))
  parts = jax.ShapeDtypeStruct((GRAD_PARTS, b, kv_heads, t, d), jnp.float32)
  build.require()  # a backward pass traced in another process than its forward (a loaded export) registers too
  grads = (jax.ShapeDtypeStruct(queries.shape, jnp.float32), parts, parts)
  dq, dk, dv = jax.ffi.ffi_call(build.ATTENTION_GRAD, grads)(
      queries.astype(jnp.float32), q_index_rows, keys, values, _mask_rows(mask), out.reshape(queries.shape), lse,
      d_out.reshape(queries.shape).astype(jnp.float32))
  dk, dv = (jnp.swapaxes(x.sum(axis=0), 1, 2) for x in (dk, dv))
  return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


training_attention.defvjp(_training_attention_fwd, _training_attention_bwd)
