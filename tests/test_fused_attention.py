"""Every attention implementation against one independent masked attention: packed segments, padding, GQA,
forward and gradient; broken variants shown failing the same check; the kernels under a 4-device CPU mesh.

IMPLEMENTATIONS maps a name to `f(q, k, v, segment_ids) -> out` (the model's cache-free self-attention
contract): the kernels called directly, and the dispatcher's other implementations (`model/attention.attend`,
"attend:<impl>"); the tiny model with attention_impl 'splash' / 'gpu_flash' checks the dispatcher's route into
the kernels. The Pallas kernels run in interpret mode here (the same kernel code, executed by XLA:CPU), so
shapes are small.
"""

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankrag_jax.backends import kernel_sharding
from rankrag_jax.backends.cpu import build as cpu_build
from rankrag_jax.backends.gpu import flash
from rankrag_jax.backends.tpu import splash
from rankrag_jax.model import attention
from rankrag_jax.model import config as config_lib
from rankrag_jax.model import llama

# Two packed rows of 144 slots: row 0 holds segments of 50, 60, 1 and 19 tokens then 14 padding slots (a segment
# of one token attends only itself); row 1 is one segment over the whole row. 144 is no multiple of any kernel
# block, so the kernels' row padding runs too.
SEGMENT_LENGTHS = ((50, 60, 1, 19), (144,))
LENGTH, HEADS, KV_HEADS, HEAD_DIM = 144, 4, 2, 32

# Observed max abs differences are ~1e-6 (forward and gradient) in f32, values and gradients being O(1);
# a mask wrong by one slot or one segment boundary moves outputs by ~3 (test_parity_check_catches_broken_mask).
FORWARD_TOLERANCE = 5e-5
GRADIENT_TOLERANCE = 1e-4


def packed_segment_ids(segment_lengths=SEGMENT_LENGTHS, length=LENGTH) -> np.ndarray:
  rows = []
  for lengths in segment_lengths:
    ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    rows.append(np.pad(ids, (0, length - len(ids))))
  return np.stack(rows).astype(np.int32)


def reference_attention(q, k, v, segment_ids, allowed_fn=None):
  """Masked softmax attention written out here, independently of the model and the kernels: query i of a row
  sees key j iff both have the same non-zero segment id and j <= i. Query head h reads key/value head
  h // (H / Kh). Rows that see nothing (padding) are zero. `allowed_fn(segment_ids) -> [B, T, T]` replaces the
  visibility rule (the broken variants)."""
  b, t, h, d = q.shape
  group = h // k.shape[2]
  k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
  if allowed_fn is None:
    slot = jnp.arange(t)
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] != 0)
    allowed = same & (slot[None, None, :] <= slot[None, :, None])
  else:
    allowed = allowed_fn(segment_ids)
  allowed = allowed[:, None]  # [B, 1, T(query), T(key)]
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(d)
  row_max = jnp.max(jnp.where(allowed, scores, -jnp.inf), axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights = jnp.where(allowed, jnp.exp(scores - row_max), 0.0)
  weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision="highest").astype(q.dtype)


def dispatched(impl: str):
  """The dispatcher's `impl` on the cache-free self-attention of packed rows."""
  def attend(q, k, v, segment_ids):
    return attention.attend(q, k, v, attention.visibility(segment_ids), impl=impl, query_block=32)
  return attend


# The kernels themselves, and the dispatcher's other implementations (its route into the kernels is checked on
# the whole model: test_model_with_each_kernel_matches_xla; interpret mode is too slow to run them twice here).
IMPLEMENTATIONS = {
    "splash": functools.partial(splash.splash_attention, interpret=True),
    "gpu_flash": functools.partial(flash.gpu_flash_attention, interpret=True),
    **{f"attend:{impl}": dispatched(impl) for impl in config_lib.ATTENTION_IMPLS
       if impl not in ("auto", "splash", "gpu_flash")},
}
# Implementations that promise zero (not merely finite) padding rows.
ZERO_PADDING_ROWS = ("splash", "gpu_flash")


def _skip_unusable(name):
  if name == "attend:cpu_ffi" and not cpu_build.attention_usable_for(jnp.float32, HEAD_DIM):
    pytest.skip("the C++ CPU kernels are not built here")


def _off_by_one_excluding_diagonal(segment_ids):
  t = segment_ids.shape[1]
  same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] != 0)
  return same & (jnp.arange(t)[None, :] < jnp.arange(t)[:, None])[None]


def _off_by_one_seeing_next_slot(segment_ids):
  t = segment_ids.shape[1]
  same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] != 0)
  return same & (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None] + 1)[None]


def _segment_boundaries_ignored(segment_ids):
  t = segment_ids.shape[1]
  real = (segment_ids[:, :, None] != 0) & (segment_ids[:, None, :] != 0)
  return real & (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None]


