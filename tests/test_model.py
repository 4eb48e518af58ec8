"""The Flax Llama's own contracts on a tiny config: KV cache, padding, packing, scan, remat, tied head, RoPE."""

import contextlib
import dataclasses
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankrag_jax.model import config as config_lib
from rankrag_jax.backends.cpu import attention as cpu_attention
from rankrag_jax.backends.cpu import build as cpu_build
from rankrag_jax.backends.cpu import decode as cpu_decode
from rankrag_jax.model import attention
from rankrag_jax.model import llama
from rankrag_jax.model import ops
from rankrag_jax.model import token_layout

ATOL = 1e-5


_init_params = jax.jit(llama.init_params, static_argnums=0)


@pytest.fixture(scope="module")
def tiny():
  config = config_lib.tiny()
  return config, _init_params(config, jax.random.key(0))


def _tokens(seed, shape, vocab=256):
  return jax.random.randint(jax.random.key(seed), shape, 3, vocab, dtype=jnp.int32)


# Jitted with the (hashable, frozen) config static, so each shape compiles once per test session.
@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens, positions=None, segment_ids=None):
  return llama.Llama(config).apply({"params": params}, tokens, positions, segment_ids)


@functools.partial(jax.jit, static_argnums=0)
def _cached_call(config, params, tokens, cache):
  """One cached step on unpadded rows: returns (logits [B, T, V], cache)."""
  model = llama.Llama(config)
  b, t = tokens.shape
  positions = cache["index"] + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  hidden, cache = model.apply({"params": params}, tokens, positions, jnp.ones_like(tokens), cache=cache,
                              method=llama.Llama.hidden_states)
  return model.apply({"params": params}, hidden, method=llama.Llama.logits_from_hidden), cache


def test_kv_cache_prefill_then_single_tokens_equals_full_forward(tiny):
  config, params = tiny
  tokens = _tokens(1, (2, 12))
  full = _forward(config, params, tokens)
  cache = llama.init_cache(config, batch_size=2, max_length=16)
  prefill, cache = _cached_call(config, params, tokens[:, :7], cache)
  pieces = [prefill]
  for i in range(7, 12):
    logits, cache = _cached_call(config, params, tokens[:, i:i + 1], cache)
    pieces.append(logits)
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=ATOL)
  assert int(cache["index"]) == 12


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_unstacked_layers_with_per_layer_cache_equal_the_scanned_forward(tiny, remat_policy):
  config, params = tiny
  config = dataclasses.replace(config, remat_policy=remat_policy)
  tokens = _tokens(10, (2, 12))
  full = _forward(config, params, tokens)
  layers = cpu_decode.unstack_layers(params)
  assert len(layers) == config.num_layers
  cache = llama.init_cache(config, batch_size=2, max_length=16, per_layer=True)
  pieces = []
  for start, end in [(0, 7), (7, 8), (8, 12)]:
    positions = jnp.broadcast_to(jnp.arange(start, end, dtype=jnp.int32), (2, end - start))
    hidden, cache = cpu_decode.unstacked_hidden_states(config, params, layers, tokens[:, start:end], positions,
                                                  jnp.ones((2, end - start), jnp.int32), cache)
    pieces.append(llama.Llama(config).apply({"params": params}, hidden, method=llama.Llama.logits_from_hidden))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=ATOL)
  assert int(cache["index"]) == 12 and len(cache["k"]) == config.num_layers


