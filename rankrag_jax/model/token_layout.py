"""Token compaction for packed training batches: per-token work on the real tokens only.

A packed [B, T] batch is ~80% real tokens on the Stage-II blend (bench/train_step.py); the rest is padding at row
ends that every projection, MLP, norm and RoPE would compute and differentiate for nothing. With a `TokenLayout`,
the model runs those per-token ops on a compact [S, N] layout (S = data shards, N = a static token budget per
shard, the real tokens of the shard's rows in order) and only attention sees the padded [B, T] rows (its masks and
causal blocks are per row). The two layouts are related by a bijection between real slots and compact indices, so
`to_padded` and `to_compact` are each other's transpose: both directions, and their gradients, are gathers
(XLA would otherwise differentiate a gather into a scatter-add).

Shards: the compact layout keeps each data shard's tokens on that shard. Shard s holds batch rows
[s * B / S, (s + 1) * B / S) (the data sharding of `sharding.data_sharding`), flattened to R * T = B / S * T slots.

N is static (it sets the compiled shapes): the host picks it per batch from the same rows (`tokens_needed`;
training: `training/bucketing.py`, prefills: `prefill_token_budget`), so no real token is ever left out; a few
buckets mean a few compiled programs.

Prefills (generation's prompts, scoring's suffixes) use the same layout with a KV cache: keys and values are
padded back to the rows before they are written, so the cache looks as without a layout.
"""

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@flax.struct.dataclass
class TokenLayout:
  """compact_slots int32 [S, N]: each compact token's slot among its shard's R * T padded slots (unused compact
  tokens point at slot R * T, an appended zero); padded_slots int32 [S, R * T]: each padded slot's compact index
  (padding slots point at N, an appended zero row)."""
  compact_slots: Array
  padded_slots: Array
  rows: int = flax.struct.field(pytree_node=False)


def make_layout(segment_ids: Array, num_shards: int, num_tokens: int) -> TokenLayout:
  """The layout of a [B, T] batch (segment id 0 = padding) over `num_shards` data shards, N = num_tokens."""
  b, t = segment_ids.shape
  if b % num_shards:
    raise ValueError(f"batch of {b} rows does not split over {num_shards} data shards")
  real = (segment_ids != 0).reshape(num_shards, b // num_shards * t)
  slots = real.shape[1]
  rank = jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1
  padded_slots = jnp.where(real & (rank < num_tokens), rank, num_tokens)
  # The first N real slots in order (top_k of a key that ranks real slots first, each group by slot).
  order = jnp.arange(slots, dtype=jnp.int32)
  _, first = jax.lax.top_k(jnp.where(real, 2 * slots - order, slots - order), min(num_tokens, slots))
  compact_slots = jnp.where(jnp.take_along_axis(real, first, axis=1), first, slots)
  if num_tokens > slots:  # a budget above the slot count: the extra compact tokens stay unused
    compact_slots = jnp.pad(compact_slots, ((0, 0), (0, num_tokens - slots)), constant_values=slots)
  return TokenLayout(compact_slots.astype(jnp.int32), padded_slots.astype(jnp.int32), b)


def round_up(n: int, granularity: int, limit: int) -> int:
  """n rounded up to a multiple of `granularity` (at least one), at most `limit`."""
  return min(limit, max(granularity, math.ceil(n / granularity) * granularity))


def tokens_needed(segment_ids: np.ndarray, num_shards: int, num_micro_batches: int = 1) -> int:
  """The most real tokens any (micro-batch, data shard) of this host's [B_local, T] rows holds (host-side).

  The rows split into `num_shards` contiguous blocks (this host's shards, as `make_array_from_process_local_data`
  places them); micro-batch a of a block is its rows a, A + a, 2A + a, ... (`training.step._micro_batches` keeps
  each shard's rows local).
  """
  real = np.asarray(segment_ids) != 0
  b = real.shape[0]
  if b % (num_shards * num_micro_batches):
    raise ValueError(f"{b} rows do not split into {num_shards} shards x {num_micro_batches} micro-batches")
  blocks = real.reshape(num_shards, b // num_shards, -1)
  return int(max(blocks[:, a::num_micro_batches].sum(axis=(1, 2)).max() for a in range(num_micro_batches)))


def prefill_token_budget(segment_ids: np.ndarray, num_shards: int, granularity: int) -> int:
  """A prefill's static compact budget N for right-padded rows [B, T] over `num_shards` data shards: the real
  tokens rounded up to `granularity`; 0 (run on the rows as they are) when that saves nothing or granularity is 0."""
  if granularity < 0:
    raise ValueError(f"compact token granularity must be >= 0, got {granularity}")
  if not granularity:
    return 0
  slots = np.size(segment_ids) // num_shards
  budget = round_up(tokens_needed(segment_ids, num_shards), granularity, slots)
  return 0 if budget >= slots else budget


def _take_rows(x: Array, index: Array) -> Array:
  """x [S, M, ...] with a zero appended along M, gathered at index [S, K] -> [S, K, ...]."""
  x = jnp.concatenate([x, jnp.zeros((x.shape[0], 1) + x.shape[2:], x.dtype)], axis=1)
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _compact(x: Array, layout: TokenLayout) -> Array:
  shards = layout.compact_slots.shape[0]
  return _take_rows(x.reshape((shards, -1) + x.shape[2:]), layout.compact_slots)


def _pad(x: Array, layout: TokenLayout) -> Array:
  padded = _take_rows(x, layout.padded_slots)
  return padded.reshape((layout.rows, -1) + x.shape[2:])


@jax.custom_vjp
def _to_compact(x, layout):
  return _compact(x, layout)


@jax.custom_vjp
def _to_padded(x, layout):
  return _pad(x, layout)


def _zero_cotangent(layout):
  return jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), layout)


