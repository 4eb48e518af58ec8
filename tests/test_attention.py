"""The attention dispatcher (model/attention.py): 'auto' resolves from the target platform and dtype, a choice that
cannot run says so naming attention_impl, and every implementation computes the same attention as a plain
float64 softmax written here, with packed segments, padding, GQA, compact queries and a KV cache."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankrag_jax.model import attention
from rankrag_jax.model import config as config_lib
from rankrag_jax.model import token_layout

# Every implementation but "auto"; splash and gpu_flash run (Pallas interpret mode on CPU) where their modules exist.
IMPLS = [impl for impl in config_lib.ATTENTION_IMPLS if impl != "auto"]


def _skip_absent(impl):
  if impl in ("splash", "gpu_flash", "cpu_ffi") and not attention.kernel_module_present(impl):
    pytest.skip(f"{impl}'s kernel module is not in this checkout")


def test_auto_resolves_from_the_target_platform_and_dtype():
  present = lambda impl: True
  resolve = lambda platform, dtype, **kw: attention.resolve("auto", platform, dtype, present=present, **kw)
  assert resolve("tpu", jnp.bfloat16) == "splash" and resolve("tpu", jnp.float32) == "splash"
  assert resolve("gpu", jnp.bfloat16) == "gpu_flash" and resolve("cuda", jnp.float16) == "gpu_flash"
  assert resolve("gpu", jnp.float32) == "xla"  # the fused GPU kernel is for half precision
  assert resolve("cpu", jnp.float32, cpu_ffi_usable=True) == "cpu_ffi"
  assert resolve("cpu", jnp.float32, cpu_ffi_usable=False) == "blockwise"
  # A kernel module this checkout lacks: the portable XLA form.
  assert attention.resolve("auto", "tpu", jnp.bfloat16, present=lambda impl: False) == "xla"


@pytest.mark.parametrize("impl, platform, dtype, match", [
    ("cpu_ffi", "tpu", jnp.float32, "attention_impl='cpu_ffi' does not run on a tpu"),
    ("splash", "gpu", jnp.bfloat16, "attention_impl='splash' does not run on a gpu"),
    ("gpu_flash", "tpu", jnp.bfloat16, "attention_impl='gpu_flash' does not run on a tpu"),
    ("cpu_ffi", "cpu", jnp.bfloat16, "attention_impl='cpu_ffi' cannot run this model here.*bfloat16"),
    ("flash", "cpu", jnp.float32, "attention_impl must be one of"),
])
def test_an_implementation_that_cannot_run_is_a_clear_error(impl, platform, dtype, match):
  with pytest.raises(ValueError, match=match):
    attention.resolve(impl, platform, dtype, cpu_ffi_usable=False, present=lambda impl: True)


def test_config_refuses_an_unknown_attention_impl_naming_the_field():
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    config_lib.tiny(attention_impl="flash")


def test_the_target_is_the_mesh_platform_not_the_host():
  # A TPU mesh seen from this CPU host (as train_compile compiles): splash, or xla where the module is absent.
  tpu_mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="tpu")] * 4), size=4)
  assert attention.target_platform(tpu_mesh) == "tpu"
  resolved = attention.for_target(config_lib.tiny(dtype=jnp.bfloat16), tpu_mesh).attention_impl
  assert resolved == ("splash" if attention.kernel_module_present("splash") else "xla")
  # Inside a trace, the mesh set by jax.set_mesh decides.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  seen = []
  with jax.set_mesh(mesh):
    jax.jit(lambda x: seen.append(attention.target_platform()) or x)(1.0)
  assert seen == ["cpu"]


def _packed_inputs(seed, heads=6, kv_heads=2, head_dim=8, scale=3.0):
  """Two rows of 11 slots: three packed segments; one segment then padding. Large q/k so attention is peaked."""
  rng = np.random.default_rng(seed)
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3], [1] * 7 + [0] * 4], jnp.int32)
  q = jnp.asarray(rng.normal(size=(2, 11, heads, head_dim)) * scale, jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 11, kv_heads, head_dim)) * scale, jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 11, kv_heads, head_dim)), jnp.float32)
  return q, k, v, segment_ids


def naive_attention(q, k, v, q_segments, kv_segments, q_slots):
  """float64 softmax attention: q [B, T, H, D], k, v [B, S, Kh, D]; query t at slot q_slots[b, t] sees key s iff
  same non-zero segment and s <= that slot. Rows that see nothing are 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  q_segments, kv_segments, q_slots = (np.asarray(x) for x in (q_segments, kv_segments, q_slots))
  visible = ((q_segments[:, :, None] == kv_segments[:, None, :]) & (q_segments[:, :, None] != 0)
             & (np.arange(k.shape[1])[None, None, :] <= q_slots[:, :, None]))[:, None]
  scores = np.where(visible, scores, -np.inf)
  weights = np.exp(scores - np.max(np.where(visible, scores, -1e300), axis=-1, keepdims=True))
  weights = np.where(visible, weights, 0.0)
  weights /= np.maximum(weights.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhts,bshd->bthd", weights, v)


def _reference_grads(q, k, v, segment_ids, cotangent):
  """Gradients of sum(out * cotangent) over real rows, by autodiff of a plain jnp softmax (f32)."""
  def loss(q, k, v):
    vis = attention.visibility(segment_ids)
    group = q.shape[2] // k.shape[2]
    kk, vv = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.where(vis.mask, jnp.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(q.shape[-1]), -1e30)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), vv)
    return jnp.sum(out * cotangent * (segment_ids != 0)[..., None, None])
  return jax.grad(loss, (0, 1, 2))(q, k, v)


