"""Run a one-device attention kernel under the current mesh: `shard_map` over the batch and head axes.

A Pallas kernel is a custom call that XLA's SPMD partitioner cannot split, so a jitted model whose q, k, v are
sharded would gather them onto every device before the call. As MaxText (`tpu_flash_attention`) and Levanter
(splash) do, the kernel instead runs inside `shard_map`, each device on its own rows and heads. The in/out specs
are the activations' own logical specs (model/axes.py) resolved by the Flax rules in force
(`training.step.sharding_context` sets them with the mesh), so the kernel's sharding follows the rules, never
a second table. Rows and heads are independent in self-attention; the sequence is not (a query needs every earlier
key of its row), so a rule that shards `activation_length` is an error here, not a silent all-gather.
"""

from collections.abc import Callable
import math

from flax import linen as nn
import jax
from jax.sharding import PartitionSpec

from rankrag_jax.model import axes

Array = jax.Array

Q_AXES = (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, axes.ACT_HEAD_DIM)
KV_AXES = (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, axes.ACT_HEAD_DIM)


def _mesh_axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry (None, an axis name, or a tuple of them) as a tuple of axis names."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def kernel_partition_specs(mesh, q_shape: tuple[int, ...], kv_heads: int,
                           kernel: str) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec]:
  """(q/output spec, k/v spec, segment-ids spec) for `kernel` under `mesh` and the Flax logical rules in force.

  Raises ValueError naming the logical axis when the rules shard something the kernel needs whole (the sequence,
  the head dimension), shard query and key/value heads differently (a device's query heads would not sit with
  their key/value group), or split a dimension unevenly."""
  q_spec, kv_spec = nn.logical_to_mesh_axes(Q_AXES), nn.logical_to_mesh_axes(KV_AXES)
  size = lambda entry: math.prod(mesh.shape[name] for name in _mesh_axes(entry))
  for spec, names in ((q_spec, Q_AXES), (kv_spec, KV_AXES)):
    for entry, name in zip(spec, names):
      unknown = [a for a in _mesh_axes(entry) if a not in mesh.shape]
      if unknown:
        raise ValueError(f"{kernel}: the logical rule for {name!r} names mesh axes {unknown} absent from the "
                         f"mesh {dict(mesh.shape)}")
  for logical, entry in ((axes.LENGTH, q_spec[1]), (axes.ACT_HEAD_DIM, q_spec[3]), (axes.ACT_HEAD_DIM, kv_spec[3])):
    if size(entry) > 1:
      raise ValueError(f"{kernel}: the logical rules shard {logical!r} over mesh axes {_mesh_axes(entry)}; this "
                       f"kernel needs whole sequences and heads on each device (sequence parallelism is not "
                       f"supported): map {logical!r} to None in the rules")
  if _mesh_axes(q_spec[0]) != _mesh_axes(kv_spec[0]):
    raise ValueError(f"{kernel}: q and k/v rows are sharded differently ({q_spec[0]} vs {kv_spec[0]})")
  if size(q_spec[2]) > 1 or size(kv_spec[2]) > 1:
    if _mesh_axes(q_spec[2]) != _mesh_axes(kv_spec[2]):
      raise ValueError(f"{kernel}: {axes.ACT_HEADS!r} -> {q_spec[2]} but {axes.ACT_KV_HEADS!r} -> {kv_spec[2]}; "
                       f"GQA needs each device's query heads beside their key/value heads: shard both over the "
                       f"same mesh axes")
  batch, heads, head_shards = q_shape[0], q_shape[2], size(q_spec[2])
  if batch % size(q_spec[0]):
    raise ValueError(f"{kernel}: batch {batch} does not divide over {axes.BATCH!r} -> {q_spec[0]} "
                     f"({size(q_spec[0])} shards)")
  if heads % head_shards or kv_heads % head_shards:
    raise ValueError(f"{kernel}: {heads} query / {kv_heads} key-value heads do not divide over "
                     f"{axes.ACT_HEADS!r} -> {q_spec[2]} ({head_shards} shards)")
  segment_spec = PartitionSpec(q_spec[0], None)
  return PartitionSpec(*q_spec), PartitionSpec(*kv_spec), segment_spec


def check_self_attention_shapes(q: Array, k: Array, v: Array, segment_ids: Array, kernel: str) -> None:
  """The self-attention contract's shapes, with an error naming the argument that breaks it."""
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"{kernel}: want q [B, T, H, D] and k, v [B, T, Kh, D]; got q {q.shape}, k {k.shape}, "
                     f"v {v.shape}")
  if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
    raise ValueError(f"{kernel}: k/v {k.shape} must share q's batch, length and head_dim {q.shape} "
                     f"(self-attention without a KV cache)")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{kernel}: query heads {q.shape[2]} are not a multiple of key/value heads {k.shape[2]}")
  if segment_ids.shape != q.shape[:2]:
    raise ValueError(f"{kernel}: segment_ids {segment_ids.shape} must be [B, T] = {q.shape[:2]}")


def shard_over_batch_and_heads(local_kernel: Callable[[Array, Array, Array, Array], Array], q: Array,
                               k: Array, v: Array, segment_ids: Array, kernel: str) -> Array:
  """`local_kernel(q, k, v, segment_ids)` on each device's rows and heads under the current mesh (directly when
  no mesh is set). `kernel` names it in errors."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local_kernel(q, k, v, segment_ids)
  q_spec, kv_spec, segment_spec = kernel_partition_specs(mesh, q.shape, k.shape[2], kernel)
  # check_vma=False: a pallas_call carries no varying-manual-axes annotation for shard_map to check.
  sharded = jax.shard_map(local_kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec),
                          out_specs=q_spec, check_vma=False)
  return sharded(q, k, v, segment_ids)