BROKEN_VARIANTS = {
    "key slot < query slot (diagonal lost)":
        lambda q, k, v, s: reference_attention(q, k, v, s, _off_by_one_excluding_diagonal),
    "key slot <= query slot + 1 (sees the next token)":
        lambda q, k, v, s: reference_attention(q, k, v, s, _off_by_one_seeing_next_slot),
    "segment boundaries ignored":
        lambda q, k, v, s: reference_attention(q, k, v, s, _segment_boundaries_ignored),
    # A real kernel fed wrong segment ids: all real tokens in one segment (boundaries ignored by the kernel).
    "splash with merged segments":
        lambda q, k, v, s: splash.splash_attention(q, k, v, (s > 0).astype(jnp.int32), interpret=True),
}


def make_inputs(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  b = len(SEGMENT_LENGTHS)
  q = rng.standard_normal((b, LENGTH, HEADS, HEAD_DIM))
  k, v = (rng.standard_normal((b, LENGTH, KV_HEADS, HEAD_DIM)) for _ in range(2))
  segment_ids = packed_segment_ids()
  cotangent = rng.standard_normal((b, LENGTH, HEADS, HEAD_DIM)) * (segment_ids != 0)[:, :, None, None]
  return (*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(segment_ids), jnp.asarray(cotangent, dtype))


def parity_differences(attention, reference=reference_attention, seed=0) -> dict[str, float]:
  """Max abs differences of `attention` against `reference` on the packed rows: the forward output at real
  tokens, and the gradients of <out, cotangent> (cotangent zero at padding) with respect to q, k and v."""
  q, k, v, segment_ids, cotangent = make_inputs(seed)
  real = np.asarray(segment_ids != 0)

  def forward_and_grads(fn):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids), q, k, v)
    return np.asarray(out), [np.asarray(g) for g in vjp(cotangent)]

  (out, grads), (want, want_grads) = forward_and_grads(jax.jit(attention)), forward_and_grads(reference)
  diffs = {"forward": float(np.abs(out - want)[real].max())}
  for name, got, expected in zip(("dq", "dk", "dv"), grads, want_grads):
    diffs[name] = float(np.abs(got - expected).max())
  return diffs


def parity_holds(diffs: dict[str, float]) -> bool:
  return diffs["forward"] <= FORWARD_TOLERANCE and max(diffs["dq"], diffs["dk"], diffs["dv"]) <= GRADIENT_TOLERANCE


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_attention_matches_independent_masked_reference(name):
  _skip_unusable(name)
  diffs = parity_differences(IMPLEMENTATIONS[name])
  print(name, diffs)
  assert parity_holds(diffs), (name, diffs)


@pytest.mark.parametrize("name", sorted(BROKEN_VARIANTS))
def test_parity_check_catches_broken_mask(name):
  diffs = parity_differences(BROKEN_VARIANTS[name])
  print(name, diffs)
  assert diffs["forward"] > 50 * FORWARD_TOLERANCE, (name, diffs)
  assert not parity_holds(diffs)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_padding_rows_finite_and_kernels_zero_them(name):
  _skip_unusable(name)
  q, k, v, segment_ids, _ = make_inputs()
  out = np.asarray(jax.jit(IMPLEMENTATIONS[name])(q, k, v, segment_ids))
  padding = np.asarray(segment_ids == 0)
  assert np.isfinite(out).all()
  if name in ZERO_PADDING_ROWS:
    assert (out[padding] == 0).all()


@pytest.mark.parametrize("name", ["splash", "gpu_flash"])
def test_kernels_keep_bfloat16(name):
  q, k, v, segment_ids, _ = make_inputs(dtype=jnp.bfloat16)
  out = jax.jit(IMPLEMENTATIONS[name])(q, k, v, segment_ids)
  want = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), segment_ids)
  assert out.dtype == jnp.bfloat16
  real = np.asarray(segment_ids != 0)
  assert np.abs(np.asarray(out, np.float32) - np.asarray(want))[real].max() < 0.05


def test_model_with_each_kernel_matches_xla():
  """The tiny Llama (one layer) on packed rows with attention_impl splash / gpu_flash (the dispatcher's route
  into the kernels) against attention_impl xla, at the real tokens. Forward only: the kernels' gradients are
  checked above, and interpret mode makes a model's backward pass slow here."""
  config = config_lib.tiny(num_layers=1, head_dim=16, dtype="float32")
  params = llama.init_params(config, jax.random.key(0))
  segment_ids = jnp.asarray(packed_segment_ids(((40, 30, 20), (96,)), length=96))
  positions = jnp.asarray(np.concatenate([np.arange(n) for n in (40, 30, 20, 6)] + [np.arange(96)]).reshape(2, 96))
  tokens = jax.random.randint(jax.random.key(1), (2, 96), 0, config.vocab_size)
  real = np.asarray(segment_ids != 0)

  def hidden(impl):
    model = llama.Llama(dataclasses.replace(config, attention_impl=impl))
    out, _ = model.apply({"params": params}, tokens, positions, segment_ids, method=model.hidden_states)
    return np.asarray(out)[real]

  want = hidden("xla")
  for impl in ("splash", "gpu_flash"):
    assert np.abs(hidden(impl) - want).max() < 1e-4, impl


