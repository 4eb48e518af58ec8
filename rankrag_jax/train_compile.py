"""Ahead-of-time compile of the Stage-II train step and the P("True") scoring kernel for a TPU slice.

    python -m rankrag_jax.train_compile --gin_file=gin_configs/stage2.gin \
        --gin_file=gin_configs/models/llama3_8b.gin --gin_file=gin_configs/meshes/tpu_v5p_128.gin \
        --topology=v5p:4x4x4

Runs on a CPU machine: with `libtpu` installed, `jax.experimental.topologies` gives compile-only devices of the
named slice; the train step `train` runs and the scoring kernel `rerank` runs (compile_programs.py: abstract
arguments carrying the Gin mesh's NamedShardings, nothing materialised) are compiled for them, and XLA's TPU
compiler reports per-chip memory and its cost model's time. A 70B model compiles on a 24 GiB machine.
(MaxText's `train_compile.py` idea.)

Three compiles per program:
  * the program as configured (layers scanned, remat as set): its `memory_analysis()` is the per-chip HBM figure,
    and XLA itself refuses (RESOURCE_EXHAUSTED, reported as DOES NOT FIT) a program that exceeds the chip's HBM.
  * the same program with 2 and with 3 layers, unrolled, in a child process (see costs_in_child_process): XLA's
    `cost_analysis()` counts a while loop's body once, whatever its trip count, so the scanned program's FLOPs and
    time estimate cover one layer. Every layer is identical, so cost(L) = cost(2) + (L - 2) * (cost(3) - cost(2))
    is exact up to fusion noise (the test checks it against a 4-layer unrolled compile to 1%).

A bad mesh (axis sizes that don't fill the slice, a rule naming an absent axis, a dimension that doesn't divide)
raises `sharding.MeshError` before anything is compiled.
"""

from collections.abc import Sequence
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import gin
import jax
from jax.experimental import topologies

from rankrag_jax import cli
from rankrag_jax import sharding
from rankrag_jax import compile_programs
from rankrag_jax.training import step as step_lib

_GIB = 2**30

# Paper Stage II (rankrag_facts.md §4): 3,300 steps of 64 sequences.
STAGE2_STEPS = 3300


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  name: str
  hbm_bytes: int
  peak_bf16_flops: float  # per chip, dense


# Public Cloud TPU per-chip figures (HBM, peak dense bf16 FLOP/s).
CHIPS = {
    "v4": ChipSpec("TPU v4", 32 * _GIB, 275e12),
    "v5e": ChipSpec("TPU v5e", 16 * _GIB, 197e12),
    "v5p": ChipSpec("TPU v5p", 95 * _GIB, 459e12),  # libtpu's own compile-time limit is 95.74 GiB
    "v6e": ChipSpec("TPU v6e", 32 * _GIB, 918e12),
}


def chip_spec(topology: str) -> ChipSpec:
  generation = topology.split(":")[0].lower()
  if generation not in CHIPS:
    raise ValueError(f"unknown TPU generation in topology {topology!r}; known: {sorted(CHIPS)} "
                     f"(write e.g. v5p:4x4x4)")
  return CHIPS[generation]


def topology_devices(topology: str) -> list[jax.Device]:
  """Compile-only devices of a TPU slice, e.g. "v5p:4x4x4" (64 chips: Cloud TPU "v5p-128")."""
  chip_spec(topology)
  # Compile-only devices never touch a TPU, so this process need not hold libtpu's one-process lockfile (which
  # any other process that loaded libtpu, e.g. a plain `jax.devices()`, may be holding).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except RuntimeError as e:  # no libtpu, or a topology name libtpu does not know
    raise RuntimeError(f"cannot describe TPU topology {topology!r}: {e}. Needs the libtpu wheel that matches "
                       f"jax {jax.__version__} (pip install 'jax[tpu]=={jax.__version__}').") from e


