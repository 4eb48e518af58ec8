"""Where training batches come from: the RankRAG blend (SeqIO), or a synthetic stream for tests and smoke runs.

A batch source is called as `source(split, batch_size, sequence_length, shard_id, num_shards, seed, start_batch)`
and returns an iterator of numpy batches [batch_size, T] (the decoder features of `step.BATCH_KEYS`) with a
`position` attribute: batches consumed since the start of the stream. The checkpoint stores `position`;
passing it back as `start_batch` (same seed, same shard) continues the stream exactly.
Each host asks for its own shard (`shard_id = jax.process_index()`) with the per-host batch size, and
`global_batch` assembles the hosts' rows into one global array sharded over the data-parallel mesh axes.
"""

import pathlib
from collections.abc import Iterator

import gin
import jax
import numpy as np

from rankrag_jax.training import step as step_lib


def ensure_blend() -> pathlib.Path:
  """Builds the embedded default blend into the Gin-bound blend directory unless it is already there."""
  from rankrag_jax.data import blend, tasks  # local: pulls in tensorflow/seqio, not needed by synthetic runs
  bound = gin.get_bindings(tasks.register_blend_tasks).get("data_dir")
  return blend.ensure_default_blend(pathlib.Path(bound or tasks.default_blend_dir()))


@gin.configurable
def blend_batches(split: str, batch_size: int, sequence_length: int, shard_id: int, num_shards: int, seed: int,
                  start_batch: int = 0, mixture_name: str = "rankrag_stage2", build_if_missing: bool = True,
                  loss_normalization: str = "token"):
  """Packed batches of a blend mixture ("rankrag_stage1" | "rankrag_stage2"); Tasks registered from Gin
  (gin_configs/data/*.gin). Evaluation ("validation") batches are unshuffled: every evaluation sees the same ones.

  loss_normalization: for the training split, "token" (the paper's SFT loss: mean over answer tokens) or "example"
  (mean over examples of each one's mean answer-token loss; `tasks.example_mean_weights`). Evaluation batches keep
  per-token weights, so held-out losses stay comparable between runs.
  """
  from rankrag_jax.data import tasks  # local: pulls in tensorflow/seqio
  if build_if_missing:
    ensure_blend()
  tasks.register_blend_tasks()
  register = {tasks.STAGE1_MIXTURE: tasks.register_stage1_mixture,
              tasks.STAGE2_MIXTURE: tasks.register_stage2_mixture}
  if mixture_name in register:
    register[mixture_name]()
  return tasks.get_dataset(mixture_name, sequence_length=sequence_length, batch_size=batch_size, split=split,
                           shard_id=shard_id, num_shards=num_shards, seed=seed, start_batch=start_batch,
                           shuffle=split == "train",
                           loss_normalization=loss_normalization if split == "train" else "token")


class SyntheticBatches:
  """A deterministic packed copy task: each example is a random prompt, then its first tokens as the answer.

  Global batch i, row r is a function of (seed, split, i, r) only, so any host count reads the same global
  batches (host h gets rows [h*b, (h+1)*b)): that is what lets a 2-process run be compared with a 1-process one.
  `nan_at_batch` makes that batch's loss weights NaN (a test's stand-in for a diverging run).
  """

  def __init__(self, split, batch_size, sequence_length, shard_id, num_shards, seed, start_batch=0,
               vocab_size=256, answer_length=4, nan_at_batch: int | None = None):
    self.position = start_batch
    self._rows = range(shard_id * batch_size, (shard_id + 1) * batch_size)
    self._length, self._vocab, self._answer = sequence_length, vocab_size, answer_length
    self._seed = (seed, 0 if split == "train" else 1)
    self._nan_at_batch = nan_at_batch

  def __iter__(self) -> Iterator[dict]:
    return self

  def _row(self, batch_index: int, row: int) -> dict:
    rng = np.random.default_rng((*self._seed, batch_index, row))
    tokens, weights, segments, positions = [], [], [], []
    segment = 1
    while True:
      prompt = list(rng.integers(3, self._vocab, int(rng.integers(4, 12))))
      example = [1] + prompt + [2] + prompt[:self._answer]  # bos, prompt, separator, answer
      if len(tokens) + len(example) > self._length:
        break
      tokens += example
      weights += [0.0] * (len(example) - self._answer) + [1.0] * self._answer
      segments += [segment] * len(example)
      positions += list(range(len(example)))
      segment += 1
    pad = self._length - len(tokens)
    tokens, weights = np.array(tokens + [0] * pad), np.array(weights + [0.0] * pad, np.float32)
    segments, positions = np.array(segments + [0] * pad), np.array(positions + [0] * pad)
    # Next-token targets: the input row shifted left within each segment (loss weight marks answer targets).
    inputs = np.where(positions == 0, 0, np.roll(tokens, 1))
    inputs[0] = 0
    return {"decoder_input_tokens": inputs, "decoder_target_tokens": tokens, "decoder_loss_weights": weights,
            "decoder_segment_ids": segments, "decoder_positions": positions}

  def __next__(self) -> dict:
    rows = [self._row(self.position, r) for r in self._rows]
    batch = {k: np.stack([row[k] for row in rows]).astype(np.float32 if k == "decoder_loss_weights" else np.int32)
             for k in step_lib.BATCH_KEYS}
    if self.position == self._nan_at_batch:
      batch["decoder_loss_weights"] = np.full_like(batch["decoder_loss_weights"], np.nan)
    self.position += 1
    return batch


@gin.configurable
def synthetic_batches(split, batch_size, sequence_length, shard_id, num_shards, seed, start_batch=0, **kwargs):
  return SyntheticBatches(split, batch_size, sequence_length, shard_id, num_shards, seed, start_batch, **kwargs)


def global_batch(local_batch: dict, shardings: dict) -> dict:
  """This host's rows -> global jax.Arrays, batch dimension sharded over the data-parallel mesh axes."""
  out = {}
  for key in step_lib.BATCH_KEYS:
    if key not in local_batch:
      raise KeyError(f"batch has no {key!r} (has {sorted(local_batch)}); training needs packed decoder features")
    local = np.asarray(local_batch[key])
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(shardings[key], local, global_shape)
  return out
