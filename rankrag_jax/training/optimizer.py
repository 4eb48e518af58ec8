"""The optimizer: AdamW with warmup + cosine/constant decay and global-norm clipping (paper §5.1 defaults).

Gradient accumulation is not an optax wrapper here: `step.py` scans over micro-batches and normalises by the total
number of answer tokens, so an accumulated step is the same update as one big batch (optax.MultiSteps would average
per-micro-batch means, weighting a micro-batch with few answer tokens as much as one with many).
"""

from absl import logging
import gin
import jax
import jax.numpy as jnp
import optax


@gin.configurable
def learning_rate_schedule(peak_learning_rate: float = gin.REQUIRED, total_steps: int = gin.REQUIRED,
                           warmup_steps: int = 0, decay: str = "cosine",
                           final_learning_rate_fraction: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `peak_learning_rate`, then "cosine" decay to peak*final_fraction or "constant"."""
  if decay not in ("cosine", "constant"):
    raise ValueError(f"learning_rate_schedule.decay must be 'cosine' or 'constant', got {decay!r}")
  if warmup_steps >= total_steps > 0:
    logging.warning("warmup_steps=%d >= total_steps=%d: warming up over %d steps instead", warmup_steps,
                    total_steps, total_steps - 1)
    warmup_steps = total_steps - 1
  warmup = optax.linear_schedule(0.0, peak_learning_rate, max(warmup_steps, 1))
  if decay == "cosine":
    after = optax.cosine_decay_schedule(peak_learning_rate, max(total_steps - warmup_steps, 1),
                                        alpha=final_learning_rate_fraction)
  else:
    after = optax.constant_schedule(peak_learning_rate)
  if warmup_steps == 0:
    return after
  return optax.join_schedules([warmup, after], [warmup_steps])


def _decay_mask(params):
  """Weight decay on matrices only: norms' scales (1-D, or [layers, embed] when stacked) are not decayed."""
  def is_matrix(path, _):
    return not any(getattr(k, "key", None) == "scale" for k in path)
  return jax.tree_util.tree_map_with_path(is_matrix, params)


@gin.configurable
def make_optimizer(schedule: optax.Schedule | None = None, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-8,
                   weight_decay: float = 0.1, clip_norm: float | None = 1.0) -> optax.GradientTransformation:
  """AdamW (β1 0.9, β2 0.98 as in RankRAG; wd 0.1 and clip 1.0 as in ChatQA) with `schedule` (default from Gin)."""
  schedule = schedule if schedule is not None else learning_rate_schedule()
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask,
                           mu_dtype=jnp.float32))
  return optax.chain(*parts)