@dataclasses.dataclass(frozen=True)
class CompiledFigures:
  """XLA's per-chip figures for one workload, plus what follows from them."""
  workload: compile_programs.Workload
  mesh_shape: dict
  num_chips: int
  chip: ChipSpec
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  xla_flops_per_chip: float | None  # layer-extrapolated (module docstring); None when cost analysis is skipped
  estimated_seconds: float | None   # layer-extrapolated XLA cost-model time of one call
  compile_seconds: float

  @property
  def peak_bytes(self) -> int:
    """Live HBM at peak: inputs, outputs not aliased onto donated inputs, scratch, code."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.chip.hbm_bytes

  @property
  def xla_flops(self) -> float:
    return self.xla_flops_per_chip * self.num_chips

  @property
  def mfu(self) -> float:
    """Model FLOPs utilisation implied by XLA's time estimate."""
    return self.workload.model_flops / (self.estimated_seconds * self.num_chips * self.chip.peak_bf16_flops)

  @property
  def stage2_hours(self) -> float:
    return STAGE2_STEPS * self.estimated_seconds / 3600

  @property
  def passages_per_second_per_chip(self) -> float:
    return self.workload.rows / self.estimated_seconds / self.num_chips


def _compile(program: compile_programs.Program, mesh, rules):
  with step_lib.sharding_context(mesh, rules):
    return program.jitted.lower(*program.abstract_args).compile()


def _cost(compiled) -> tuple[float, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)), float(cost.get("optimal_seconds", 0.0))


def layer_extrapolated_cost(workload: compile_programs.Workload, mesh, rules) -> tuple[float, float]:
  """(FLOPs per chip, estimated seconds) of the workload at its num_layers, from unrolled 2- and 3-layer compiles.

  Not 1 and 2: XLA fuses a lone layer differently (its 1 -> 2 increment is ~5% off the per-layer cost).
  """
  costs = []
  for layers in (2, 3):
    config = dataclasses.replace(workload.config, num_layers=layers, scan_layers=False)
    costs.append(_cost(_compile(workload.build(config), mesh, rules)))
  (flops2, secs2), (flops3, secs3) = costs
  extra = workload.config.num_layers - 2
  return flops2 + extra * (flops3 - flops2), secs2 + extra * (secs3 - secs2)


# XLA may also turn an FSDP all-gather + matmul into a loop of partial matmuls ("windowed einsum", collective
# matmul; it does on v5p:2x4x4), whose body cost_analysis() would again count once. The cost compiles therefore
# run without it, in a child process: libtpu reads its flags once per process, and the memory compile must stay
# the program a real run gets.
NO_WINDOWED_EINSUM = ("--xla_tpu_enable_windowed_einsum_for_all_gather=false "
                      "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false")
_COSTS_LINE = "LAYER_EXTRAPOLATED_COSTS "


def costs_in_child_process(topology: str, kinds: Sequence[str]) -> dict[str, tuple[float, float]]:
  """{kind: layer_extrapolated_cost} from `python -m rankrag_jax.train_compile --cost_only` on this Gin config."""
  with tempfile.NamedTemporaryFile("w", suffix=".gin") as config_file:
    config_file.write(gin.config_str())
    config_file.flush()
    env = dict(os.environ, LIBTPU_INIT_ARGS=f"{os.environ.get('LIBTPU_INIT_ARGS', '')} {NO_WINDOWED_EINSUM}")
    child = subprocess.run(
        [sys.executable, "-m", "rankrag_jax.train_compile", f"--topology={topology}",
         f"--gin_file={config_file.name}", f"--cost_only={','.join(kinds)}"],
        env=env, capture_output=True, text=True, check=False)
  lines = [line for line in child.stdout.splitlines() if line.startswith(_COSTS_LINE)]
  if child.returncode or not lines:
    raise RuntimeError(f"the cost compiles failed (exit {child.returncode}):\n{child.stderr[-4000:]}")
  return {kind: tuple(cost) for kind, cost in json.loads(lines[-1][len(_COSTS_LINE):]).items()}