@pytest.mark.parametrize("compact", [False, True], ids=["rows", "compact_queries"])
@pytest.mark.parametrize("impl", IMPLS)
def test_every_implementation_equals_naive_attention_without_a_cache(impl, compact):
  _skip_absent(impl)
  q, k, v, segment_ids = _packed_inputs(0)
  real = np.asarray(segment_ids != 0)
  layout = token_layout.make_layout(segment_ids, 1, int(real.sum()) + 2) if compact else None
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

  def loss(q, k, v):
    queries = q if layout is None else token_layout.to_compact(q, layout)
    out = attention.attend(queries, k, v, attention.visibility(segment_ids), impl=impl, query_block=4,
                           layout=layout)
    out = out if layout is None else token_layout.to_padded(out, layout)
    return jnp.sum(out * cotangent * real[..., None, None]), out

  grads, out = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  want = naive_attention(q, k, v, segment_ids, segment_ids, jnp.broadcast_to(jnp.arange(11), (2, 11)))
  assert np.isfinite(np.asarray(out)).all()  # padding rows too
  np.testing.assert_allclose(np.asarray(out)[real], want[real], atol=2e-5, rtol=0)
  for got, expected in zip(grads, _reference_grads(q, k, v, segment_ids, cotangent)):
    np.testing.assert_allclose(got, expected, atol=5e-5, rtol=0)


@pytest.mark.parametrize("queries, static", [(1, False), (5, False), (70, True)],
                         ids=["decode_step", "traced_prefill", "static_prefill_in_blocks"])
@pytest.mark.parametrize("impl", IMPLS)
def test_every_implementation_equals_naive_attention_over_a_kv_cache(impl, queries, static):
  # Queries written at slots [start, start + T) of a 96-slot heads-major cache: a 16-slot prefix of two segments
  # (row 0 sees segment 1 only), the rest empty (segment 0). splash / gpu_flash run xla's cached form by design.
  _skip_absent(impl)
  rng = np.random.default_rng(2)
  start, slots = 16, 96
  q = jnp.asarray(rng.normal(size=(2, queries, 6, 8)) * 3, jnp.float32)
  k_new, v_new = (jnp.asarray(rng.normal(size=(2, queries, 2, 8)) * s, jnp.float32) for s in (3, 1))
  k_old, v_old = (jnp.asarray(rng.normal(size=(2, start, 2, 8)) * s, jnp.float32) for s in (3, 1))
  kv_segments = np.zeros((2, slots), np.int32)
  kv_segments[:, :start] = [[2] * 6 + [1] * 10, [1] * 16]
  q_segments = np.ones((2, queries), np.int32)
  kv_segments[:, start:start + queries] = q_segments
  k_all = jnp.zeros((2, slots, 2, 8)).at[:, :start].set(k_old).at[:, start:start + queries].set(k_new)
  v_all = jnp.zeros((2, slots, 2, 8)).at[:, :start].set(v_old).at[:, start:start + queries].set(v_new)
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)

  def run(q, k, v, index):
    vis = attention.visibility(jnp.asarray(q_segments), jnp.asarray(kv_segments), q_offset=index)
    return attention.attend(q, k, v, vis, impl=impl, cache_index=index)

  if static:
    got = jax.jit(run, static_argnums=3)(q, heads_major(k_all), heads_major(v_all), start)
  else:
    got = jax.jit(run)(q, heads_major(k_all), heads_major(v_all), jnp.int32(start))
  want = naive_attention(q, k_all, v_all, q_segments, kv_segments, start + np.arange(queries)[None].repeat(2, 0))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_model_logits_agree_under_every_implementation(sharp_tiny_model):
  # The model wiring (compact layout, packed segments) under each implementation, on a model whose attention is
  # peaked (so a wrong mask or order shows): logits equal xla's.
  config, params = sharp_tiny_model
  from rankrag_jax.model import llama  # pylint: disable=import-outside-toplevel
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3], [1] * 7 + [0] * 4], jnp.int32)
  positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2], list(range(11))], jnp.int32)
  tokens = jax.random.randint(jax.random.key(3), (2, 11), 3, 256)
  real = np.asarray(segment_ids != 0)
  forward = jax.jit(lambda cfg, p: llama.Llama(cfg).apply({"params": p}, tokens, positions, segment_ids),
                    static_argnums=0)
  want = forward(dataclasses.replace(config, attention_impl="xla"), params)
  for impl in IMPLS:
    if impl in ("splash", "gpu_flash", "cpu_ffi") and not attention.kernel_module_present(impl):
      continue
    got = forward(dataclasses.replace(config, attention_impl=impl, attention_query_block=4), params)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-4, rtol=0, err_msg=impl)
