"""AOT compiles for a Cloud TPU slice from this CPU (libtpu comes with the `test` extra, see setup.py).

Small models on v5p:2x2x1 (4 chips), so a sharding or Gin break that only shows on TPU fails CI in seconds.
The 8B/70B figures take minutes each and live in experiments/tpu/README.md, not here.
"""

import dataclasses
import json

import gin
import pytest

import libtpu  # noqa: F401  (a missing libtpu must fail, not skip: CI must see TPU sharding breaks)

from rankrag_jax import sharding  # noqa: E402
from rankrag_jax import cli  # noqa: E402
from rankrag_jax import compile_programs  # noqa: E402
from rankrag_jax import train_compile  # noqa: E402
from rankrag_jax.model import config as config_lib  # noqa: E402

TOPOLOGY = "v5p:2x2x1"

# train's own Gin files (so a Gin break shows here), the tiny model, a (data 1, fsdp 2, tensor 2) mesh.
GIN_FILES = ["gin_configs/stage2.gin", "gin_configs/models/tiny.gin"]
TINY_BINDINGS = [
    "BATCH_SIZE = 8",
    "SEQUENCE_LENGTH = 64",
    "MAX_LOSS_POSITIONS = 16",
    "sharding.make_mesh.data = 1",
    "sharding.make_mesh.fsdp = 2",
    "sharding.make_mesh.tensor = 2",
    "score_workload.rows_per_data_shard = 2",
    "score_workload.prefix_len = 16",
    "score_workload.suffix_len = 32",
]


@pytest.fixture
def bind():
  """Parses train's Gin files + TINY_BINDINGS + `extra` as `train` does; clears the config afterwards."""
  def parse(*extra):
    gin.clear_config()
    cli.parse_gin(GIN_FILES, TINY_BINDINGS + list(extra), search_paths=())
  yield parse
  gin.clear_config()


@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if anything reaches XLA: mesh errors must come first."""
  def refuse(*_):
    raise AssertionError("compiled before the mesh error was raised")
  monkeypatch.setattr(train_compile, "_compile", refuse)


def _mesh_and_rules():
  mesh = sharding.make_mesh(devices=train_compile.topology_devices(TOPOLOGY))
  rules = sharding.logical_axis_rules()
  return mesh, rules


def test_tiny_train_step_and_scoring_kernel_compile_for_v5p_slice(bind, tmp_path, capsys):
  """The command's whole path: memory compiles here, cost compiles in the child process, printed and recorded."""
  bind()
  results = tmp_path / "results.jsonl"
  train, score = train_compile.compile_for_topology(TOPOLOGY, results_jsonl=str(results))
  assert (train.workload.kind, score.workload.kind) == ("train", "score")
  assert train.mesh_shape == {"data": 1, "fsdp": 2, "tensor": 2}
  for fig in (train, score):
    assert fig.fits and fig.argument_bytes > 0 and fig.xla_flops > 0 and fig.estimated_seconds > 0
  assert train.alias_bytes > 0  # the donated state is updated in place
  records = [json.loads(line) for line in results.read_text().splitlines()]
  assert [r["program"] for r in records] == ["train_step", "score_passages"]
  assert records[0]["stage2_hours"] > 0 and records[1]["passages_per_second_per_chip"] > 0
  printed = capsys.readouterr().out
  assert "Stage II (3300 steps x batch 8 x 64 tokens)" in printed and "passages/s per chip" in printed
  # Params and their Adam moments really sharded by the logical rules.
  state = train.workload.build(train.workload.config).abstract_args[0]
  q_proj = state["params"]["layers"]["attn"]["q_proj"]["kernel"]
  assert tuple(q_proj.sharding.spec) == (None, "fsdp", "tensor", None)  # [layers, embed, heads, head_dim]
  assert state["opt_state"][1][0].mu["layers"]["attn"]["q_proj"]["kernel"].sharding == q_proj.sharding


def test_mesh_that_does_not_fill_the_slice_fails_before_compiling(bind, no_compile):
  bind("sharding.make_mesh.fsdp = 4")  # 1 x 4 x 2 = 8 slots on a 4-chip slice
  with pytest.raises(sharding.MeshError, match="8 slots but there are 4 devices"):
    train_compile.compile_for_topology(TOPOLOGY)