def compile_workload(workload: compile_programs.Workload, program: compile_programs.Program, mesh,
                     chip: ChipSpec, rules, cost: tuple[float, float] | None = None) -> CompiledFigures:
  """Compiles the workload's program for its memory; `cost` = (FLOPs per chip, seconds) from elsewhere."""
  start = time.perf_counter()
  compiled = _compile(program, mesh, rules)
  memory = compiled.memory_analysis()
  flops_per_chip, seconds = cost or (None, None)
  return CompiledFigures(
      workload=workload, mesh_shape=dict(mesh.shape), num_chips=mesh.size, chip=chip,
      argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
      code_bytes=memory.generated_code_size_in_bytes, xla_flops_per_chip=flops_per_chip,
      estimated_seconds=seconds, compile_seconds=time.perf_counter() - start)


@gin.configurable
def compile_for_topology(topology: str, score: bool = True, cost: bool = True,
                         results_jsonl: str | None = None) -> list[CompiledFigures]:
  """Compiles the train step (and the scoring kernel) for `topology`, printing and returning their figures.

  The mesh and logical-axis rules come from Gin (`make_mesh.*`, `logical_axis_rules.overrides`) exactly as
  `train` builds them, but over the slice's compile-only devices; mesh errors raise before any tracing.
  `cost=False` skips the 2- and 3-layer compiles (memory only); `results_jsonl` appends one record per program.
  """
  chip = chip_spec(topology)
  mesh = sharding.make_mesh(devices=topology_devices(topology))
  rules = sharding.logical_axis_rules()
  sharding.validate_rules(mesh, rules)
  workloads = [compile_programs.stage2_train_workload(mesh, rules)]
  if score:
    workloads.append(compile_programs.score_workload(mesh, rules))
  programs = [workload.build(workload.config) for workload in workloads]  # any MeshError before compiling
  costs = costs_in_child_process(topology, [w.kind for w in workloads]) if cost else {}
  figures = []
  for workload, program in zip(workloads, programs):
    record = {"program": workload.name, "topology": topology, "chips": mesh.size, "mesh": dict(mesh.shape),
              "params_b": round(workload.config.num_params / 1e9, 2), "remat": workload.config.remat_policy,
              "description": workload.description}
    try:
      figures.append(compile_workload(workload, program, mesh, chip, rules, cost=costs.get(workload.kind)))
      record.update(figures_record(figures[-1]))
      report = format_figures(figures[-1])
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      # XLA's TPU compiler refuses a program whose buffers exceed the chip's HBM: the answer we came for.
      record.update(fits=False, xla_error=str(e).splitlines()[0])
      report = (f"== {workload.name}: {workload.description}\n   mesh {dict(mesh.shape)} on {mesh.size} x "
                f"{chip.name}: DOES NOT FIT, XLA refuses to compile it: {record['xla_error']}")
    print(report, flush=True)
    if results_jsonl:
      with open(results_jsonl, "a") as f:
        f.write(json.dumps(record) + "\n")
  return figures


def figures_record(fig: CompiledFigures) -> dict:
  """The figures as flat JSON (what experiments/tpu/README.md tabulates)."""
  gib = lambda b: round(b / _GIB, 2)
  record = {"fits": fig.fits, "peak_gib": gib(fig.peak_bytes), "argument_gib": gib(fig.argument_bytes),
            "temp_gib": gib(fig.temp_bytes), "model_flops": fig.workload.model_flops,
            "executed_flops": fig.workload.executed_flops, "compile_seconds": round(fig.compile_seconds)}
  if fig.estimated_seconds is not None:
    record.update(xla_flops=fig.xla_flops, estimated_seconds=fig.estimated_seconds, mfu=fig.mfu)
    if fig.workload.kind == "train":
      record.update(stage2_hours=fig.stage2_hours)
    else:
      record.update(passages_per_second_per_chip=fig.passages_per_second_per_chip)
  return record


