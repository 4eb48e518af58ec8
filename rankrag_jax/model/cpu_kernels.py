"""C++ kernels on XLA:CPU's thread pool, through `jax.ffi`: `row_matmul.cc` (few-row products over panel-order
kernels, `row_matmul.py`: generate's decode steps), `cpu_attention.cc` (`cached_attention`, attention over the
KV cache: generate's prompts and steps, rerank's scoring) and, with `cpu_attention_grad.cc`, `training_attention`
(training's causal attention, forward and backward). They exist because XLA:CPU runs these small products on one
core, or as many small passes (bench/README.md, sessions 15, 16 and 18).

All are compiled on first use, as one library, with the host's C++ compiler (`$CXX`, else `c++`) into the cache
(`assets.cache_root()`), keyed by their sources, jax's version and the CPU. `available()` says whether that worked;
callers fall back to XLA's ops when it did not (no compiler, another backend).
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from rankrag_jax import assets
from rankrag_jax.model import ops
from rankrag_jax.model.config import LlamaConfig

Array = jax.Array

_SOURCES = tuple(pathlib.Path(__file__).with_name(name)
                 for name in ("row_matmul.cc", "cpu_attention.cc", "cpu_attention_grad.cc"))
_HEADERS = (pathlib.Path(__file__).with_name("cpu_attention.h"),)
# FFI target name -> the handler symbol that registers it.
ROW_MATMUL, ATTENTION = "rankrag_row_matmul", "rankrag_cpu_attention"
ATTENTION_STATS, ATTENTION_GRAD = "rankrag_cpu_attention_stats", "rankrag_cpu_attention_grad"
_HANDLERS = {ROW_MATMUL: "RowMatmulHandler", ATTENTION: "CachedAttentionHandler",
             ATTENTION_STATS: "CachedAttentionWithStatsHandler", ATTENTION_GRAD: "CachedAttentionGradHandler"}


def _cpu_id() -> str:
  """The CPU model and feature flags: the library is compiled with -march=native for this CPU only."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  keys = ("model name", "flags", "Features", "CPU part")
  return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in keys}))


def _compile(library: pathlib.Path) -> None:
  compiler = os.environ.get("CXX", "c++")
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
  with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
    built = pathlib.Path(tmp) / library.name
    cmd = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
           f"-I{jax.ffi.include_dir()}", f"-I{_HEADERS[0].parent}", *map(str, _SOURCES), "-o", str(built)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()[-2000:]}")
    os.replace(built, library)  # atomic: another process sees the whole library or none.


@functools.cache
def available() -> bool:
  """True once the kernels are compiled (or found in the cache) and registered for the CPU backend."""
  if jax.default_backend() != "cpu":
    return False
  key = hashlib.sha256(b"\0".join([*(s.read_bytes() for s in _SOURCES + _HEADERS), jax.__version__.encode(),
                                   _cpu_id().encode()]))
  library = assets.cache_root() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"
  try:
    if not library.exists():
      with assets.exclusive_lock(library.with_suffix(".lock")):
        if not library.exists():
          logging.info("Compiling %s into %s", ", ".join(s.name for s in _SOURCES), library)
          _compile(library)
    loaded = ctypes.cdll.LoadLibrary(str(library))
  except (OSError, RuntimeError) as e:
    logging.warning("CPU kernels unavailable, generation, scoring and training use XLA's ops (decoding ~2x "
                    "slower): %s", e)
    return False
  for target, symbol in _HANDLERS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(loaded, symbol)), platform="cpu")
  return True


def attention_usable(config: LlamaConfig, mesh: Mesh | None = None) -> bool:
  """Whether `cached_attention` and `training_attention` can run a model's attention: f32 activations, a head size
  that is a multiple of 8, at most one device and a CPU one (an FFI call has no sharding rule: XLA would gather its
  operands; a program compiled ahead of time for a TPU has no CPU kernels), the kernels built."""
  one_cpu = mesh is None or (mesh.size == 1 and mesh.devices.flat[0].platform == "cpu")
  return one_cpu and config.dtype == jnp.float32 and config.head_dim % 8 == 0 and available()


def _query_tokens(q: Array, q_index: Array | None, batch: int, length: int, name: str) -> tuple[Array, Array]:
  """q as the kernels take it, [N, H, D] query tokens, and q_index [B, T]: each row position's token (N or more:
  a padding position, no query). Without q_index, q is [B, T, H, D] (the rows' own queries); with it, q is
  [..., H, D] (a token layout's compact tokens, q_index from `token_layout.flat_compact_index`)."""
  if q_index is None:
    if q.ndim != 4 or q.shape[:2] != (batch, length):
      raise ValueError(f"cpu_kernels.{name}: expected q [B, T, H, D] with B, T = {batch}, {length}; got {q.shape}")
    # A numpy constant, not an iota op in every decode step's program.
    return q.reshape(batch * length, *q.shape[2:]), np.arange(batch * length, dtype=np.int32).reshape(batch, length)
  if q_index.shape != (batch, length) or q.ndim < 3:
    raise ValueError(f"cpu_kernels.{name}: expected q [..., H, D] and q_index [B, T] = [{batch}, {length}]; got q "
                     f"{q.shape}, q_index {q_index.shape}")
  return q.reshape(-1, *q.shape[-2:]), q_index.astype(jnp.int32)


