"""The one place that chooses how attention is computed (MaxText's `AttentionOp`, Levanter's
`default_attention_type()`). The model calls `attend(...)`; `LlamaConfig.attention_impl` (a Gin setting) names the
implementation:

  auto       resolved from the *target* platform (the mesh's devices, never the host's backend) and dtype:
             TPU -> splash; GPU -> gpu_flash for bf16/f16, xla for f32; CPU -> cpu_ffi when the C++ kernels are
             usable (f32, one device, head size a multiple of 8, a compiler), else blockwise.
             A kernel module absent from this checkout resolves to xla (logged).
  xla        plain XLA forms on every platform: `jax.nn.dot_product_attention`; over a KV cache
             `ops.cached_attention` (a static-index prefill block by block: `ops.prefill_blockwise_attention`).
  blockwise  the XLA forms XLA:CPU runs fastest: causal query blocks of `config.attention_query_block` slots
             (`ops.causal_blockwise_attention`; 0 or >= T: one block, as xla), a decode step per query head
             (`ops.decode_step_attention`), prefills as xla.
  splash     TPU Pallas splash attention (`rankrag_jax.backends.tpu.splash`), cache-free calls only.
  gpu_flash  GPU Pallas flash attention (`rankrag_jax.backends.gpu.flash`), cache-free calls only.
  cpu_ffi    the C++ kernels on XLA:CPU's thread pool (`rankrag_jax.backends.cpu.attention`), with and without a
             KV cache; they read and write compact query tokens in place (no gathers).

splash and gpu_flash take no KV cache: by design a call with one (a scoring prefill over a prefix cache, a decode
step) runs xla's cached form, which every platform compiles. On a CPU target (tests) they run in Pallas interpret
mode. An implementation that cannot run on the target or dtype is a ValueError naming `attention_impl`.
"""

import dataclasses
import functools
import importlib
import importlib.util

import flax.struct
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import Mesh

from rankrag_jax.model import ops
from rankrag_jax.model import token_layout
from rankrag_jax.model.config import ATTENTION_IMPLS, LlamaConfig

Array = jax.Array

# Kernel modules of the platform-specific implementations, imported on first use (module, function).
_KERNEL_MODULES = {"splash": ("rankrag_jax.backends.tpu.splash", "splash_attention"),
                   "gpu_flash": ("rankrag_jax.backends.gpu.flash", "gpu_flash_attention"),
                   "cpu_ffi": ("rankrag_jax.backends.cpu.attention", None)}
# The platforms each implementation compiles for (cpu: splash / gpu_flash in Pallas interpret mode, for tests).
_PLATFORMS = {"xla": None, "blockwise": None, "splash": ("tpu", "cpu"), "gpu_flash": ("gpu", "cuda", "rocm", "cpu"),
              "cpu_ffi": ("cpu",)}


def attention_mask(q_segment_ids: Array, kv_segment_ids: Array, q_offset: Array | int = 0) -> Array:
  """Boolean [B, 1, T, S]: same non-zero segment, and key slot <= query slot (query i sits at q_offset + i)."""
  t, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
  q_slot = q_offset + jnp.arange(t)[:, None]
  causal = jnp.arange(s)[None, :] <= q_slot
  same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (q_segment_ids[:, :, None] != 0)
  return (same & causal[None])[:, None]


@flax.struct.dataclass
class Visibility:
  """Who attends to whom, in the forms the implementations take: the queries' and keys' segment ids (0 =
  padding; segment kernels) and the boolean mask [B, 1, T, S] (mask-based forms; XLA drops it when unused).
  `contiguous` (static): the queries sit at consecutive slots (False after `at_query_slots`)."""
  q_segment_ids: Array
  kv_segment_ids: Array
  mask: Array
  contiguous: bool = flax.struct.field(pytree_node=False, default=True)

  def at_query_slots(self, slots: Array) -> "Visibility":
    """The visibility of the queries at row slots `slots` [B, K] only."""
    return Visibility(jnp.take_along_axis(self.q_segment_ids, slots, axis=1), self.kv_segment_ids,
                      jnp.take_along_axis(self.mask, slots[:, None, :, None], axis=2), contiguous=False)


