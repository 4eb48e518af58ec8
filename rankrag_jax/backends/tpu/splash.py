"""Pallas splash attention (TPU) for packed training rows: causal within segments, GQA without repeated K/V.

`splash_attention(q, k, v, segment_ids)` is the cache-free self-attention of the model's contract
(model/llama.py): a query attends to a key iff both carry the same non-zero segment id and the key's slot is not
after the query's. Splash takes exactly that as a static causal mask AND-ed with segment ids, skips the blocks
the causal mask empties (about half of a long row's T x T square), and has its own backward kernels.

The kernel works on one device's [heads, T, D] per row; `kernel_sharding.shard_over_batch_and_heads` runs it under
the mesh (shard_map over the batch and head axes, as MaxText's `tpu_flash_attention` does). Splash's query heads
h use key/value head h // (H / Kh), the same grouping as `jax.nn.dot_product_attention`, so K and V enter with
their own Kh heads. Splash sets no softmax scale (the caller scales q) and lets padding slots (segment 0) attend
each other like any segment: their rows are finite, and are zeroed here. Rows whose length is not a multiple of
the block are padded with segment-0 slots (a padded query attends at least itself, so no row is empty).

With `interpret=True` the Pallas kernels run on any backend (the CPU tests' parity check against XLA).

Nothing here is Gin-configurable: the dispatcher imports a kernel module at its first use, inside a trace, after
Gin's config is locked, and registering a configurable then is an error. Tile sizes are `SplashBlocks`' defaults.
"""

import dataclasses
import functools
import math

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel

from rankrag_jax.backends import kernel_sharding
from rankrag_jax.model import ops

Array = jax.Array

# TPU lanes: splash's key blocks must be multiples of 128, so rows are padded to at least that.
_LANES = 128


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
  """Splash's tile sizes (clamped to the padded row length). 512 everywhere is MaxText's default for v5p;
  `fused_backward` computes dQ, dK and dV in one kernel (fewer passes over K/V, more memory)."""
  block_q: int = 512
  block_kv: int = 512
  block_kv_compute: int = 512
  block_backward: int = 512
  fused_backward: bool = False

  def __post_init__(self):
    for field in ("block_q", "block_kv", "block_kv_compute", "block_backward"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0 or value % _LANES:
        raise ValueError(f"SplashBlocks.{field} must be a positive multiple of {_LANES}, got {value!r}")
    if self.block_kv % self.block_kv_compute:
      raise ValueError(f"SplashBlocks.block_kv ({self.block_kv}) must be a multiple of block_kv_compute "
                       f"({self.block_kv_compute})")


# Matmuls of [block_q, D] x [D, block_kv] size per computed block, by splash phase: the forward computes scores
# and P.V; the dQ kernel recomputes the scores, dP = dO.V^T and dQ = dS.K; the dK/dV kernel recomputes the scores
# and dP, then dV = P^T.dO and dK = dS^T.Q (a fused backward also dQ: counted as separate, the default).
_MATMULS_PER_PHASE = {"fwd": 2, "dq": 3, "dkv": 4}


def _cost_estimate(name: str, grid, args) -> pl.CostEstimate | None:
  """XLA's cost of one splash pallas_call: its matmul FLOPs over the blocks a causal mask leaves (n(n+1)/2 of
  n x n), one exp per computed score, and q/k/v/out read or written once per pass over them."""
  phase = name.split("_")[2] if name.startswith("splash_") else None
  if phase not in _MATMULS_PER_PHASE or len(args) < 6:
    return None
  q, k = args[3], args[4]
  heads, q_len, head_dim = q.shape
  kv_len, blocks = k.shape[-2], grid[-1]
  visible = q_len * kv_len * (blocks + 1) / (2 * blocks)
  flops = 2 * heads * visible * head_dim * _MATMULS_PER_PHASE[phase]
  io_bytes = sum(x.size * x.dtype.itemsize for x in args[3:6]) * (3 if phase != "fwd" else 2)
  return pl.CostEstimate(flops=int(flops), transcendentals=int(heads * visible), bytes_accessed=int(io_bytes))


class _PallasWithSplashCosts:
  """`jax.experimental.pallas` as splash's module sees it, except that each splash pallas_call carries a cost
  estimate. Splash (jax 0.10.2) gives its kernels none, so XLA's cost model and its latency-hiding scheduler took
  them as free: an 8B-shaped splash forward + backward compiled for v5p to 2.5e8 FLOPs and 0.5 ms, against
  4.8e11 FLOPs of attention (the scheduler then has no kernel time to hide the FSDP all-gathers behind, and
  train_compile's step time would leave attention out). With the estimate XLA times the kernel by its own
  roofline, as it times its own matmuls."""

  def __getattr__(self, attribute):
    return getattr(pl, attribute)

  @staticmethod
  def pallas_call(kernel, *args, name=None, cost_estimate=None, grid_spec=None, **kwargs):
    call = pl.pallas_call(kernel, *args, name=name, cost_estimate=cost_estimate, grid_spec=grid_spec, **kwargs)
    if cost_estimate is not None or name is None or grid_spec is None:
      return call

    def with_estimate(*call_args):
      estimate = _cost_estimate(name, grid_spec.grid, call_args)
      if estimate is None:
        return call(*call_args)
      return pl.pallas_call(kernel, *args, name=name, cost_estimate=estimate, grid_spec=grid_spec,
                            **kwargs)(*call_args)
    return with_estimate


# Splash looks `pl.pallas_call` up in its module at every call, forward and backward (the backward kernels are
# traced when the gradient is, outside any scope we could hold), so the estimate goes in at the module.
splash_attention_kernel.pl = _PallasWithSplashCosts()


def padded_length(length: int, blocks: SplashBlocks) -> int:
  """The row length the kernel runs at: a multiple of every (clamped) block."""
  lanes = -(-length // _LANES) * _LANES
  step = math.lcm(*(min(b, lanes) for b in (blocks.block_q, blocks.block_kv, blocks.block_backward)))
  return -(-length // step) * step


def _kernel(heads: int, length: int, blocks: SplashBlocks, interpret: bool):
  """The splash kernel for `heads` query heads over rows of `length` slots (splash caches the mask's numpy
  processing per shape, so the scanned layers' traces share it). Its residuals carry ops.ATTENTION_RESIDUALS'
  output name, so a remat policy that keeps them (`dots`) spares the backward pass a forward kernel."""
  clamp = lambda b: min(b, length)
  backward = clamp(blocks.block_backward)
  sizes = splash.BlockSizes(
      block_q=clamp(blocks.block_q), block_kv=clamp(blocks.block_kv),
      block_kv_compute=clamp(blocks.block_kv_compute),
      block_q_dkv=backward, block_kv_dkv=backward, block_kv_dkv_compute=backward,
      block_q_dq=None if blocks.fused_backward else backward,
      block_kv_dq=None if blocks.fused_backward else backward,
      use_fused_bwd_kernel=blocks.fused_backward)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(heads)])
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                residual_checkpoint_name=ops.ATTENTION_RESIDUALS[0], interpret=interpret)


