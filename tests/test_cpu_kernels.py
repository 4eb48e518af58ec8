"""The C++ thread-pool kernels (through jax.ffi) against XLA: the few-row product (row_matmul.cc) against its dot,
the cache attention (cpu_attention.cc) against ops' attention, training's attention and its gradients
(cpu_attention.cc, cpu_attention_grad.cc) against XLA's attention's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankrag_jax.backends.cpu import attention as cpu_attention
from rankrag_jax.backends.cpu import build as cpu_build
from rankrag_jax.backends.cpu import row_matmul
from rankrag_jax.model import attention, ops, token_layout


def dense_dimension_numbers(lead_ndim: int, in_ndim: int):
  """How Flax's Dense / DenseGeneral contract activations [*lead, *in] with a kernel [*in, *out]."""
  return (tuple(range(lead_ndim, lead_ndim + in_ndim)), tuple(range(in_ndim))), ((), ())


@pytest.mark.parametrize("lead, k_in, n_out", [
    ((8, 1), (576,), (1536,)),  # a SmolLM2 decode step's gate projection
    ((3,), (64,), (24,)),  # fewer rows than a panel holds
    ((13, 1), (9, 64), (72,)),  # o_proj's two contracted axes; rows over two row groups
    ((2, 4), (64,), (3, 16)),  # k_proj's two output axes
    ((128,), (40,), (24,)),  # MAX_ROWS: still the kernel
    ((129,), (40,), (16,)),  # more rows: XLA's dot on the restored kernel
])
def test_panel_dot_general_equals_dot_general(lead, k_in, n_out):
  assert cpu_build.available()  # compiled with the host's compiler into the cache
  x = jax.random.normal(jax.random.key(0), lead + k_in)
  kernel = jax.random.normal(jax.random.key(1), k_in + n_out)
  numbers = dense_dimension_numbers(len(lead), len(k_in))
  want = jax.lax.dot_general(x, kernel, numbers)
  panels = row_matmul.to_panels(kernel, len(k_in))
  assert panels.shape == kernel.shape and not np.array_equal(panels, kernel)
  np.testing.assert_array_equal(row_matmul.from_panels(panels, len(k_in)), kernel)
  got = jax.jit(row_matmul.panel_dot_general, static_argnums=2)(x, panels, numbers)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_kernels_whose_outputs_are_not_whole_panels_are_refused():
  assert not row_matmul.can_panel((64, 12))
  with pytest.raises(ValueError, match=r"shape \(64, 12\) has 12 output features, not a multiple of 8"):
    row_matmul.to_panels(jnp.zeros((64, 12)))
  with pytest.raises(ValueError, match="a Dense contraction over the kernel's leading axes"):
    row_matmul.panel_dot_general(jnp.zeros((2, 8)), jnp.zeros((16, 8)), (((1,), (1,)), ((), ())))


