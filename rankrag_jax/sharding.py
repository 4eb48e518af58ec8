"""The device mesh and the logical-axis rules that map model axes onto it.

    mesh = make_mesh()                      # axis sizes from Gin: make_mesh.data / .fsdp / .tensor
    rules = logical_axis_rules()            # model/axes.py defaults, overridable in Gin
    shardings = logical_to_sharding(param_logical_axes(cfg), mesh, rules)

Every sharded jit in the project gets its NamedShardings from here (jit + NamedSharding is what pjit is today).
Mistakes (axis sizes that don't fill the devices, rules naming axes the mesh lacks, dimensions that don't divide)
fail here with a message naming the axis, before anything compiles.
"""

from collections.abc import Sequence
import math

import flax.linen as nn
import gin
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rankrag_jax.model import axes


class MeshError(ValueError):
  pass


@gin.configurable
def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all). One size may be -1: it takes what's left."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = {axes.DATA: data, axes.FSDP: fsdp, axes.TENSOR: tensor}
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise MeshError(f"at most one mesh axis may be -1, got {sizes}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise MeshError(f"mesh axis sizes must be positive (or -1), got {sizes}")
  if free:
    if len(devices) % fixed:
      raise MeshError(f"mesh {sizes}: {len(devices)} devices are not divisible by the fixed axes' product {fixed}")
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise MeshError(f"mesh {sizes} has {math.prod(sizes.values())} slots but there are {len(devices)} devices "
                    f"({devices[0].platform}); make data*fsdp*tensor equal the device count")
  shape = tuple(sizes[name] for name in axes.MESH_AXES)
  try:  # topology-aware placement on TPU/GPU (tensor axis on the fastest links); plain reshape elsewhere.
    from jax.experimental import mesh_utils
    device_grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    import numpy as np
    device_grid = np.asarray(devices).reshape(shape)
  return Mesh(device_grid, axes.MESH_AXES)


@gin.configurable
def logical_axis_rules(overrides: Sequence[tuple[str, object]] = ()) -> tuple:
  """model/axes.py RULES with `overrides` (same form) replacing entries of the same logical name."""
  override_names = {name for name, _ in overrides}
  unknown = override_names - {name for name, _ in axes.RULES}
  if unknown:
    raise MeshError(f"logical_axis_rules.overrides names unknown logical axes {sorted(unknown)}; "
                    f"known: {sorted(name for name, _ in axes.RULES)}")
  return tuple(overrides) + tuple(rule for rule in axes.RULES if rule[0] not in override_names)


def validate_rules(mesh: Mesh, rules: Sequence[tuple[str, object]]) -> None:
  """Every mesh axis a rule names must exist in the mesh."""
  for logical, mesh_axes in rules:
    names = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    missing = [n for n in names if n not in mesh.axis_names]
    if missing:
      raise MeshError(f"logical axis rule {logical!r} -> {mesh_axes!r} names mesh axes {missing} that the mesh "
                      f"{dict(mesh.shape)} does not have")


def logical_to_sharding(logical_tree, mesh: Mesh, rules) -> object:
  """Maps a pytree of logical PartitionSpecs to NamedShardings (leaves may be PartitionSpec or tuples)."""
  validate_rules(mesh, rules)

  def to_sharding(spec):
    spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec(*spec)
    return NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules))

  return jax.tree.map(to_sharding, logical_tree,
                      is_leaf=lambda x: isinstance(x, PartitionSpec) or (isinstance(x, tuple) and
                                                                         all(isinstance(a, (str, type(None)))
                                                                             for a in x)))


def check_divisible(shapes, shardings, what: str = "parameter") -> None:
  """Raises MeshError naming the first array whose dimension doesn't divide by its mesh axes' size."""
  flat_shapes, _ = jax.tree_util.tree_flatten_with_path(shapes)
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, shape), sharding in zip(flat_shapes, flat_shardings):
    dims = shape.shape if hasattr(shape, "shape") else shape
    for dim, mesh_axes in zip(dims, sharding.spec):
      if mesh_axes is None:
        continue
      names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
      size = math.prod(sharding.mesh.shape[n] for n in names)
      if dim % size:
        raise MeshError(f"{what} {jax.tree_util.keystr(path)} with shape {tuple(dims)}: dimension {dim} is sharded "
                        f"over mesh axes {names} of total size {size}, which does not divide it; change the mesh "
                        f"or the logical_axis_rules")


def data_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Sharding for [batch, length, ...] input arrays: batch over the data-parallel axes."""
  spec = (axes.BATCH, axes.LENGTH) + (None,) * (ndim - 2) if ndim >= 2 else (axes.BATCH,)
  return logical_to_sharding(PartitionSpec(*spec), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