def _check_heads(name: str, q: Array, k: Array, v: Array, kv_heads: int, k_form: str, mask: Array,
                 mask_form: tuple):
  """Raises a ValueError naming the shapes unless H is a multiple of Kh, D of 8 and k, v, mask are as named."""
  h, d = q.shape[-2:]
  if not (k.ndim == 4 and k.shape == v.shape and k.shape[-1] == d and h % kv_heads == 0 and d % 8 == 0
          and mask.shape == mask_form):
    raise ValueError(f"cpu_kernels.{name}: expected k and v {k_form} with H a multiple of Kh and D of 8, mask "
                     f"{list(mask_form)}; got q {q.shape}, k {k.shape}, v {v.shape}, mask {mask.shape}")


def cached_attention(q: Array, k: Array, v: Array, mask: Array, q_index: Array | None = None) -> Array:
  """`ops.cached_attention` (q [B, T, H, D], heads-major k, v [B, Kh, S, D], mask [B, 1, T, S]) in f32 on the
  thread pool (`cpu_attention.cc`; needs `available()`). A query row that sees no slot gets zeros. With `q_index`
  [B, T], q and the output are compact query tokens [..., H, D] instead (`_query_tokens`)."""
  b, _, t, s = mask.shape
  queries, q_index = _query_tokens(q, q_index, b, t, "cached_attention")
  _check_heads("cached_attention", q, k, v, k.shape[1], "[B, Kh, S, D]", mask, (b, 1, t, k.shape[2]))
  out = jax.ffi.ffi_call(ATTENTION, jax.ShapeDtypeStruct(queries.shape, jnp.float32))(
      queries.astype(jnp.float32), q_index, k.astype(jnp.float32), v.astype(jnp.float32),
      mask.reshape(b, t, s).astype(jnp.bool_))
  return out.reshape(q.shape)


# Partial sums of dk and dv that `training_attention`'s backward pass keeps apart (one per thread of this
# machine's two cores, and more work items to share out than kv heads x rows alone).
GRAD_PARTS = 2


def _mask_rows(mask: Array) -> Array:
  return mask.reshape(mask.shape[0], mask.shape[2], mask.shape[3]).astype(jnp.bool_)


def _training_attention_forward(q, k, v, mask, q_index):
  b, t = mask.shape[0], mask.shape[2]
  if k.ndim != 4 or k.shape[:2] != (b, t) or k.shape != v.shape:
    raise ValueError(f"cpu_kernels.training_attention: expected k and v [B, T, Kh, D] with B, T = {b}, {t} (mask "
                     f"[B, 1, T, T]); got k {k.shape}, v {v.shape}, mask {mask.shape}")
  queries, q_index = _query_tokens(q, q_index, b, t, "training_attention")
  _check_heads("training_attention", q, k, v, k.shape[2], "[B, T, Kh, D]", mask, (b, 1, t, t))
  keys, values = (jnp.swapaxes(x, 1, 2).astype(jnp.float32) for x in (k, v))
  out, lse = jax.ffi.ffi_call(ATTENTION_STATS, (jax.ShapeDtypeStruct(queries.shape, jnp.float32),
                                                jax.ShapeDtypeStruct((b, queries.shape[1], t), jnp.float32)))(
      queries.astype(jnp.float32), q_index, keys, values, _mask_rows(mask))
  return out.reshape(q.shape), lse


@jax.custom_vjp
def training_attention(q: Array, k: Array, v: Array, mask: Array, q_index: Array | None = None) -> Array:
  """Cache-free attention (training's form): q [B, T, H, D], k and v [B, T, Kh, D], mask [B, 1, T, T] (causal and
  per segment), f32 on the thread pool (`cpu_attention.cc` forward, `cpu_attention_grad.cc` backward; needs
  `available()`). The forward pass keeps its output and each row's softmax log-normaliser (named in
  `ops.ATTENTION_RESIDUALS`, so the "dots" remat policy saves them) and the backward pass recomputes the
  probabilities from them. A query row that sees no key gets zeros and no gradient. With `q_index` [B, T], q and
  the output are compact query tokens [..., H, D] instead (`_query_tokens`).
  """
  return _training_attention_forward(q, k, v, mask, q_index)[0].astype(q.dtype)


def _training_attention_fwd(q, k, v, mask, q_index=None):
  out, lse = _training_attention_forward(q, k, v, mask, q_index)
  out, lse = checkpoint_name(out, ops.ATTENTION_RESIDUALS[0]), checkpoint_name(lse, ops.ATTENTION_RESIDUALS[-1])
  return out.astype(q.dtype), (q, k, v, mask, q_index, out, lse)


def _training_attention_bwd(residuals, d_out):
  q, k, v, mask, q_index, out, lse = residuals
  b, t, kv_heads, d = k.shape
  queries, q_index_rows = _query_tokens(q, q_index, b, t, "training_attention")
  keys, values = (jnp.swapaxes(x, 1, 2).astype(jnp.float32) for x in (k, v))
  parts = jax.ShapeDtypeStruct((GRAD_PARTS, b, kv_heads, t, d), jnp.float32)
  dq, dk, dv = jax.ffi.ffi_call(ATTENTION_GRAD, (jax.ShapeDtypeStruct(queries.shape, jnp.float32), parts, parts))(
      queries.astype(jnp.float32), q_index_rows, keys, values, _mask_rows(mask), out.reshape(queries.shape), lse,
      d_out.reshape(queries.shape).astype(jnp.float32))
  dk, dv = (jnp.swapaxes(x.sum(axis=0), 1, 2) for x in (dk, dv))
  return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


training_attention.defvjp(_training_attention_fwd, _training_attention_bwd)
