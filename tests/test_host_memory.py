"""keep_freed_host_memory: an XLA:CPU program's temporary buffer stops page-faulting in at every execution."""

import json
import subprocess
import sys

import pytest

from rankrag_jax import host_memory

# A jitted program with a 128 MiB temporary buffer (the first matmul's output [4096, 8192]), run three times; prints the page faults
# (MiB of 4 KiB pages) of the third run.
SCRIPT = """
import json, resource, sys
import jax, jax.numpy as jnp
from rankrag_jax import host_memory
applied = host_memory.keep_freed_host_memory() if sys.argv[1] == "keep" else False
f = jax.jit(lambda x, w, v: jnp.sum((jnp.tanh(x @ w) @ v) ** 2))
x, w, v = jnp.ones((4096, 64)) * 0.01, jnp.ones((64, 8192)) * 0.01, jnp.ones((8192, 64))
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w, v).block_until_ready()
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "fault_mib": faults * 4 / 1024}))
"""


def _third_run_fault_mib(mode: str) -> dict:
  out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_temporary_buffers_stay_mapped_between_executions():
  default, kept = _third_run_fault_mib("default"), _third_run_fault_mib("keep")
  assert default["fault_mib"] > 100  # glibc unmaps the 128 MiB buffer after every run: it faults in again
  assert kept["applied"] and kept["fault_mib"] < 8


def test_disabled_changes_nothing():
  assert host_memory.keep_freed_host_memory(enabled=False) is False


def test_hosts_with_accelerator_devices_keep_their_malloc_arenas(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
  assert host_memory.keep_freed_host_memory() is False
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # told to run on the CPU: the CPU's buffers matter again
  assert host_memory._accelerator_possible() is False
