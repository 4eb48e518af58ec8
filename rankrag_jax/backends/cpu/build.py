"""Builds and registers the C++ kernels on XLA:CPU's thread pool (`jax.ffi`): `row_matmul.cc` (few-row products
over panel-order kernels, `row_matmul.py`: generate's decode steps), `cpu_attention.cc` (`attention.cached_attention`:
generate's prompts and steps, rerank's scoring) and, with `cpu_attention_grad.cc`, `attention.training_attention`
(training's causal attention, forward and backward). They exist because XLA:CPU runs these small products on one
core, or as many small passes (bench/README.md, sessions 15, 16 and 18).

All are compiled on first use, as one library, with the host's C++ compiler (`$CXX`, else `c++`) into the cache
(`assets.cache_root()`), keyed by their sources, jax's version and the CPU. `available()` says whether that worked
(`model/attention.py` resolves attention_impl="auto" to XLA's forms when it did not); every kernel wrapper calls
`require()` before its first `ffi_call`, so a kernel is registered wherever it can first be called.
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
from absl import logging

from rankrag_jax import assets
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
  try:
    jax.devices("cpu")
  except RuntimeError:  # no CPU backend to register the handlers with
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


def require() -> None:
  """Builds and registers the kernels (once per process), or raises a RuntimeError saying they cannot be had."""
  if not available():
    raise RuntimeError("the CPU kernels are unavailable (no C++ compiler or no CPU backend; the log says why): "
                       "use attention_impl='blockwise' or 'auto'")


def attention_usable_for(dtype, head_dim: int, num_devices: int = 1) -> bool:
  """Whether the attention kernels can run attention at activation `dtype` with heads of `head_dim` on a program of
  `num_devices` CPU devices: f32, a head size that is a multiple of 8, one device (an FFI call has no sharding
  rule: XLA would gather its operands), the kernels built."""
  return num_devices == 1 and jnp.dtype(dtype) == jnp.float32 and head_dim % 8 == 0 and available()


def attention_usable(config: LlamaConfig, num_devices: int = 1) -> bool:
  """`attention_usable_for` a model's activations."""
  return attention_usable_for(config.dtype, config.head_dim, num_devices)