def visibility(q_segment_ids: Array, kv_segment_ids: Array | None = None, q_offset: Array | int = 0) -> Visibility:
  """Cache-free self-attention (kv_segment_ids None), or queries written at cache slots [q_offset, q_offset + T)
  over a cache whose slots carry `kv_segment_ids` [B, S]."""
  kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
  return Visibility(q_segment_ids, kv_segment_ids, attention_mask(q_segment_ids, kv_segment_ids, q_offset))


# ---------------------------------------------------------------------------------------------------------
# Resolution: attention_impl -> one implementation for a target.

def kernel_module_present(impl: str) -> bool:
  """Whether this checkout has `impl`'s kernel module (splash, gpu_flash, cpu_ffi)."""
  return importlib.util.find_spec(_KERNEL_MODULES[impl][0]) is not None


def resolve(requested: str, platform: str, dtype, *, cpu_ffi_usable: bool = False,
            present=kernel_module_present) -> str:
  """The implementation `requested` ("auto" or a name in ATTENTION_IMPLS) means on `platform` ("cpu", "tpu",
  "gpu"/"cuda"/"rocm") at activation dtype `dtype`. `cpu_ffi_usable`: the CPU kernels can run this model here
  (`backends.cpu.build.attention_usable`). Pure: callers pass what they know of the target."""
  if requested not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {requested!r}")
  dtype = jnp.dtype(dtype)
  if requested == "auto":
    if platform == "tpu":
      choice = "splash"
    elif platform in ("gpu", "cuda", "rocm"):
      choice = "gpu_flash" if dtype in (jnp.bfloat16, jnp.float16) else "xla"
    else:
      choice = "cpu_ffi" if cpu_ffi_usable else "blockwise"
    if choice in _KERNEL_MODULES and not present(choice):
      logging.warning("attention_impl 'auto' on %s: %s is not in this checkout, using xla", platform,
                      _KERNEL_MODULES[choice][0])
      choice = "xla"
    return choice
  platforms = _PLATFORMS[requested]
  if platforms is not None and platform not in platforms:
    raise ValueError(f"attention_impl={requested!r} does not run on a {platform} target (runs on {platforms})")
  if requested == "cpu_ffi" and not cpu_ffi_usable:
    raise ValueError(f"attention_impl='cpu_ffi' cannot run this model here: it needs f32 activations (dtype "
                     f"{dtype.name}), a head size that is a multiple of 8, one CPU device and the kernels built "
                     f"(see the log); use 'blockwise' or 'auto'")
  if requested in _KERNEL_MODULES and not present(requested):
    raise ValueError(f"attention_impl={requested!r} needs {_KERNEL_MODULES[requested][0]}, which this checkout "
                     f"does not have")
  return requested


def target_platform(mesh: Mesh | None = None) -> str:
  """The platform a program will run on: the mesh's devices; inside a trace without one, the mesh set by
  `jax.set_mesh`; else the default device's (a program without a mesh runs there)."""
  if mesh is not None:
    return mesh.devices.flat[0].platform
  abstract = jax.sharding.get_abstract_mesh()
  if not abstract.empty and getattr(abstract, "abstract_device", None) is not None:
    return abstract.abstract_device.platform
  return jax.devices()[0].platform


def _target_devices(mesh: Mesh | None) -> int:
  if mesh is not None:
    return mesh.size
  abstract = jax.sharding.get_abstract_mesh()
  return 1 if abstract.empty else abstract.size


def resolve_for_target(config: LlamaConfig, mesh: Mesh | None = None) -> str:
  """`resolve` of `config.attention_impl` for the mesh's platform (see `target_platform`)."""
  platform = target_platform(mesh)
  usable = False
  if platform == "cpu" and config.attention_impl in ("auto", "cpu_ffi"):
    from rankrag_jax.backends.cpu import build  # pylint: disable=import-outside-toplevel
    usable = build.attention_usable(config, _target_devices(mesh))
  return resolve(config.attention_impl, platform, config.dtype, cpu_ffi_usable=usable)