@pytest.mark.parametrize("compact", [False, True], ids=["rows", "compact_layout"])
def test_last_layer_at_output_slots_only_equals_the_full_forward_there(tiny, compact):
  # A prefill of right-padded rows written after 3 cache slots; outputs wanted at each row's last token and one more.
  config, params = tiny
  tokens = _tokens(11, (2, 9))
  segment_ids = jnp.array([[1] * 9, [1] * 6 + [0] * 3], jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(3, 12, dtype=jnp.int32), (2, 9))
  slots = jnp.array([[8, 2], [5, 0]], jnp.int32)
  layout = token_layout.make_layout(segment_ids, 2, 9) if compact else None
  prefix_cache = lambda per_layer: llama.init_cache(config, 2, 14, per_layer=per_layer) | {"index": 3}
  model = llama.Llama(config)
  full, full_cache = model.apply({"params": params}, tokens, positions, segment_ids, prefix_cache(False),
                                 layout=layout, method=llama.Llama.hidden_states)
  expected = np.take_along_axis(np.asarray(full), np.asarray(slots)[..., None], axis=1)
  stacked, _ = model.apply({"params": params}, tokens, positions, segment_ids, prefix_cache(False), layout=layout,
                           output_slots=slots, method=llama.Llama.hidden_states)
  layers = cpu_decode.unstack_layers(params)
  pruned, cache = cpu_decode.unstacked_hidden_states(config, params, layers, tokens, positions, segment_ids,
                                                prefix_cache(True), layout=layout, output_slots=slots)
  assert pruned.shape == stacked.shape == (2, 2, config.hidden_size)
  np.testing.assert_allclose(stacked, expected, atol=ATOL)
  np.testing.assert_allclose(pruned, expected, atol=ATOL)
  # The last layer still wrote every token's keys and values (the decode steps attend to them).
  np.testing.assert_allclose(np.stack(cache["k"]), full_cache["k"], atol=ATOL)
  np.testing.assert_allclose(np.stack(cache["v"]), full_cache["v"], atol=ATOL)


def test_query_slots_without_a_cache_are_refused(tiny):
  config, params = tiny
  x = jnp.zeros((1, 4, config.hidden_size))
  sin, cos = llama.rope_sin_cos(jnp.arange(4)[None], config)
  mask = attention.attention_mask(jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  layer_params = cpu_decode.unstack_layers(params)[0]["attn"]
  with pytest.raises(ValueError, match="query_slots needs a KV cache"):
    llama.Attention(config).apply({"params": layer_params}, x, sin, cos, mask, query_slots=jnp.zeros((1, 1), jnp.int32))


def test_greedy_kv_cache_decoding_equals_repeated_full_forwards(tiny):
  config, params = tiny
  prompt = _tokens(2, (1, 5))
  steps = 8
  # Reference: recompute the whole sequence every step. Slots after the current end hold placeholders that
  # causal attention cannot see, so one fixed shape (one compile) serves every step.
  length = prompt.shape[1]
  sequence = jnp.concatenate([prompt, jnp.zeros((1, steps), jnp.int32)], axis=1)
  for step in range(steps):
    next_id = jnp.argmax(_forward(config, params, sequence)[:, length + step - 1], axis=-1)
    sequence = sequence.at[:, length + step].set(next_id)
  # Cached: prefill once, then feed one token at a time.
  cache = llama.init_cache(config, batch_size=1, max_length=prompt.shape[1] + steps)
  logits, cache = _cached_call(config, params, prompt, cache)
  generated = []
  for _ in range(steps):
    next_id = jnp.argmax(logits[:, -1], axis=-1)
    generated.append(int(next_id[0]))
    logits, cache = _cached_call(config, params, next_id[:, None], cache)
  assert generated == [int(t) for t in sequence[0, prompt.shape[1]:]]


def test_left_and_right_padding_do_not_change_real_positions(tiny):
  config, params = tiny
  real = _tokens(3, (1, 6))
  reference = _forward(config, params, real)
  pad = 3
  pad_ids = jnp.zeros((1, pad), jnp.int32)  # any id: padding is masked by segment id 0, not by token.
  ones, zeros = jnp.ones((1, 6), jnp.int32), jnp.zeros((1, pad), jnp.int32)
  positions = jnp.arange(6, dtype=jnp.int32)[None]
  right = _forward(config, params, jnp.concatenate([real, pad_ids + 7], 1),
                   jnp.concatenate([positions, jnp.zeros((1, pad), jnp.int32)], 1),
                   jnp.concatenate([ones, zeros], 1))
  left = _forward(config, params, jnp.concatenate([pad_ids + 9, real], 1),
                  jnp.concatenate([jnp.zeros((1, pad), jnp.int32), positions], 1),
                  jnp.concatenate([zeros, ones], 1))
  np.testing.assert_allclose(right[:, :6], reference, atol=ATOL)
  np.testing.assert_allclose(left[:, pad:], reference, atol=ATOL)


def test_packed_segments_never_attend_across(tiny):
  config, params = tiny
  first, second = _tokens(4, (1, 5)), _tokens(5, (1, 4))
  segment_ids = jnp.array([[1] * 5 + [2] * 4], jnp.int32)
  positions = jnp.array([list(range(5)) + list(range(4))], jnp.int32)
  packed = _forward(config, params, jnp.concatenate([first, second], 1), positions, segment_ids)
  changed = _forward(config, params, jnp.concatenate([first, _tokens(6, (1, 4))], 1), positions, segment_ids)
  np.testing.assert_array_equal(packed[:, :5], changed[:, :5])
  # Each segment alone gives the same logits as inside the pack.
  np.testing.assert_allclose(packed[:, :5], _forward(config, params, first), atol=ATOL)
  np.testing.assert_allclose(packed[:, 5:], _forward(config, params, second), atol=ATOL)


def test_unrolled_layers_equal_scanned(tiny):
  config, params = tiny
  tokens = _tokens(7, (2, 9))
  unrolled = dataclasses.replace(config, scan_layers=False)
  np.testing.assert_allclose(_forward(unrolled, params, tokens), _forward(config, params, tokens), atol=ATOL)


def _loss(params, config, tokens):
  return jnp.mean(jax.nn.log_softmax(_forward(config, params, tokens))[..., 5])


_value_and_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=1)


