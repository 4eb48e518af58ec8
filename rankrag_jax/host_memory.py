"""Keeps freed host memory mapped, so XLA:CPU programs do not page-fault their buffers in anew at every execution.

XLA:CPU allocates each execution's temporary buffer with malloc: a SmolLM2 training step's activations are ~2 GB at
4 x 512 tokens. glibc serves any block above 32 MiB with a fresh mmap and unmaps it on free, so every step faults
its ~500,000 4 KiB pages in again, zeroed by the kernel (bench/README.md, session 13: 1.5-2.1 GB of page faults and
1.4-5.6 s of kernel time per step). With one malloc arena, no mmap and no trimming, a freed block stays in the heap
and the next execution reuses it: after the first step of each shape, no faults.

The price: the process keeps its peak heap (what a training or serving process reaches every step anyway), and
all threads share one malloc lock. So it applies to CPU-only hosts: on a host with TPU or GPU devices (and
JAX_PLATFORMS not "cpu"), programs keep their buffers on the devices and the input pipeline's threads should keep
their own arenas.

`keep_freed_host_memory` must run before JAX starts its CPU backend: each thread keeps the malloc arena it first
used, so the commands call it first thing in `main` (`cli.keep_freed_host_memory`; --nokeep_freed_host_memory
turns it off).
"""

import ctypes
import glob
import logging
import os
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_host_memory(enabled: bool = True) -> bool:
  """Sets glibc malloc to one arena, no mmap'd blocks and no trimming. Returns whether it did (False when
  disabled, when the process may run on an accelerator, or when the C library is not glibc)."""
  if not enabled or platform.system() != "Linux" or _accelerator_possible():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
  except (OSError, AttributeError):
    return False
  if _backend_started():
    logging.warning("keep_freed_host_memory: JAX's backend has started; threads that already allocated keep "
                    "unmapping their freed blocks (call it before any JAX computation)")
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim
  return all(libc.mallopt(option, value) == 1 for option, value in settings)


def _accelerator_possible() -> bool:
  """Whether the host has TPU (/dev/accel*, /dev/vfio), NVIDIA or AMD GPU device files, unless JAX is told cpu."""
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return False
  return any(glob.glob(pattern) for pattern in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd"))


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False