def _splash_one_device(q: Array, k: Array, v: Array, segment_ids: Array, *, blocks: SplashBlocks,
                       interpret: bool) -> Array:
  """q [B, T, H, D], k/v [B, T, Kh, D], segment_ids [B, T] (this device's rows and heads) -> [B, T, H, D]."""
  b, t, h, d = q.shape
  length = padded_length(t, blocks)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, length - t)] + [(0, 0)] * (x.ndim - 2))
  segment_ids = segment_ids.astype(jnp.int32)
  # Splash computes softmax(q k^T) unscaled.
  q = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype)
  heads_major = lambda x: jnp.swapaxes(pad(x), 1, 2)  # [B, H, T, D]
  kernel = _kernel(h, length, blocks, interpret)
  row = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
  out = jax.vmap(row)(heads_major(q), heads_major(k), heads_major(v), pad(segment_ids))
  out = jnp.swapaxes(out, 1, 2)[:, :t]
  return jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, *, interpret: bool = False,
                     blocks: SplashBlocks | None = None) -> Array:
  """Causal self-attention within packed segments on TPU. q [B, T, H, D]; k, v [B, T, Kh, D]; segment_ids
  int [B, T] (0 = padding). Returns [B, T, H, D] in q's dtype, padding rows zero. Under a mesh it runs per device
  over the batch and head axes of the Flax logical rules (the sequence must not be sharded)."""
  kernel_sharding.check_self_attention_shapes(q, k, v, segment_ids, "splash_attention")
  local = functools.partial(_splash_one_device, blocks=blocks or SplashBlocks(), interpret=interpret)
  return kernel_sharding.shard_over_batch_and_heads(local, q, k, v, segment_ids, "splash_attention")
