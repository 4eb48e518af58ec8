"""Few-row f32 products on XLA:CPU's thread pool, for decode steps: `panel_dot_general` over kernels stored in
8-column panels (`to_panels`).

Why: XLA:CPU computes a decode step's [rows, d] x [d, f] products on one thread, streaming the weights at about
half of what the machine reads; they are most of a step (bench/README.md, session 15). `row_matmul.cc` splits
each product's columns over the intra-op thread pool and reads each thread's weights as one contiguous stream.

The kernel is C++ registered through `jax.ffi`, compiled on first use with the host's C++ compiler (`$CXX`, else
`c++`) into the cache (`assets.cache_root()`), keyed by its source, jax's version and the CPU. `available()` says
whether that worked; callers fall back to XLA's dots when it did not (no compiler, another backend).
"""

import ctypes
import functools
import hashlib
import math
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from absl import logging

from rankrag_jax import assets

Array = jax.Array

# Columns per panel (one 256-bit vector of f32); a panelled kernel's output features must be a multiple of it.
PANEL = 8
# Products with more rows than this run as XLA dots on the restored [K, N] kernel: with many rows Eigen's blocked
# GEMM is faster (so `generate` runs prompts on [K, N] copies). Up to it the kernel is faster than that dot plus
# restoring the kernel (SmolLM2's [576, 1536] at 128 rows: 2.9 vs 4.3 ms; bench/README.md, session 15).
MAX_ROWS = 128
_TARGET = "rankrag_row_matmul"
_SOURCE = pathlib.Path(__file__).with_name("row_matmul.cc")


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
           f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(built)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()[-2000:]}")
    os.replace(built, library)  # atomic: another process sees the whole library or none.


@functools.cache
def available() -> bool:
  """True once the kernel is compiled (or found in the cache) and registered for the CPU backend."""
  if jax.default_backend() != "cpu":
    return False
  key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), jax.__version__.encode(), _cpu_id().encode()]))
  library = assets.cache_root() / "kernels" / f"row_matmul-{key.hexdigest()[:16]}.so"
  try:
    if not library.exists():
      with assets.exclusive_lock(library.with_suffix(".lock")):
        if not library.exists():
          logging.info("Compiling %s into %s", _SOURCE.name, library)
          _compile(library)
    handler = ctypes.cdll.LoadLibrary(str(library)).RowMatmulHandler
  except (OSError, RuntimeError) as e:
    logging.warning("row_matmul unavailable, decode steps use XLA's dots (~2x slower on CPU): %s", e)
    return False
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(handler), platform="cpu")
  return True


def _split(kernel_shape: tuple[int, ...], contract_ndim: int) -> tuple[int, int]:
  return math.prod(kernel_shape[:contract_ndim]), math.prod(kernel_shape[contract_ndim:])


def can_panel(kernel_shape: tuple[int, ...], contract_ndim: int = 1) -> bool:
  return _split(kernel_shape, contract_ndim)[1] % PANEL == 0


def _panel_split(kernel_shape: tuple[int, ...], contract_ndim: int) -> tuple[int, int]:
  k, n = _split(kernel_shape, contract_ndim)
  if n % PANEL:
    raise ValueError(f"row_matmul: a kernel of shape {kernel_shape} has {n} output features, not a multiple of "
                     f"{PANEL}")
  return k, n


def to_panels(kernel: Array, contract_ndim: int = 1) -> Array:
  """A Dense kernel [*in, *out] (contracted over its first `contract_ndim` axes: K inputs, N outputs) with its
  elements in panel order, [N / 8, K, 8], viewed in the kernel's own shape (so Flax modules accept it)."""
  k, n = _panel_split(kernel.shape, contract_ndim)
  return kernel.reshape(k, n // PANEL, PANEL).transpose(1, 0, 2).reshape(kernel.shape)


def from_panels(kernel: Array, contract_ndim: int = 1) -> Array:
  """The inverse of `to_panels`."""
  k, n = _panel_split(kernel.shape, contract_ndim)
  return kernel.reshape(n // PANEL, k, PANEL).transpose(1, 0, 2).reshape(kernel.shape)


def panel_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> Array:
  """`lax.dot_general` (as Flax's Dense and DenseGeneral call it) of activations [..., *in] with a kernel from
  `to_panels`: the thread-pool kernel for up to MAX_ROWS f32 rows, an XLA dot on the restored kernel otherwise."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  n_in = len(rhs_contract)
  if lhs_batch or rhs_batch or tuple(rhs_contract) != tuple(range(n_in)) or \
     tuple(lhs_contract) != tuple(range(lhs.ndim - n_in, lhs.ndim)):
    raise ValueError(f"panel_dot_general: expected a Dense contraction over the kernel's leading axes, got "
                     f"{dimension_numbers}")
  k, n = _panel_split(rhs.shape, n_in)
  lead, features = lhs.shape[:lhs.ndim - n_in], rhs.shape[n_in:]
  rows = math.prod(lead)
  x = lhs.reshape(rows, k)
  if rows <= MAX_ROWS and lhs.dtype == rhs.dtype == jnp.float32 and available():
    out = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((rows, n), jnp.float32))(x, rhs.reshape(n // PANEL, k,
                                                                                                   PANEL))
  else:
    out = jnp.matmul(x, from_panels(rhs, n_in).reshape(k, n), precision=precision,
                     preferred_element_type=preferred_element_type)
  return out.reshape(lead + features)