def format_figures(fig: CompiledFigures) -> str:
  gib = lambda b: f"{b / _GIB:.2f} GiB"
  work = fig.workload
  lines = [
      f"== {work.name}: {work.description}",
      f"   mesh {fig.mesh_shape} on {fig.num_chips} x {fig.chip.name} (compiled in {fig.compile_seconds:.0f} s)",
      f"   per-chip HBM: arguments {gib(fig.argument_bytes)}, outputs {gib(fig.output_bytes)} "
      f"(aliased to donated inputs {gib(fig.alias_bytes)}), temp {gib(fig.temp_bytes)}, code {gib(fig.code_bytes)}",
      f"   peak {gib(fig.peak_bytes)} of {gib(fig.chip.hbm_bytes)} HBM "
      f"({100 * fig.peak_bytes / fig.chip.hbm_bytes:.0f}%): {'FITS' if fig.fits else 'DOES NOT FIT'}",
  ]
  if fig.estimated_seconds is None:
    return "\n".join(lines + ["   (cost analysis skipped: --nocost)"])
  lines += [
      f"   FLOPs per call: XLA {fig.xla_flops:.4g}; model {work.model_flops:.4g} ({work.model_flops_formula}); "
      f"XLA/model = {fig.xla_flops / work.model_flops:.3f}",
      f"   FLOPs the compiled program should execute (remat recompute, full TxT attention, LM head rows): "
      f"{work.executed_flops:.4g}; XLA/that = {fig.xla_flops / work.executed_flops:.3f}",
      f"   XLA estimated time per call {fig.estimated_seconds * 1e3:.1f} ms -> MFU {100 * fig.mfu:.1f}% "
      f"(of {fig.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per chip)",
  ]
  if work.kind == "train":
    lines.append(f"   Stage II ({STAGE2_STEPS} steps x batch {work.rows} x {work.tokens_per_row} tokens): "
                 f"{fig.stage2_hours:.2f} h on this slice ({fig.stage2_hours * fig.num_chips:.0f} chip-hours)")
  else:
    lines.append(f"   scoring: {fig.passages_per_second_per_chip:,.0f} passages/s per chip "
                 f"({fig.passages_per_second_per_chip * fig.num_chips:,.0f} on the slice)")
  return "\n".join(lines)


# --gin_file, --gin_bindings, --gin_search_paths are every command's (rankrag_jax/cli.py), parsed as `train` does.
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:4x4x4", "TPU slice: v5p:2x4x4 (v5p-64, 32 chips), v5p:4x4x4 "
                                "(v5p-128, 64 chips), v5p:4x4x8 (v5p-256, 128 chips).")
_SCORE = flags.DEFINE_bool("score", True, "Also compile the P(\"True\") scoring kernel.")
_COST = flags.DEFINE_bool("cost", True, "Also compile 2- and 3-layer unrolled variants for XLA's FLOPs and time.")
_RESULTS = flags.DEFINE_string("results_jsonl", None, "Append one JSON record per compiled program here.")
_COST_ONLY = flags.DEFINE_list("cost_only", [], "Internal (the cost child process): print layer-extrapolated costs "
                               "of these workloads (train, score) and exit.")


def main(argv: Sequence[str]) -> None:
  del argv
  jax.config.update("jax_platforms", "cpu")  # the host runs nothing; the TPU devices are the topology's
  # --gin_file / --gin_bindings / --gin_search_paths, as `train` parses them; not finalized, so run-only macros
  # the model gins leave REQUIRED (INIT_CHECKPOINT, TOKENIZER_PATH) need not be given to compile.
  cli.parse_gin(finalize=False)
  if _COST_ONLY.value:  # the child process of costs_in_child_process
    mesh = sharding.make_mesh(devices=topology_devices(_TOPOLOGY.value))
    rules = sharding.logical_axis_rules()
    builders = {"train": compile_programs.stage2_train_workload, "score": compile_programs.score_workload}
    costs = {kind: layer_extrapolated_cost(builders[kind](mesh, rules), mesh, rules) for kind in _COST_ONLY.value}
    print(_COSTS_LINE + json.dumps(costs), flush=True)
    return
  compile_for_topology(_TOPOLOGY.value, score=_SCORE.value, cost=_COST.value, results_jsonl=_RESULTS.value)


if __name__ == "__main__":
  app.run(main)
