"""Two JAX processes (jax.distributed over localhost, CPU collectives) train like one process.

Each process has 2 CPU devices, so the (data=2, fsdp=2) mesh spans both processes on both axes; each process
reads its own half of every global batch (shard_id = process_index). The synthetic batch source makes global
batch i the same whatever the number of hosts, so the runs must agree step for step; also when the distributed run
picks per-batch shapes (`shape_bucket`), which the hosts must agree on.
"""

import socket
import subprocess

import jax
import numpy as np
import pytest

from rankrag_jax.training import checkpointing
from tests.test_train import REPO, _env, _losses, _train_command

STEPS = 6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("shape_bucket", [0, 8])
def test_two_processes_train_like_one(tmp_path, shape_bucket):
  bindings = (f"TRAIN_STEPS = {STEPS}", "CHECKPOINT_EVERY = 3")
  single = tmp_path / "single"
  subprocess.run(_train_command(single, *bindings), cwd=REPO, env=_env(), check=True, capture_output=True,
                 timeout=900)

  distributed = tmp_path / "distributed"
  port = _free_port()
  command = _train_command(distributed, *bindings, "sharding.make_mesh.data = 2", "sharding.make_mesh.fsdp = 2",
                           f"loop.train.shape_bucket = {shape_bucket}")
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  processes = [subprocess.Popen(command + [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                           f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "4 cpu devices, 2 host(s)" in outputs[0][0]
  assert ("(new shape StepShape(" in outputs[0][0]) == bool(shape_bucket)

  one, two = _losses(single), _losses(distributed)
  assert sorted(two) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
  _, params_one = checkpointing.load_params_from_checkpoint(single)
  _, params_two = checkpointing.load_params_from_checkpoint(distributed)
  for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)