def cache_attention_inputs(batch, queries, heads, kv_heads, slots, head_dim, start, seed=0):
  """Queries written at cache slots [start, start + T) of rows with random real lengths (right padding):
  the prefill's or a decode step's mask."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, queries, heads, head_dim))
  k, v = (jax.random.normal(key, (batch, kv_heads, slots, head_dim)) for key in keys[1:3])
  lengths = jax.random.randint(keys[3], (batch,), 1, queries + 1).at[0].set(queries)
  real = jnp.arange(queries)[None] < lengths[:, None]  # [B, T]
  written = jnp.arange(slots)[None] < (start + lengths)[:, None]  # [B, S]
  causal = jnp.arange(slots)[None, :] <= start + jnp.arange(queries)[:, None]  # [T, S]
  return q, k, v, (causal[None] & real[:, :, None] & written[:, None, :])[:, None], real


@pytest.mark.parametrize("shape", [
    (8, 1, 9, 3, 40, 64, 20),  # a SmolLM2 decode step: the 3 query heads of a kv head share a tile
    (2, 1, 32, 8, 50, 128, 40),  # a Llama-3-8B decode step: 4 query heads per kv head
    (4, 70, 9, 3, 130, 64, 56),  # a prefill after a 56-token shared prefix, tiles of 8 positions
    (3, 13, 4, 4, 17, 16, 0),  # no grouping (MHA), a cache of exactly the prompt
    (2, 5, 8, 2, 300, 128, 100),  # Llama-3's head_dim
])
def test_cache_attention_equals_xla_attention(shape):
  assert cpu_build.available()
  q, k, v, mask, real = cache_attention_inputs(*shape)
  want = ops.cached_attention(q, k, v, mask)
  got = jax.jit(cpu_attention.cached_attention)(q, k, v, mask)
  real = np.asarray(real)[:, :, None, None]
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.where(real, 0, got), 0)  # padding queries (they see no slot): zeros


def test_cache_attention_under_a_mask_with_holes():
  # Masks need not be causal or contiguous (a decode step's row with a shorter prompt than the batch's sees its
  # prompt, a gap, then its new tokens): a random one, every row seeing at least slot 0.
  q, k, v, _, _ = cache_attention_inputs(2, 6, 6, 2, 37, 32, 0)
  mask = jax.random.bernoulli(jax.random.key(5), 0.4, (2, 1, 6, 37)).at[:, :, :, 0].set(True)
  np.testing.assert_allclose(cpu_attention.cached_attention(q, k, v, mask), ops.cached_attention(q, k, v, mask),
                             rtol=1e-5, atol=1e-5)


def test_cache_attention_names_the_shapes_it_cannot_take():
  q, k, v, mask, _ = cache_attention_inputs(2, 3, 6, 4, 10, 16, 0)  # 6 query heads over 4 kv heads
  with pytest.raises(ValueError, match=r"H a multiple of Kh.*got q \(2, 3, 6, 16\), k \(2, 4, 10, 16\)"):
    cpu_attention.cached_attention(q, k, v, mask)


def packed_rows(batch, length, seed):
  """Segment ids of rows packed with 1-4 examples of random lengths, then padding (segment 0)."""
  rng = np.random.default_rng(seed)
  segments = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length), rng.integers(1, 5), replace=False))
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
      segments[row, a - cuts[0]:b - cuts[0]] = i + 1
    segments[row, cuts[-1] - cuts[0]:] = 0 if row else len(cuts)  # row 0 runs to the end
  return jnp.asarray(segments)


@pytest.mark.parametrize("batch, length, heads, kv_heads, head_dim", [
    (4, 96, 9, 3, 64),  # SmolLM2's heads: 3 query heads per kv head
    (1, 70, 8, 2, 128),  # Llama-3's head size and group (4 query heads per kv head); one row; tiles of 16 rows
    # straddle two query heads (T % 16 != 0)
    (3, 21, 4, 4, 8),  # no grouping (MHA); a head size of one vector (D % 16 == 8)
])
def test_training_attention_and_its_gradients_equal_xla(batch, length, heads, kv_heads, head_dim):
  assert cpu_build.available()
  keys = jax.random.split(jax.random.key(batch), 4)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
  k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim)) for key in keys[1:3])
  segments = packed_rows(batch, length, seed=length)
  mask = attention.attention_mask(segments, segments)
  real = np.asarray(segments > 0)[:, :, None, None]
  # Padding rows see no key: the kernel gives them zeros, XLA an average; a loss never reads them.
  weights = jax.random.normal(keys[3], q.shape) * real

  def loss(attention, q, k, v):
    out = attention(q, k, v, mask)
    return jnp.sum(out * weights), out

  xla_attention = lambda q, k, v, mask: jax.nn.dot_product_attention(q, k, v, mask=mask)
  want_grads, want = jax.grad(functools.partial(loss, xla_attention), (0, 1, 2), has_aux=True)(q, k, v)
  got_grads, got = jax.jit(jax.grad(functools.partial(loss, cpu_attention.training_attention), (0, 1, 2),
                                    has_aux=True))(q, k, v)
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.where(real, 0, got), 0)
  for name, a, b in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")
  assert float(jnp.max(jnp.abs(got_grads[0]))) > 0.1  # the comparison is not between zeros


@pytest.mark.parametrize("shards", [1, 2])
def test_flat_compact_index_finds_each_row_slot_among_the_compact_tokens(shards):
  segments = packed_rows(4, 23, seed=shards)
  num_tokens = token_layout.tokens_needed(np.asarray(segments), shards) + 3  # 3 unused compact tokens per shard
  layout = token_layout.make_layout(segments, shards, num_tokens)
  rows = jax.random.normal(jax.random.key(0), (4, 23, 5))
  compact = token_layout.to_compact(rows, layout).reshape(shards * num_tokens, 5)
  index = np.asarray(token_layout.flat_compact_index(layout))
  real = np.asarray(segments) > 0
  np.testing.assert_array_equal(np.asarray(compact)[index[real]], np.asarray(rows)[real])
  np.testing.assert_array_equal(index[~real], shards * num_tokens)


def test_kernels_read_and_write_compact_query_tokens_as_the_rows():
  """Through q_index the kernels take a token layout's compact queries: output, dq (compact) and dk, dv equal the
  rows' own; the unused compact tokens get zeros."""
  batch, length, heads, kv_heads, head_dim = 3, 37, 6, 2, 16
  keys = jax.random.split(jax.random.key(1), 4)
  segments = packed_rows(batch, length, seed=7)
  layout = token_layout.make_layout(segments, 1, token_layout.tokens_needed(np.asarray(segments), 1) + 5)
  q_index = token_layout.flat_compact_index(layout)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim)) * (segments > 0)[:, :, None, None]
  k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim)) for key in keys[1:3])
  mask = attention.attention_mask(segments, segments)
  weights = token_layout.to_compact(jax.random.normal(keys[3], q.shape), layout)
  q_compact = token_layout.to_compact(q, layout)
  unused = np.asarray(layout.compact_slots[0]) == batch * length

  def loss(q, k, v, index, weights):
    out = cpu_attention.training_attention(q, k, v, mask, index)
    return jnp.sum(out * weights), out

  grad = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))
  (dq_rows, dk_rows, dv_rows), out_rows = grad(q, k, v, None, token_layout.to_padded(weights, layout))
  (dq, dk, dv), out = grad(q_compact, k, v, q_index, weights)
  assert out.shape == q_compact.shape and unused.sum() == 5
  np.testing.assert_allclose(out, token_layout.to_compact(out_rows, layout), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dq, token_layout.to_compact(dq_rows, layout), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dk, dk_rows, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dv, dv_rows, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out)[0, unused], 0)
  np.testing.assert_array_equal(np.asarray(dq)[0, unused], 0)
  assert float(jnp.max(jnp.abs(dq))) > 0.1
  cache_k, cache_v = (jnp.swapaxes(x, 1, 2) for x in (k, v))
  cached = cpu_attention.cached_attention(q_compact, cache_k, cache_v, mask, q_index)
  np.testing.assert_allclose(cached, out, rtol=1e-6, atol=1e-6)


def test_training_attention_names_the_shapes_it_cannot_take():
  q, kv = jnp.zeros((2, 5, 6, 16)), jnp.zeros((2, 5, 4, 16))  # 6 query heads over 4 kv heads
  with pytest.raises(ValueError, match=r"H a multiple of Kh.*got q \(2, 5, 6, 16\), k \(2, 5, 4, 16\)"):
    cpu_attention.training_attention(q, kv, kv, jnp.ones((2, 1, 5, 5), bool))


def test_without_a_compiler_it_is_unavailable_and_says_why(tmp_path, monkeypatch):
  monkeypatch.setenv("RANKRAG_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler")
  warnings = []
  monkeypatch.setattr(cpu_build.logging, "warning", lambda msg, *args: warnings.append(msg % args))
  assert cpu_build.available.__wrapped__() is False
  assert len(warnings) == 1 and "no C++ compiler 'no-such-compiler'" in warnings[0]
  assert not list((tmp_path / "kernels").glob("*.so"))
