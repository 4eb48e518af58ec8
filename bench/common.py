"""Shared benchmark plumbing: side-by-side subprocess runs, medians, the matmul FLOP/s probe, peak RSS.

Every benchmark runs "ours" and the reference in separate child processes of one parent run, so each side's
peak RSS is its own and neither warms the other's caches; the parent prints medians and ratios.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time


def machine_load() -> dict:
  """1/5/15-minute load averages and core count, recorded next to every number."""
  one, five, fifteen = os.getloadavg()
  return {"load1": round(one, 2), "load5": round(five, 2), "load15": round(fifteen, 2), "cores": os.cpu_count()}


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_repeats(fn, repeats: int, warmup: int = 1) -> list[float]:
  """Wall seconds of `fn()` after `warmup` untimed calls; `fn` must block until its result is ready."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def median(xs):
  return statistics.median(xs)


def matmul_flops_probe(n: int = 2048, repeats: int = 5) -> float:
  """Measured f32 FLOP/s of a square jnp matmul: this machine's practical ceiling for MFU."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  times = time_repeats(lambda: f(a, b).block_until_ready(), repeats, warmup=2)
  return 2 * n ** 3 / median(times)


def run_side(script: str, side: str, args: list[str]) -> dict:
  """Runs `python script --side=SIDE ARGS` and returns the JSON dict it prints on its last line."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, script, f"--side={side}", *args], capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"{script} --side={side} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def emit(result: dict) -> None:
  """A child's last stdout line: its measurements as JSON (peak RSS added)."""
  result["peak_rss_mib"] = round(peak_rss_mib(), 1)
  print(json.dumps(result))
