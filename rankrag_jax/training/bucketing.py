"""Per-batch step shapes: run each packed batch at the size its real tokens need, from a few compiled buckets.

A packed Stage-II batch is ~80% real tokens (bench/train_step.py): rows end in padding, short batches leave the
row ends empty, and few rows need many answer positions. With a bucket granularity G, the host picks, per batch:
  length:         the rows cut after their last real slot, rounded up to G (attention and everything else run
                  on [B, length]);
  num_tokens:     the real tokens per (micro-batch, data shard), rounded up to G: the model's per-token work runs
                  on those only (`model.token_layout`);
  loss_positions: the answer tokens per row, rounded up to G, at most `max_loss_positions` (training/loss.py).
All three are exact: nothing is left out that a fixed-shape step would keep. Each distinct shape compiles once
(~8 s for SmolLM2 on 2 CPU cores); every host picks the same shape (the maximum over hosts).
"""

import dataclasses

import jax
from jax.experimental import multihost_utils
import numpy as np

from rankrag_jax.model.token_layout import round_up, tokens_needed


@dataclasses.dataclass(frozen=True)
class StepShape:
  length: int
  num_tokens: int
  loss_positions: int


def plan_step_shape(local_batch: dict, *, granularity: int, local_shards: int, num_micro_batches: int = 1,
                    max_loss_positions: int | None = None) -> StepShape:
  """The bucketed shape of this batch, the same on every host (`local_shards`: data shards on this host)."""
  if granularity < 1:
    raise ValueError(f"shape bucket granularity must be >= 1, got {granularity}")
  segment_ids = np.asarray(local_batch["decoder_segment_ids"])
  b, t = segment_ids.shape
  real = segment_ids != 0
  stray = np.argwhere(~real & (np.asarray(local_batch["decoder_loss_weights"]) != 0))
  if stray.size:  # a cut or compacted step would drop that token from the loss; a fixed-shape step keeps it
    raise ValueError(f"batch row {stray[0][0]}, slot {stray[0][1]}: a loss weight on a padding slot (segment id 0);"
                     " per-batch shapes (shape_bucket) need loss weights on real tokens only")
  last_slot = np.where(real.any(0))[0]
  needs = np.asarray([last_slot[-1] + 1 if last_slot.size else 1,
                      tokens_needed(segment_ids, local_shards, num_micro_batches),
                      (np.asarray(local_batch["decoder_loss_weights"]) != 0).sum(1).max(initial=0)], np.int64)
  if jax.process_count() > 1:
    needs = np.asarray(multihost_utils.process_allgather(needs)).reshape(-1, needs.size).max(0)
  length = round_up(int(needs[0]), granularity, t)
  rows_per_shard = b // (local_shards * num_micro_batches)
  num_tokens = round_up(int(needs[1]), granularity, rows_per_shard * length)
  loss_positions = round_up(int(needs[2]), granularity, length)
  if max_loss_positions is not None:
    loss_positions = min(loss_positions, max_loss_positions)
  return StepShape(length, num_tokens, loss_positions)


def trim_batch(local_batch: dict, length: int) -> dict:
  """The batch's [B, T] arrays cut to their first `length` slots (every later slot must be padding)."""
  if np.any(np.asarray(local_batch["decoder_segment_ids"])[:, length:] != 0):
    raise ValueError(f"trim_batch: real tokens after slot {length}")
  return {k: np.asarray(v)[:, :length] for k, v in local_batch.items() if np.ndim(v) == 2}