def test_rule_naming_an_absent_mesh_axis_fails_before_compiling(bind, no_compile):
  bind("sharding.logical_axis_rules.overrides = (('mlp', 'expert'),)")
  with pytest.raises(sharding.MeshError, match=r"'mlp' -> 'expert' names mesh axes \['expert'\]"):
    train_compile.compile_for_topology(TOPOLOGY)


def test_dimension_not_divisible_by_its_mesh_axes_fails_before_compiling(bind, no_compile):
  bind("sharding.make_mesh.fsdp = 1", "sharding.make_mesh.tensor = 4")  # tiny has 2 KV heads, sharded over tensor = 4
  with pytest.raises(sharding.MeshError, match="k_proj.*does not divide"):
    train_compile.compile_for_topology(TOPOLOGY)


def test_batch_not_divisible_by_data_parallel_ways_fails_before_compiling(bind, no_compile):
  bind("BATCH_SIZE = 3")
  with pytest.raises(sharding.MeshError, match="batch feature.*dimension 3"):
    train_compile.compile_for_topology(TOPOLOGY)


@gin.configurable
def matmul_bound_model(**overrides):
  """Wide enough that matmuls dominate elementwise work, small enough to compile in seconds."""
  config = config_lib.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_layers=4,
                                  num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=10000.0,
                                  max_position_embeddings=256)
  return dataclasses.replace(config, **overrides)


def test_xla_flops_per_step_match_6n_tokens_plus_attention(bind):
  # XLA's own attention: this checks XLA's FLOP count. ('auto' picks splash on TPU, whose FLOPs are our cost
  # estimate, over rows padded to 128 slots: 4x the 64-slot square here; tests/test_fused_attention.py checks it.)
  bind("MODEL_CONFIG = @matmul_bound_model()", "MAX_LOSS_POSITIONS = None",
       "matmul_bound_model.attention_impl = 'xla'")
  mesh, rules = _mesh_and_rules()
  workload = compile_programs.stage2_train_workload(mesh, rules)
  flops_per_chip, seconds = train_compile.layer_extrapolated_cost(workload, mesh, rules)
  assert seconds > 0
  xla_flops = flops_per_chip * mesh.size
  assert xla_flops == pytest.approx(workload.model_flops, rel=0.10)
  # ... and the finer accounting of what the program executes (full T x T attention square) closer still.
  assert xla_flops == pytest.approx(workload.executed_flops, rel=0.05)
  # The 2-and-3-layer extrapolation to 4 layers equals the 4-layer unrolled compile.
  unrolled = dataclasses.replace(workload.config, scan_layers=False)
  direct_flops, _ = train_compile._cost(train_compile._compile(workload.build(unrolled), mesh, rules))
  assert flops_per_chip == pytest.approx(direct_flops, rel=0.01)


@pytest.mark.parametrize("model_gin", ["llama3_8b", "llama3_70b"])
@pytest.mark.parametrize("mesh_gin,topology", [("tpu_v5p_64", "v5p:2x4x4"), ("tpu_v5p_128", "v5p:4x4x4"),
                                               ("tpu_v5p_256", "v5p:4x4x8")])
def test_pod_gins_shard_every_array_of_both_programs_on_their_slice(model_gin, mesh_gin, topology):
  """The real gins: mesh fills the slice, rules name real axes, every dimension divides. Tracing only."""
  gin.clear_config()
  try:
    cli.parse_gin(["gin_configs/stage2.gin", f"gin_configs/models/{model_gin}.gin",
                   f"gin_configs/meshes/{mesh_gin}.gin"], [], search_paths=(), finalize=False)
    mesh = sharding.make_mesh(devices=train_compile.topology_devices(topology))
    rules = sharding.logical_axis_rules()
    assert mesh.size == len(train_compile.topology_devices(topology))
    for workload in (compile_programs.stage2_train_workload(mesh, rules),
                     compile_programs.score_workload(mesh, rules)):
      program = workload.build(workload.config)
      assert program.abstract_args
  finally:
    gin.clear_config()