def test_shape_errors_name_the_argument():
  q, k, v, segment_ids, _ = make_inputs()
  with pytest.raises(ValueError, match="segment_ids"):
    splash.splash_attention(q, k, v, segment_ids[:, :-1], interpret=True)
  with pytest.raises(ValueError, match="not a multiple of key/value heads"):
    flash.gpu_flash_attention(q[:, :, :3], k, v, segment_ids, interpret=True)
  with pytest.raises(ValueError, match="block_q must be a positive multiple of 128"):
    splash.SplashBlocks(block_q=100)


# The shard_map path: a data=2 x tensor=2 mesh of 4 CPU devices (rows over `data`, heads over `tensor` by the
# default rules), each kernel's output and gradients against the same kernel on one device; a rule that shards
# the sequence is a clear error. XLA_FLAGS must be set before jax starts, hence a child process.
_MESH_SCRIPT = textwrap.dedent("""
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from flax import linen as nn
    from rankrag_jax import sharding
    from rankrag_jax.backends.gpu import flash
    from rankrag_jax.backends.tpu import splash
    from rankrag_jax.model import axes
    from rankrag_jax.training import step

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 144, 4, 32)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 144, 2, 32)), jnp.float32) for _ in range(2))
    seg = np.zeros((2, 144), np.int32); seg[0, :50] = 1; seg[0, 50:110] = 2; seg[1, :] = 1
    seg = jnp.asarray(seg)
    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=2)
    rules = sharding.logical_axis_rules()
    for name, fn in (("splash", splash.splash_attention), ("gpu_flash", flash.gpu_flash_attention)):
      fn = functools.partial(fn, interpret=True)
      loss = lambda q, k, v: jnp.sum(fn(q, k, v, seg) * q)
      run = jax.jit(lambda q, k, v: (fn(q, k, v, seg), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
      one_out, one_grads = run(q, k, v)
      with step.sharding_context(mesh, rules):
        text = run.lower(q, k, v).as_text()
        out, grads = run(q, k, v)
      diff = max(float(jnp.abs(a - b).max()) for a, b in zip((out, *grads), (one_out, *one_grads)))
      manual = "shard_map" in text or "sdy.manual_computation" in text
      print(name, "mesh_vs_one_device", diff, "shard_map_in_program", manual)
    try:
      with step.sharding_context(mesh, sharding.logical_axis_rules([(axes.LENGTH, axes.TENSOR)])):
        jax.jit(functools.partial(splash.splash_attention, interpret=True))(q, k, v, seg)
      print("length_rule_error none")
    except ValueError as error:
      print("length_rule_error", "activation_length" in str(error) and "map 'activation_length' to None" in str(error))
""")


def test_kernels_under_a_mesh_match_one_device_and_refuse_a_sharded_sequence():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  result = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.strip()}
  for name in ("splash", "gpu_flash"):
    assert float(lines[name][1]) <= 1e-5 and lines[name][3] == "True", result.stdout
  assert lines["length_rule_error"] == ["True"], result.stdout


def test_partition_specs_follow_the_logical_rules():
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from rankrag_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.AbstractMesh((2, 1, 2), ("data", "fsdp", "tensor"))
  with nn.logical_axis_rules(sharding.logical_axis_rules()):
    q_spec, kv_spec, segment_spec = kernel_sharding.kernel_partition_specs(mesh, (4, 8, 4, 2), 2, "test")
  assert tuple(q_spec) == (("data", "fsdp"), None, "tensor", None)
  assert tuple(kv_spec) == (("data", "fsdp"), None, "tensor", None)
  assert tuple(segment_spec) == (("data", "fsdp"), None)
  with nn.logical_axis_rules(sharding.logical_axis_rules([("activation_kv_heads", None)])):
    with pytest.raises(ValueError, match="GQA needs each device's query heads beside"):
      kernel_sharding.kernel_partition_specs(mesh, (4, 8, 4, 2), 2, "test")


def test_splash_kernels_carry_a_causal_cost_estimate():
  """XLA's cost model and scheduler see splash's FLOPs (splash.py: _PallasWithSplashCosts): matmuls over the
  n(n+1)/2 blocks a causal mask leaves of n x n, 2 / 3 / 4 per block in the forward / dQ / dK-dV kernels."""
  # pylint: disable=protected-access,g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
  assert isinstance(splash_attention_kernel.pl, splash._PallasWithSplashCosts)
  q = jax.ShapeDtypeStruct((32, 4096, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((8, 4096, 128), jnp.bfloat16)
  args = (None, None, None, q, kv, kv)
  visible = 4096 * 4096 * 9 / 16  # 8 blocks of 512: 36 of 64 computed
  for phase, matmuls in (("fwd", 2), ("dq", 3), ("dkv", 4)):
    estimate = splash._cost_estimate(f"splash_mha_{phase}_segmented", (32, 8, 8), args)
    assert estimate.flops == int(2 * 32 * visible * 128 * matmuls)
  assert splash._cost_estimate("some_other_kernel", (1,), args) is None
