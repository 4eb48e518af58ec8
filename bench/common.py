"""Shared benchmark plumbing: side-by-side subprocess runs, medians, the matmul FLOP/s probe, peak RSS.

Every benchmark runs "ours" and the reference in separate child processes of one parent run, so each side's
peak RSS is its own and neither warms the other's caches; the parent prints medians and ratios.
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HF_DIR = "/tmp/rankrag_bench/smollm2_135m_instruct_hf"


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


def memory_read_probe(mib: int = 512, repeats: int = 5) -> float:
  """Measured bytes/s of a jitted sum over a `mib` MiB f32 array: the ceiling for a decode step, which reads
  every weight (and its KV cache) once."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((mib * 2 ** 18,), jnp.float32)
  f = jax.jit(jnp.sum)
  times = time_repeats(lambda: f(x).block_until_ready(), repeats, warmup=2)
  return x.nbytes / median(times)


def ceiling_ratio(ref_seconds: float, lower_bound_seconds: float) -> float:
  """The ratio ours/reference would reach if ours ran at the probes' limits (its executed work at 100% of the
  matmul probe, and of the memory probe where a step is bound by reading weights): what a target is held to."""
  return ref_seconds / lower_bound_seconds


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


def ensure_hf_dir(path: str) -> None:
  """Exports SmolLM2-135M-Instruct (the GGUF asset, dequantised to f32) once, so both sides read one file."""
  if not (pathlib.Path(path) / "config.json").is_file():
    subprocess.run([sys.executable, "-m", "rankrag_jax.convert", "--input", "smollm2_135m_instruct",
                    "--output_hf", path], check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                   capture_output=True)


def driver_parser(doc: str, data: str) -> argparse.ArgumentParser:
  """The flags every benchmark shares; scripts add their own before parsing."""
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--side", choices=("parent", "prepare", "ours", "ref"), default="parent")
  parser.add_argument("--hf_dir", default=HF_DIR)
  parser.add_argument("--data", default=data, help="the inputs the prepare child writes, both sides read")
  parser.add_argument("--repeats", type=int, default=2, help="timed calls per child")
  parser.add_argument("--rounds", type=int, default=1, help="ours/ref child runs, alternating")
  parser.add_argument("--torch_threads", type=int, default=2)
  parser.add_argument("--keep_freed_host_memory", default="ours", choices=("ours", "both", "none"),
                      help="which sides keep freed host memory mapped (rankrag_jax/host_memory.py; our commands do it "
                           "by default): ours, both (the reference too, same glibc settings), none")
  parser.add_argument("--concurrent", type=int, default=0,
                      help="run the ours and ref children at the same time (each 2 threads) so that both see the "
                           "same machine load; use on a machine shared with other jobs")
  return parser


def drive(script: str, args, sides: dict, describe) -> tuple[dict, dict] | None:
  """The benchmark's whole flow. As a child (--side=X): runs sides[X](args), prints its JSON, returns None.
  As the parent: exports the weights if needed, runs the prepare child, then `--rounds` rounds of the ours and
  ref children (in turn, or at once with --concurrent), printing `describe(side, result)` per child. Returns
  (prepare's result, {"ours": [results], "ref": [results]})."""
  if args.side != "parent":
    kept = False
    keep_sides = {"ours": ("ours",), "both": ("ours", "ref"), "none": ()}[args.keep_freed_host_memory]
    if args.side in keep_sides:  # first, as our commands do: before any JAX / torch threads exist
      from rankrag_jax import host_memory
      kept = host_memory.keep_freed_host_memory()
    result = sides[args.side](args)
    result["kept_freed_host_memory"] = kept
    emit(result)
    return None
  pathlib.Path(args.data).parent.mkdir(parents=True, exist_ok=True)
  ensure_hf_dir(args.hf_dir)
  child_args = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("side", "rounds", "concurrent")]
  script = str(pathlib.Path(script).resolve())
  prep = run_side(script, "prepare", child_args)
  runs = {"ours": [], "ref": []}
  for r in range(args.rounds):
    if args.concurrent:
      with ThreadPoolExecutor(2) as pool:
        futures = {side: pool.submit(run_side, script, side, child_args) for side in runs}
        results = {side: f.result() for side, f in futures.items()}
    else:
      results = {side: run_side(script, side, child_args) for side in runs}
    for side, res in results.items():
      runs[side].append(res)
      print(f"round {r} {side}: {describe(side, res)} load {res['load']} rss {res['peak_rss_mib']} MiB"
            f"{' (freed host memory kept)' if res['kept_freed_host_memory'] else ''}", flush=True)
  return prep, runs


def pooled_median(results: list[dict], key: str) -> float:
  """The median of `key`'s lists over several children's results; NaN when none has any."""
  values = [t for res in results for t in res.get(key, [])]
  return median(values) if values else float("nan")