def _packed_loss(params, config, tokens, positions, segment_ids):
  """Mean log-probability of one token over the real (non-padding) slots only."""
  logp = jax.nn.log_softmax(_forward(config, params, tokens, positions, segment_ids))[..., 5]
  return jnp.sum(jnp.where(segment_ids != 0, logp, 0.0)) / jnp.sum(segment_ids != 0)


@pytest.mark.parametrize("overrides", [{"attention_impl": "blockwise", "attention_query_block": 4},
                                       {"attention_impl": "blockwise", "attention_query_block": 5},
                                       {"attention_impl": "cpu_ffi"}, {"flatten_matmul_tokens": True}],
                         ids=["block4", "block5", "cpu_ffi", "flat_matmuls"])
def test_cpu_reformulations_equal_the_plain_model_on_packed_padded_rows(tiny, overrides):
  config, params = tiny
  config = dataclasses.replace(config, attention_impl="xla")  # the plain model
  # Two rows of 11 slots: three packed segments, and one segment followed by padding (segment id 0).
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3], [1] * 7 + [0] * 4], jnp.int32)
  positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2], list(range(11))], jnp.int32)
  tokens = _tokens(9, (2, 11))
  blockwise = dataclasses.replace(config, **overrides)
  grad_fn = jax.jit(jax.value_and_grad(_packed_loss), static_argnums=1)
  value, grads = grad_fn(params, config, tokens, positions, segment_ids)
  block_value, block_grads = grad_fn(params, blockwise, tokens, positions, segment_ids)
  real = np.asarray(segment_ids != 0)
  np.testing.assert_allclose(_forward(blockwise, params, tokens, positions, segment_ids)[real],
                             _forward(config, params, tokens, positions, segment_ids)[real], atol=ATOL)
  np.testing.assert_allclose(block_value, value, atol=ATOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), block_grads, grads)


