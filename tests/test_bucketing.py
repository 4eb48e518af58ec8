"""Per-batch step shapes (training/bucketing.py) and token compaction (model/token_layout.py): exact, and no real
token is ever left out."""

import subprocess
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankrag_jax import sharding
from rankrag_jax.model import config as config_lib
from rankrag_jax.model import token_layout
from rankrag_jax.training import bucketing
from rankrag_jax.training import data as data_lib
from tests.test_train import REPO, _env, _one_step, _run_on_8_cpu_devices


def _ragged_segment_ids(rows=4, length=12, seed=0):
  """Rows of 1..3 segments and padding, including a row that is all padding and one with no padding."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((rows, length), np.int32)
  for r in range(rows - 1):
    filled = length if r == 0 else int(rng.integers(1, length))
    ids[r, :filled] = np.sort(rng.integers(1, 4, filled))
  return ids


@pytest.mark.parametrize("num_shards", [1, 2])
def test_compact_layout_holds_each_shards_real_tokens_in_order_and_pads_back(num_shards):
  segment_ids = _ragged_segment_ids()
  x = np.random.default_rng(1).normal(size=segment_ids.shape + (3,)).astype(np.float32)
  needed = token_layout.tokens_needed(segment_ids, num_shards)
  layout = token_layout.make_layout(jnp.asarray(segment_ids), num_shards, needed + 2)  # 2 unused compact slots
  compact = np.asarray(token_layout.to_compact(jnp.asarray(x), layout))
  for s, (x_rows, id_rows) in enumerate(zip(np.split(x, num_shards), np.split(segment_ids, num_shards))):
    real = x_rows[id_rows != 0]  # row-major: each shard's real tokens in order
    np.testing.assert_array_equal(compact[s, :len(real)], real)
    np.testing.assert_array_equal(compact[s, len(real):], 0)
  np.testing.assert_array_equal(token_layout.to_padded(jnp.asarray(compact), layout),
                                np.where((segment_ids != 0)[..., None], x, 0))


def test_compact_layout_gradients_equal_autodiff_of_the_masked_identity():
  segment_ids = _ragged_segment_ids(seed=2)
  layout = token_layout.make_layout(jnp.asarray(segment_ids), 2, token_layout.tokens_needed(segment_ids, 2))
  rng = np.random.default_rng(3)
  x, w = (jnp.asarray(rng.normal(size=segment_ids.shape + (5,)).astype(np.float32)) for _ in range(2))
  real = jnp.asarray(segment_ids != 0)[..., None]
  round_trip = lambda x: jnp.sum(w * jnp.sin(token_layout.to_padded(token_layout.to_compact(x, layout) ** 2, layout)))
  masked = lambda x: jnp.sum(w * jnp.sin(jnp.where(real, x ** 2, 0.0)))
  np.testing.assert_allclose(jax.grad(round_trip)(x), jax.grad(masked)(x), rtol=1e-6, atol=1e-7)
  compact = token_layout.to_compact(x, layout)
  via_padded = lambda c: jnp.sum(w * token_layout.to_padded(c, layout) ** 3)
  expected = 3 * compact ** 2 * token_layout.to_compact(w, layout)  # each compact token's own slot's weight
  np.testing.assert_allclose(jax.grad(via_padded)(compact), expected, rtol=1e-5, atol=1e-6)


def test_tokens_needed_counts_per_shard_and_micro_batch():
  segment_ids = np.zeros((8, 10), np.int32)
  for r, n in enumerate([10, 1, 9, 2, 3, 3, 0, 4]):
    segment_ids[r, :n] = 1
  assert token_layout.tokens_needed(segment_ids, 1) == 32
  assert token_layout.tokens_needed(segment_ids, 2) == 22  # rows 0-3 | rows 4-7
  # 2 shards x 2 micro-batches: shard 0 rows (0, 2) | (1, 3); shard 1 rows (4, 6) | (5, 7).
  assert token_layout.tokens_needed(segment_ids, 2, num_micro_batches=2) == 19
  with pytest.raises(ValueError, match="do not split"):
    token_layout.tokens_needed(segment_ids, 3)


def test_prefill_budget_rounds_up_per_shard_and_is_0_when_nothing_is_saved():
  segment_ids = np.zeros((8, 10), np.int32)
  for r, n in enumerate([10, 1, 9, 2, 3, 3, 0, 4]):
    segment_ids[r, :n] = 1
  assert token_layout.prefill_token_budget(segment_ids, 1, 16) == 32
  assert token_layout.prefill_token_budget(segment_ids, 2, 16) == 32  # 22 real in shard 0 (of 40 slots) rounded up
  assert token_layout.prefill_token_budget(segment_ids, 2, 21) == 0  # 22 rounded to 42: all 40 slots, no saving
  assert token_layout.prefill_token_budget(segment_ids, 1, 0) == 0
  assert token_layout.prefill_token_budget(np.ones((2, 8)), 1, 4) == 0  # no padding
  with pytest.raises(ValueError, match="granularity must be >= 0, got -1"):
    token_layout.prefill_token_budget(segment_ids, 1, -1)


def test_plan_step_shape_rounds_up_and_never_cuts_real_tokens():
  batch = {"decoder_segment_ids": np.zeros((4, 64), np.int32), "decoder_loss_weights": np.zeros((4, 64))}
  batch["decoder_segment_ids"][0, :37] = 1
  batch["decoder_segment_ids"][1, :20] = 1
  batch["decoder_loss_weights"][0, 30:37] = 1
  shape = bucketing.plan_step_shape(batch, granularity=16, local_shards=1, max_loss_positions=64)
  assert shape == bucketing.StepShape(length=48, num_tokens=64, loss_positions=16)
  capped = bucketing.plan_step_shape(batch, granularity=16, local_shards=2, max_loss_positions=4)
  assert capped == bucketing.StepShape(length=48, num_tokens=64, loss_positions=4)  # 57 tokens in shard 0
  assert bucketing.trim_batch(batch, 48)["decoder_segment_ids"].shape == (4, 48)
  batch["decoder_loss_weights"][2, 40] = 1  # a loss weight on padding: a bad batch, named, not silently cut
  with pytest.raises(ValueError, match="row 2, slot 40: a loss weight on a padding slot"):
    bucketing.plan_step_shape(batch, granularity=16, local_shards=1)
  with pytest.raises(ValueError, match="granularity must be >= 1, got 0"):
    bucketing.plan_step_shape(batch, granularity=0, local_shards=1)
  with pytest.raises(ValueError, match="real tokens after slot 32"):
    bucketing.trim_batch(batch, 32)


def _ragged_copy_batch(batch_size=8, length=64, seed=0):
  """The synthetic copy task with rows cut short at different points (and the tail of every row padding)."""
  batch = next(data_lib.SyntheticBatches("train", batch_size, length, 0, 1, seed))
  for r, keep in enumerate([64, 20, 45, 31, 12, 50, 38, 27][:batch_size]):
    for key in batch:
      batch[key][r, min(keep, length - 8):] = 0
  return batch


@pytest.mark.parametrize("overrides", [{}, {"remat_policy": "dots", "attention_impl": "blockwise",
                                           "attention_query_block": 16, "flatten_matmul_tokens": True}])
def test_bucketed_step_equals_the_fixed_shape_step(overrides):
  config, batch, mesh = config_lib.tiny(**overrides), _ragged_copy_batch(), sharding.make_mesh()
  fixed, fixed_metrics = _one_step(config, batch, mesh, max_loss_positions=32)
  bucketed, metrics = _one_step(config, batch, mesh, max_loss_positions=32, shape_bucket=8)
  real = int((batch["decoder_segment_ids"] != 0).sum())
  planned = bucketing.plan_step_shape(batch, granularity=8, local_shards=1, max_loss_positions=32)
  assert real < 8 * 64 - 100  # at most 16 answer tokens per row; the longest row is cut at 56 of 64 slots
  assert planned == bucketing.StepShape(length=56, num_tokens=-(-real // 8) * 8, loss_positions=16)
  for key in ("loss", "grad_norm", "accuracy", "loss_tokens"):
    np.testing.assert_allclose(metrics[key], fixed_metrics[key], rtol=2e-5)
  for a, b in zip(jax.tree.leaves(fixed["params"]), jax.tree.leaves(bucketed["params"])):
    np.testing.assert_allclose(a, b, atol=2e-5)


SHARDED_BUCKETED_SCRIPT = textwrap.dedent("""
    import json, jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from rankrag_jax import sharding
    from rankrag_jax.model import config as config_lib
    from rankrag_jax.training import bucketing
    from tests.test_bucketing import _ragged_copy_batch
    from tests.test_train import _one_step
    config, batch = config_lib.tiny(), _ragged_copy_batch()
    sharded, m8 = _one_step(config, batch, sharding.make_mesh(data=2, fsdp=2, tensor=2), num_micro_batches=2,
                            max_loss_positions=32, shape_bucket=8)
    single, m1 = _one_step(config, batch, sharding.make_mesh(devices=jax.devices()[:1]), max_loss_positions=32)
    planned = bucketing.plan_step_shape(batch, granularity=8, local_shards=4, num_micro_batches=2,
                                        max_loss_positions=32)
    shape = [planned.num_tokens, planned.loss_positions]
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(sharded["params"]), jax.tree.leaves(single["params"]))]
    print("RESULT" + json.dumps({"loss8": float(m8["loss"]), "loss1": float(m1["loss"]), "shape": shape,
                                 "row_tokens": (batch["decoder_segment_ids"] != 0).sum(1).tolist(),
                                 "max_param_diff": max(diffs), "devices": jax.device_count()}))
