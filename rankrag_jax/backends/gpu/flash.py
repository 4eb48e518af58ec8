"""Fused attention on GPU for packed training rows: JAX's Pallas (Triton) flash attention with segment ids.

`gpu_flash_attention(q, k, v, segment_ids)` is the model's cache-free self-attention contract (causal within
non-zero segments) on `jax.experimental.pallas.ops.gpu.attention.mha`: it takes segment ids and a causal flag
natively, has Triton backward kernels (dQ and dK/dV, no T x T matrix in memory either way), ships with the jax
we pin (no extra wheel, no CUDA-version coupling) and runs in Pallas interpret mode on CPU, where the tests
check it against XLA. The alternatives and why not (experiments/gpu_8xh100.md):
  * `jax.nn.dot_product_attention(implementation="cudnn")` masks by per-row lengths or a dense mask; a dense
    [B, 1, T, T] mask becomes a bias the kernel reads, which gives back the memory a fused kernel saves, and
    cuDNN's packed (THD offsets) form is not in jax's public API.
  * Transformer Engine (MaxText's `cudnn_flash_te`) takes segments but is a separate CUDA build to pin.
The Pallas kernel has no head groups (its K/V index maps follow the query head), so K and V are repeated to H
heads here (query head h reads key/value head h // (H / Kh), jax.nn.dot_product_attention's grouping); the
repeat's gradient sums each group back.

The kernel also lets padding slots (segment 0) attend each other; their rows are zeroed here. Rows are padded
with segment-0 slots to a multiple of the block. Not Gin-configurable, as backends/tpu/splash.py says why.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu_attention

from rankrag_jax.backends import kernel_sharding

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
  """Tile sizes (powers of two, clamped to the row). 128 x 128 forward / 64 backward: the Pallas GPU kernel's
  own forward default; its backward default (32) is raised for H100's larger shared memory."""
  block_q: int = 128
  block_k: int = 128
  block_backward: int = 64

  def __post_init__(self):
    for field in ("block_q", "block_k", "block_backward"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"FlashBlocks.{field} must be a power of two >= 16, got {value!r}")


def _clamped_blocks(length: int, blocks: FlashBlocks) -> tuple[int, int, int, int]:
  """(block_q, block_k, block_backward, padded row length): blocks no longer than the row's power of two."""
  ceiling = max(16, 1 << (length - 1).bit_length())
  block_q, block_k, block_backward = (min(b, ceiling) for b in (blocks.block_q, blocks.block_k,
                                                                blocks.block_backward))
  step = max(block_q, block_k, block_backward)
  return block_q, block_k, block_backward, -(-length // step) * step


def _flash_one_device(q: Array, k: Array, v: Array, segment_ids: Array, *, blocks: FlashBlocks,
                      interpret: bool) -> Array:
  """q [B, T, H, D], k/v [B, T, Kh, D], segment_ids [B, T] (this device's rows and heads) -> [B, T, H, D]."""
  b, t, h, d = q.shape
  group = h // k.shape[2]
  block_q, block_k, block_backward, length = _clamped_blocks(t, blocks)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, length - t)] + [(0, 0)] * (x.ndim - 2))
  segment_ids = segment_ids.astype(jnp.int32)
  k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
  sizes = pallas_gpu_attention.BlockSizes(block_q=block_q, block_k=block_k, block_q_dkv=block_backward,
                                          block_kv_dkv=block_backward, block_q_dq=block_backward,
                                          block_kv_dq=block_backward)
  out = pallas_gpu_attention.mha(pad(q), pad(k), pad(v), pad(segment_ids), sm_scale=d ** -0.5, causal=True,
                                 block_sizes=sizes, interpret=interpret)[:, :t]
  return jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


def gpu_flash_attention(q: Array, k: Array, v: Array, segment_ids: Array, *, interpret: bool = False,
                        blocks: FlashBlocks | None = None) -> Array:
  """Causal self-attention within packed segments on GPU. q [B, T, H, D]; k, v [B, T, Kh, D]; segment_ids
  int [B, T] (0 = padding). Returns [B, T, H, D] in q's dtype, padding rows zero. Under a mesh it runs per device
  over the batch and head axes of the Flax logical rules (the sequence must not be sharded)."""
  kernel_sharding.check_self_attention_shapes(q, k, v, segment_ids, "gpu_flash_attention")
  local = functools.partial(_flash_one_device, blocks=blocks or FlashBlocks(), interpret=interpret)
  return kernel_sharding.shard_over_batch_and_heads(local, q, k, v, segment_ids, "gpu_flash_attention")