def for_target(config: LlamaConfig, mesh: Mesh | None = None) -> LlamaConfig:
  """`config` with `attention_impl` resolved for the mesh's platform: what a program for that mesh is built with."""
  return dataclasses.replace(config, attention_impl=resolve_for_target(config, mesh))


# ---------------------------------------------------------------------------------------------------------
# Dispatch.

@functools.cache
def _kernel(impl: str):
  module, function = _KERNEL_MODULES[impl]
  module = importlib.import_module(module)
  return getattr(module, function) if function else module


def attend(q: Array, k: Array, v: Array, vis: Visibility, *, impl: str, query_block: int = 0,
           cache_index: Array | int | None = None, layout: token_layout.TokenLayout | None = None) -> Array:
  """Softmax attention, GQA (H a multiple of Kh), through the implementation `impl` names (module docstring).

  Args:
    q: queries [B, T, H, D] in rows; with `layout`, the compact tokens [S, N, H, D] of those rows
      (`token_layout.to_compact`), and the output is in the same form.
    k, v: without a cache (cache_index None), [B, T, Kh, D], self-attention causal within segments; with one, the
      whole heads-major cache [B, Kh, S, D] (this call's keys and values already written).
    vis: `visibility(...)` of these queries (segment ids and mask).
    impl: a name of ATTENTION_IMPLS; "auto" is resolved here from the mesh in context (`jax.set_mesh`), so a caller
      that knows its mesh resolves first (`for_target`).
    query_block: blockwise's query block (`config.attention_query_block`).
    cache_index: the cache slot of q's first row position (a Python int when static: a prefill); None: no cache.
  Returns:
    [B, T, H, D] (or [S, N, H, D] with layout) in q's dtype.
  """
  if impl == "auto":
    platform = target_platform()
    usable = False
    if platform == "cpu":
      from rankrag_jax.backends.cpu import build  # pylint: disable=import-outside-toplevel
      usable = build.attention_usable_for(q.dtype, q.shape[-1], _target_devices(None))
    impl = resolve(impl, platform, q.dtype, cpu_ffi_usable=usable)
  if impl not in ATTENTION_IMPLS or impl == "auto":
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
  if impl == "cpu_ffi":  # reads and writes the compact tokens in place
    kernels = _kernel("cpu_ffi")
    q_index = None if layout is None else token_layout.flat_compact_index(layout)
    if cache_index is None:
      return kernels.training_attention(q, k, v, vis.mask, q_index)
    return kernels.cached_attention(q, k, v, vis.mask, q_index).astype(q.dtype)
  rows = q if layout is None else token_layout.to_padded(q, layout)
  if cache_index is not None:
    out = _cached(rows, k, v, vis, cache_index, per_head_decode=impl == "blockwise")
  elif impl in ("splash", "gpu_flash"):
    out = _kernel(impl)(rows, k, v, vis.q_segment_ids, interpret=target_platform() == "cpu")
  elif impl == "blockwise" and 0 < query_block < rows.shape[1]:
    out = ops.causal_blockwise_attention(rows, k, v, vis.mask, query_block)
  else:  # GQA: jax.nn.dot_product_attention groups the query heads over the kv_heads.
    out = jax.nn.dot_product_attention(rows, k, v, mask=vis.mask)
  return out if layout is None else token_layout.to_compact(out, layout)


def _cached(q: Array, k: Array, v: Array, vis: Visibility, cache_index, per_head_decode: bool) -> Array:
  """XLA's attention over the heads-major cache: a static-index prefill block by block, a decode step per query
  head (the CPU form, `per_head_decode`), else grouped."""
  if isinstance(cache_index, int) and vis.contiguous and q.shape[1] > ops.PREFILL_QUERY_BLOCK:
    return ops.prefill_blockwise_attention(q, k, v, vis.mask, cache_index, ops.PREFILL_QUERY_BLOCK)
  if per_head_decode and q.shape[1] == 1:
    return ops.decode_step_attention(q, k, v, vis.mask)
  return ops.cached_attention(q, k, v, vis.mask)