""")


def test_bucketed_step_on_4_data_shards_with_micro_batches_equals_the_single_device_step():
  result = _run_on_8_cpu_devices(SHARDED_BUCKETED_SCRIPT)
  # 4 data shards of 2 rows, 2 micro-batches: one row per (shard, micro-batch); the longest row sets the budget.
  assert result["shape"] == [-(-max(result["row_tokens"]) // 8) * 8, 16]
  assert abs(result["loss8"] - result["loss1"]) <= 1e-5
  assert result["max_param_diff"] <= 1e-5


def test_train_with_shape_bucket_repeats_the_fixed_shape_losses(tmp_path):
  from tests.test_train import _losses, _train_command
  runs = {}
  for name, bucket in (("fixed", 0), ("bucketed", 8)):
    out = subprocess.run(_train_command(tmp_path / name, "TRAIN_STEPS = 6", "EVAL_BATCHES = 0",
                                        f"loop.train.shape_bucket = {bucket}"),
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs[name] = (_losses(tmp_path / name), out.stdout + out.stderr)
  (fixed, _), (bucketed, log) = runs["fixed"], runs["bucketed"]
  assert sorted(bucketed) == sorted(fixed) == list(range(1, 7))
  np.testing.assert_allclose([bucketed[s] for s in fixed], list(fixed.values()), rtol=1e-5)
  assert "(new shape StepShape(" in log  # the copy task's batches differ in real tokens: more than one shape


def test_train_refuses_a_negative_shape_bucket(tmp_path):
  from tests.test_train import _train_command
  out = subprocess.run(_train_command(tmp_path / "run", "loop.train.shape_bucket = -8"), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "loop.train.shape_bucket must be 0 (fixed shapes) or a granularity > 0, got -8" in out.stderr
