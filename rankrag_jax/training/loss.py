"""Next-token cross-entropy on answer tokens only, projecting onto the vocabulary only where the loss looks.

Batches are the packed decoder features (`decoder_input_tokens`, `decoder_target_tokens`, `decoder_segment_ids`,
`decoder_positions`, `decoder_loss_weights`, all [B, T]); the loss weight is non-zero exactly on assistant-answer
tokens. RankRAG answers are short next to their passages ("True", a span, passage ids after five passages), so most
positions carry no loss. Rather than materialise [B, T, V] logits (B·T·V·4 bytes: 2 GB for SmolLM2 at B=8, T=1024,
and the LM head is ~20% of its FLOPs), each row's weighted positions are gathered (in order) up to a static
`max_loss_positions` and only those K hidden states go through the LM head: [B, K, V]. The gather is along the
length axis only, so it stays local to each data shard. A row with more than K answer tokens loses the surplus
from the loss; that is counted (`dropped_loss_tokens`) and the loop warns, so K can be raised (K = T is exact).
"""

import jax
import jax.numpy as jnp

from rankrag_jax.model import token_layout
from rankrag_jax.model.llama import Llama

Array = jax.Array

LOSS_SUM, WEIGHT_SUM, CORRECT_SUM, DROPPED = "loss_sum", "weight_sum", "correct_sum", "dropped_loss_tokens"


def loss_positions(weights: Array, max_positions: int) -> tuple[Array, Array]:
  """Indices [B, K] of each row's first K positions with non-zero weight (padded with weightless positions),
  and the count of weighted positions that did not fit."""
  k = min(max_positions, weights.shape[1])
  t = weights.shape[1]
  has_loss = weights != 0  # != 0 (not > 0) so a NaN weight is kept and surfaces as a NaN loss.
  # The K largest keys: weighted positions first, then weightless ones, each group in sequence order.
  # (top_k rather than a stable argsort of the row: ~0.2 s less per 4 x 512 train step on XLA:CPU.)
  slots = jnp.arange(t, dtype=jnp.int32)
  _, indices = jax.lax.top_k(jnp.where(has_loss, 2 * t - slots, t - slots), k)
  kept = jnp.take_along_axis(has_loss, indices, axis=1).sum()
  return indices, has_loss.sum() - kept


def zero_sums() -> dict:
  """The identity for adding `loss_sums` results (micro-batch accumulation)."""
  return {LOSS_SUM: jnp.zeros((), jnp.float32), WEIGHT_SUM: jnp.zeros((), jnp.float32),
          CORRECT_SUM: jnp.zeros((), jnp.float32), DROPPED: jnp.zeros((), jnp.int32)}


def loss_sums(params, batch: dict, *, model: Llama, max_loss_positions: int | None = None,
              num_tokens: int | None = None, num_shards: int = 1) -> dict:
  """Sums over the batch: weighted cross-entropy, weight, weighted correct next tokens, dropped answer tokens.

  Sums (not means) so micro-batches and hosts combine exactly; the caller divides by `weight_sum`.
  With `num_tokens` (static), the model's per-token work runs on each of the `num_shards` data shards' real tokens
  only, `num_tokens` per shard (`token_layout`; the caller makes sure no shard holds more).
  """
  layout = None
  if num_tokens is not None:
    layout = token_layout.make_layout(batch["decoder_segment_ids"], num_shards, num_tokens)
  hidden, _ = model.apply({"params": params}, batch["decoder_input_tokens"], batch["decoder_positions"],
                          batch["decoder_segment_ids"], layout=layout, method=Llama.hidden_states)
  targets = batch["decoder_target_tokens"]
  weights = batch["decoder_loss_weights"].astype(jnp.float32)
  t = targets.shape[1]
  dropped = jnp.zeros((), jnp.int32)
  if max_loss_positions is not None and max_loss_positions < t:
    indices, dropped = loss_positions(weights, max_loss_positions)
    hidden = jnp.take_along_axis(hidden, indices[..., None], axis=1)
    targets = jnp.take_along_axis(targets, indices, axis=1)
    weights = jnp.take_along_axis(weights, indices, axis=1)
  logits = model.apply({"params": params}, hidden, method=Llama.logits_from_hidden)  # f32 [B, K, V]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  cross_entropy = log_z - target_logits
  # where(): a zero weight must zero the term even if its (unused) logits overflowed.
  loss_sum = jnp.sum(jnp.where(weights != 0, weights * cross_entropy, 0.0))
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {LOSS_SUM: loss_sum, WEIGHT_SUM: jnp.sum(weights), CORRECT_SUM: jnp.sum(weights * correct),
          DROPPED: dropped.astype(jnp.int32)}