def test_block_attention_backward_equals_autodiff_of_the_softmax_form():
  # Packed segments, a padding row tail (queries that see no key: the forward averages the values uniformly) and
  # GQA; 3 query blocks of 4 over 11 slots. The reference differentiates `cached_attention` (jax.nn.softmax) per
  # block; the cotangent is random everywhere, padding included, so every branch of the custom backward counts.
  rng = np.random.default_rng(2)
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3], [1] * 7 + [0] * 4], jnp.int32)
  mask = attention.attention_mask(segment_ids, segment_ids)
  q = jnp.asarray(rng.normal(size=(2, 11, 6, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 11, 2, 8)), jnp.float32) for _ in range(2))
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def softmax_blocks(q, k, v):
    keys, values = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    return jnp.concatenate([ops.cached_attention(q[:, a:a + 4], keys[:, :, :a + 4], values[:, :, :a + 4],
                                                 mask[:, :, a:a + 4, :a + 4]) for a in range(0, 11, 4)], axis=1)

  out, vjp = jax.vjp(lambda q, k, v: ops.causal_blockwise_attention(q, k, v, mask, 4), q, k, v)
  expected, expected_vjp = jax.vjp(softmax_blocks, q, k, v)
  np.testing.assert_allclose(out, expected, atol=1e-6)
  for got, want in zip(vjp(d_out), expected_vjp(d_out)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  # bf16 inputs (a TPU/GPU dtype): outputs and gradients keep it.
  half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out, vjp = jax.vjp(lambda q, k, v: ops.causal_blockwise_attention(q, k, v, mask, 4), *half)
  assert [g.dtype for g in (out, *vjp(d_out.astype(jnp.bfloat16)))] == [jnp.bfloat16] * 4


def test_dots_remat_keeps_the_training_attention_statistics():
  # Saved (not recomputed in the backward pass): the output and softmax statistics of every query block of XLA's
  # blockwise form, and of the CPU kernel's one call.
  q, k = jnp.ones((1, 8, 4, 8)), jnp.ones((1, 8, 2, 8))
  mask = jnp.tril(jnp.ones((8, 8), bool))[None, None]
  assert cpu_build.available()
  for attention_fn, names, count in [(lambda q, k: ops.causal_blockwise_attention(q, k, k, mask, 4),
                                   ("attention_out", "attention_row_max", "attention_row_sum"), 2),
                                  (lambda q, k: cpu_attention.training_attention(q, k, k, mask),
                                   ("attention_out", "attention_lse"), 1)]:
    layer = jax.checkpoint(attention_fn, policy=llama._REMAT_POLICIES["dots"])  # pylint: disable=protected-access
    with contextlib.redirect_stdout(io.StringIO()) as printed:
      jax.ad_checkpoint.print_saved_residuals(layer, q, k)
    for name in names:
      assert printed.getvalue().count(f"named '{name}'") == count, printed.getvalue()
    assert set(names) <= set(ops.ATTENTION_RESIDUALS)


@pytest.mark.parametrize("heads", [6, 2], ids=["gqa", "mha"])
@pytest.mark.parametrize("queries", [1, 5], ids=["decode_step", "prefill"])
def test_cached_attention_equals_dot_product_attention_on_the_usual_layout(queries, heads):
  # GQA (6 query heads over 2 kv heads) or MHA, a mask with holes; the cache is heads-major [B, Kh, S, D].
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(3, queries, heads, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(3, 2, 11, 8)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.random((3, 1, queries, 11)) < 0.7).at[..., 0].set(True)
  expected = jax.nn.dot_product_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask=mask)
  np.testing.assert_allclose(ops.cached_attention(q, k, v, mask), expected, atol=1e-6)
  if queries == 1:
    np.testing.assert_allclose(ops.decode_step_attention(q, k, v, mask), expected, atol=1e-6)