_to_compact.defvjp(lambda x, layout: (_compact(x, layout), layout),
                   lambda layout, g: (_pad(g, layout), _zero_cotangent(layout)))
_to_padded.defvjp(lambda x, layout: (_pad(x, layout), layout),
                  lambda layout, g: (_compact(g, layout), _zero_cotangent(layout)))


def to_compact(x: Array, layout: TokenLayout) -> Array:
  """[B, T, ...] -> [S, N, ...]: the real tokens of each shard's rows, in order (unused compact tokens are 0)."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return _compact(x, layout)
  return _to_compact(x, layout)


def to_padded(x: Array, layout: TokenLayout) -> Array:
  """[S, N, ...] -> [B, T, ...]: each compact token back at its slot, padding slots 0."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return _pad(x, layout)
  return _to_padded(x, layout)


def flat_compact_index(layout: TokenLayout) -> Array:
  """int32 [B, T]: each row slot's token among the S * N compact tokens flattened, S * N at padding slots (what
  the CPU attention kernels take as q_index, to read and write the compact tokens in place of the rows)."""
  shards, num_tokens = layout.compact_slots.shape
  per_shard = layout.padded_slots.reshape(shards, layout.rows // shards, -1)
  offsets = jnp.arange(shards, dtype=jnp.int32)[:, None, None] * num_tokens
  flat = jnp.where(per_shard < num_tokens, per_shard + offsets, shards * num_tokens)
  return flat.reshape(layout.rows, -1).astype(jnp.int32)


def take_slots(x: Array, slots: Array, layout: TokenLayout | None = None) -> Array:
  """x at the row slots `slots` int32 [B, K] -> [B, K, ...]: x is [B, T, ...], or compact [S, N, ...] under
  `layout` (where a padding slot gives 0). Each row's gather stays on its data shard."""
  if layout is None:
    return jnp.take_along_axis(x, slots.reshape(slots.shape + (1,) * (x.ndim - 2)), axis=1)
  b, k = slots.shape
  shards = layout.padded_slots.shape[0]
  compact_index = jnp.take_along_axis(layout.padded_slots.reshape(b, -1), slots, axis=1)  # [B, K], N = padding
  return _take_rows(x, compact_index.reshape(shards, -1)).reshape((b, k) + x.shape[2:])