def test_prefill_blockwise_attention_equals_cached_attention_for_real_queries():
  # 150 queries after a 16-slot prefix (3 blocks of 64, the last partial), 2 rows of different lengths, GQA, and
  # a 200-slot cache whose last slots are still empty. Pad queries (segment 0) see no key; their output is unused.
  rng = np.random.default_rng(1)
  start, t, slots, lengths = 16, 150, 200, np.array([150, 97])
  q = jnp.asarray(rng.normal(size=(2, t, 6, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 2, slots, 8)), jnp.float32) for _ in range(2))
  q_segments = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  kv_segments = np.zeros((2, slots), np.int32)
  kv_segments[:, :start], kv_segments[:, start:start + t] = 1, q_segments
  mask = attention.attention_mask(jnp.asarray(q_segments), jnp.asarray(kv_segments), q_offset=start)
  got = ops.prefill_blockwise_attention(q, k, v, mask, start, query_block=64)
  expected = ops.cached_attention(q, k, v, mask)
  real = q_segments.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[real], atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots"])
@pytest.mark.parametrize("impl", ["xla", "blockwise", "cpu_ffi"])
def test_remat_changes_neither_values_nor_grads(tiny, policy, impl):
  config, params = tiny
  config = dataclasses.replace(config, attention_impl=impl, attention_query_block=4)
  tokens = _tokens(8, (2, 9))
  value, grads = _value_and_grad(params, config, tokens)
  remat_value, remat_grads = _value_and_grad(params, dataclasses.replace(config, remat_policy=policy), tokens)
  np.testing.assert_allclose(remat_value, value, atol=ATOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), remat_grads, grads)


def test_tied_head_is_the_embedding_and_untied_has_its_own(tiny):
  config, params = tiny
  tied = dataclasses.replace(config, tie_word_embeddings=True)
  tied_params = _init_params(tied, jax.random.key(1))
  assert "lm_head" not in tied_params and params["lm_head"]["kernel"].shape == (64, 256)
  tokens = _tokens(9, (1, 6))
  model = llama.Llama(tied)
  hidden, _ = jax.jit(functools.partial(model.apply, method=llama.Llama.hidden_states))(
      {"params": tied_params}, tokens)
  np.testing.assert_allclose(_forward(tied, tied_params, tokens),
                             hidden @ tied_params["embed_tokens"]["embedding"].T, atol=ATOL)
  # The untied path projects with lm_head, not the embedding: replacing lm_head with the embedding's
  # transpose turns it into the tied model.
  as_tied = {**tied_params, "lm_head": {"kernel": tied_params["embed_tokens"]["embedding"].T}}
  np.testing.assert_allclose(_forward(config, as_tied, tokens), _forward(tied, tied_params, tokens), atol=ATOL)
  # Projecting onto a subset of the vocabulary picks the same columns.
  ids = jnp.array([3, 17, 200])
  subset = model.apply({"params": tied_params}, hidden, ids, method=llama.Llama.logits_from_hidden)
  np.testing.assert_allclose(subset, _forward(tied, tied_params, tokens)[..., ids], atol=ATOL)


@pytest.mark.parametrize("preset", ["tiny", "llama3_1_8b", "llama3_2_1b", "smollm2_135m"])
def test_rope_frequencies_match_transformers(preset):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=g-import-not-at-top
  from rankrag_jax.convert import hf_config as hf_config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.get_config(preset)
  hf_config = transformers.LlamaConfig(**hf_config_lib.config_to_hf(config))
  rope_type = hf_config.rope_parameters.get("rope_type", "default")
  if rope_type == "default":
    expected = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
  else:
    expected, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    assert attention_scaling == 1.0
  np.testing.assert_allclose(llama.rope_inverse_frequencies(config), expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize("bad", [-1, 64.0])
def test_bad_attention_query_block_is_rejected_naming_the_field(bad):
  with pytest.raises(ValueError, match="attention_query_block"):
    config_lib.tiny(attention_query_block=bad)
