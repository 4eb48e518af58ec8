"""RankRAG's relevance score (§4.3): P("True") as the next token after the context-ranking prompt, batched and jitted.

For one question and N passages, every prompt starts with the same tokens (the system turn, "Passage:"). That
shared prefix is run once (batch 1) into a KV cache, which is broadcast to each batch of passage suffixes; the
suffixes are grouped into length buckets so only a few shapes compile and little is padding. Only the hidden state
of each row's last real token reaches the LM head: the "True"/"False" rows for the pair of logits, plus one
log-sum-exp over the full vocabulary row so that P("True") is the model's actual next-token probability.

    >>> scores = score_passages(params, config, tokenizer, "who wrote hamlet?", passages)
    >>> scores.p_true, scores.p_true_normalised, scores.num_truncated
"""

import dataclasses
import functools
from typing import Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rankrag_jax import backends
from rankrag_jax import prompts
from rankrag_jax.generate import data_parallel_size, length_bucket, shard_batch, shared_prefix_length
from rankrag_jax.model import attention
from rankrag_jax.model import token_layout
from rankrag_jax.model.config import LlamaConfig
from rankrag_jax.model.llama import Llama, init_cache

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PassageScores:
  """Relevance of each passage to one question, in the order the passages were given."""
  p_true: np.ndarray             # [N] P("True") under the full next-token softmax (the paper's score).
  p_true_normalised: np.ndarray  # [N] P(True) / (P(True) + P(False)).
  num_truncated: int             # passages cut to fit the context window.
  prompt_lengths: np.ndarray     # [N] prompt tokens after truncation.


def prefill_prefix(params: dict, config: LlamaConfig, tokens: Array, length: Array) -> dict:
  """Runs the shared prompt prefix (tokens [1, P], the first `length` real) into a batch-1 KV cache of P slots."""
  model = Llama(config)
  slots = jnp.arange(tokens.shape[1])[None, :]
  segment_ids = (slots < length).astype(jnp.int32)
  cache = init_cache(config, 1, tokens.shape[1])
  _, cache = model.apply({"params": params}, tokens, slots, segment_ids, cache, method=Llama.hidden_states)
  return cache


def score_token_batch(params: dict, config: LlamaConfig, prefix_cache: dict, prefix_length: Array,
                      tokens: Array, lengths: Array, answer_ids: Array, num_tokens: int = 0,
                      num_shards: int = 1) -> Array:
  """Log-probabilities of the answer tokens after each prompt: [B, len(answer_ids)].

  Args:
    params, config: the model (config's attention_impl resolved for the target: `attention.for_target`).
    prefix_cache: `prefill_prefix`'s batch-1 cache of the shared prefix (index = its padded length).
    prefix_length: int32 scalar, the prefix's real token count (its pad slots are segment 0, never attended).
    tokens: int32 [B, T] the rest of each prompt, right-padded.
    lengths: int32 [B] real suffix lengths (>= 1); row b's answer is predicted at suffix position lengths[b]-1.
    answer_ids: int32 [A] vocabulary rows to score, e.g. ("True", "False").
    num_tokens: 0, or the compact token budget per data shard (static, `token_layout.prefill_token_budget`):
      projections and MLP then run on the real suffix tokens only.
    num_shards: the data shards the rows are split over (static; with num_tokens).
  """
  model = Llama(config)
  batch, suffix_len = tokens.shape

  def widen(x, batch_axis, slot_axis):  # the prefix (batch 1, P slots) for every row, then T empty slots.
    x = jnp.broadcast_to(x, x.shape[:batch_axis] + (batch,) + x.shape[batch_axis + 1:])
    empty = jnp.zeros(x.shape[:slot_axis] + (suffix_len,) + x.shape[slot_axis + 1:], x.dtype)
    return jnp.concatenate([x, empty], axis=slot_axis)

  # The prefix filled all of its P slots, so the suffix starts at slot P: a static index, with which the suffix
  # attends block by block to the keys up to each block's end (ops.prefill_blockwise_attention; the cpu_ffi kernel
  # cuts each tile's keys there too).
  cache = {"k": widen(prefix_cache["k"], 1, 3), "v": widen(prefix_cache["v"], 1, 3),  # [L, B, Kh, S, D]
           "segment_ids": widen(prefix_cache["segment_ids"], 0, 1), "index": prefix_cache["segment_ids"].shape[1]}
  slots = jnp.arange(suffix_len)
  positions = jnp.broadcast_to(prefix_length + slots, (batch, suffix_len))
  segment_ids = (slots[None, :] < lengths[:, None]).astype(jnp.int32)
  layout = token_layout.make_layout(segment_ids, num_shards, num_tokens) if num_tokens else None
  hidden, _ = model.apply({"params": params}, tokens, positions, segment_ids, cache, layout=layout,
                          method=Llama.hidden_states)
  last_hidden = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
  answer_logits = model.apply({"params": params}, last_hidden, answer_ids, method=Llama.logits_from_hidden)
  # The normaliser needs every vocabulary row, but only at these B positions: B x V, not B x T x V.
  full_logits = model.apply({"params": params}, last_hidden, method=Llama.logits_from_hidden)
  return answer_logits - jax.nn.logsumexp(full_logits, axis=-1, keepdims=True)


@functools.cache
def _jitted(fn: Callable, platform: str, static_argnames: tuple[str, ...] = ("config",)) -> Callable:
  return jax.jit(fn, static_argnames=static_argnames, compiler_options=backends.compiler_options(platform))


def suffix_bucket(length: int, multiple: int = 16) -> int:
  """Padded suffix length: the next multiple of `multiple` up to 32 multiples (a few percent of padding at
  passage lengths), then `length_bucket`'s coarser steps so long prompts still compile few shapes."""
  if length <= 32 * multiple:
    return max(multiple, -(-length // multiple) * multiple)
  return max(32 * multiple, length_bucket(length))


def _batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_rows: int, multiple: int,
             length_multiple: int = 16):
  """Yields (row indices, padded length, padded rows): the rows sorted by length, cut into consecutive groups.

  Longest first: a group's longest row sets its length (`suffix_bucket`), which sets how many rows fit in
  `max_batch_tokens` (a power of two, times the data-parallel `multiple`). Neighbours in sorted order differ by
  a token or two, so nearly all padding is the rounding to `length_multiple`; only the last, shortest group is
  padded with whole rows (to a power of two). Shapes stay few: lengths step by 16, rows by powers of two.
  """
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  start = 0
  while start < len(order):
    bucket = suffix_bucket(int(lengths[order[start]]), length_multiple)
    fit = max(1, min(max_batch_rows, max_batch_tokens // bucket) // multiple)
    rows = multiple * (1 << (fit.bit_length() - 1))  # the largest power of two <= fit, per data shard.
    members = order[start:start + rows]
    padded = multiple * (1 << (-(-len(members) // multiple) - 1).bit_length())
    yield members, bucket, min(rows, padded)
    start += len(members)


@gin.configurable(denylist=["params", "config", "sequences", "answer_ids"])
def score_token_sequences(params: dict, config: LlamaConfig, sequences: Sequence[Sequence[int]],
                          answer_ids: Sequence[int], max_batch_tokens: int = 8192, max_batch_rows: int = 16,
                          share_prefix: bool = True, mesh: Mesh | None = None,
                          compact_granularity: int = 16) -> np.ndarray:
  """Log-probabilities [N, A] of `answer_ids` as the next token after each sequence (token-id prompts).

  Args:
    params, config: the model (attention as `config.attention_impl` resolves for the mesh's platform).
    sequences: N prompts as token ids (each non-empty).
    answer_ids: A vocabulary ids to score.
    max_batch_tokens: rows x padded length per batch (bounds activation memory).
    max_batch_rows: at most this many rows per batch.
    share_prefix: run the tokens common to all sequences once and reuse their KV cache.
    mesh: when given with >1 data-parallel device, batches are split over its data axes.
    compact_granularity: each batch's projections and MLP run on its real tokens only, their count rounded up to
      this (one compiled program per count); 0 computes the padding slots too.
  """
  if compact_granularity < 0:
    raise ValueError(f"score_token_sequences: compact_granularity must be >= 0 (0: no compaction), "
                     f"got {compact_granularity}")
  if not sequences:
    return np.zeros((0, len(answer_ids)), np.float32)
  if any(len(s) == 0 for s in sequences):
    raise ValueError("score_token_sequences: every prompt needs at least one token")
  prefix_len = shared_prefix_length(sequences) if share_prefix else 0
  prefix = np.zeros((1, length_bucket(max(prefix_len, 1))), np.int32)
  prefix[0, :prefix_len] = sequences[0][:prefix_len]
  platform = attention.target_platform(mesh)
  config = attention.for_target(config, mesh)
  prefix_cache = _jitted(prefill_prefix, platform)(params, config, jnp.asarray(prefix), jnp.int32(prefix_len))
  suffixes = [s[prefix_len:] for s in sequences]
  answers = jnp.asarray(answer_ids, jnp.int32)
  multiple = data_parallel_size(mesh)
  out = np.zeros((len(sequences), len(answer_ids)), np.float32)
  for rows, bucket, padded_rows in _batches([len(s) for s in suffixes], max_batch_tokens, max_batch_rows,
                                            multiple):
    tokens = np.zeros((padded_rows, bucket), np.int32)
    lengths = np.ones((padded_rows,), np.int32)  # padding rows: one pad token, discarded.
    for r, i in enumerate(rows):
      tokens[r, :len(suffixes[i])] = suffixes[i]
      lengths[r] = len(suffixes[i])
    num_tokens = token_layout.prefill_token_budget(np.arange(bucket)[None, :] < lengths[:, None], multiple,
                                                   compact_granularity)
    tokens, lengths = shard_batch((tokens, lengths), mesh)
    score_batch = _jitted(score_token_batch, platform, ("config", "num_tokens", "num_shards"))
    log_probs = score_batch(params, config, prefix_cache, jnp.int32(prefix_len), tokens, lengths, answers,
                            num_tokens=num_tokens, num_shards=multiple)
    out[rows] = np.asarray(log_probs)[:len(rows)]
  return out


def prompt_token_ids(tokenizer, text: str) -> list[int]:
  """A rendered prompt's ids as training saw them (data/packing.py): bos first iff the tokenizer adds one."""
  return tokenizer.encode(text, add_bos=bool(getattr(tokenizer, "add_bos_by_default", False)))


def _token_cap(lengths: Sequence[int], excess: int) -> int | None:
  """The largest per-passage token cap (>= 1) that removes at least `excess` tokens; None if none does."""
  removed = lambda cap: sum(max(0, n - cap) for n in lengths)
  if removed(1) < excess:
    return None
  low, high = 1, max(lengths)  # removed(low) >= excess > removed(high) unless excess <= 0.
  while low < high:
    mid = (low + high + 1) // 2
    if removed(mid) >= excess:
      low = mid
    else:
      high = mid - 1
  return low


def fit_passages_to_window(render: Callable[[Sequence[str]], str], tokenizer, passages: Sequence[str],
                           max_tokens: int) -> tuple[list[int], int]:
  """Prompt ids of render(passages), cutting the longest passages' tails (down to a common cap) to fit.

  Returns (ids, number of passages cut). Raises ValueError when the prompt cannot fit even with every passage
  cut to one token (the question/instructions alone are too long).
  """
  passages = [p.strip() for p in passages]
  ids = prompt_token_ids(tokenizer, render(passages))
  if len(ids) <= max_tokens:
    return ids, 0
  passage_ids = [tokenizer.encode(p) for p in passages]
  excess = len(ids) - max_tokens
  while True:
    cap = _token_cap([len(p) for p in passage_ids], excess)
    if cap is None:
      raise ValueError(f"the prompt needs more than {max_tokens} tokens (the context window) even with every "
                       f"passage cut to one token; shorten the question")
    cut = [tokenizer.decode(p[:cap]).strip() or tokenizer.decode(p[:1]) for p in passage_ids]
    ids = prompt_token_ids(tokenizer, render(cut))
    if len(ids) <= max_tokens:
      return ids, sum(len(p) > cap for p in passage_ids)
    # Re-tokenising the cut text can merge differently at the seams: cut further and re-check.
    excess += len(ids) - max_tokens


@gin.configurable(denylist=["params", "config", "tokenizer", "items", "mesh"])
def score_questions(params: dict, config: LlamaConfig, tokenizer, items: Sequence[tuple[str, Sequence[str]]],
                    chat_format: str = "chatqa", claim: bool = False, max_prompt_tokens: int | None = None,
                    mesh: Mesh | None = None) -> list[PassageScores]:
  """RankRAG relevance of each passage to its question: P("True") after the paper's context-ranking prompt.

  Several questions' passages are scored in one `score_token_sequences` call: every prompt starts with the same
  system turn and "Passage:", so they share one prefix and fill length-sorted batches across questions (one
  question's 20 passages alone leave batches part-empty).

  Args:
    params, config: the model.
    tokenizer: the model's tokenizer (rankrag_jax.tokenizer interface).
    items: (question, passages) pairs; a question is a FEVER claim when `claim`; passages as
      `retrieval.corpus.passage_text` shows them.
    chat_format: "chatqa" (the paper's plain text) or "chat_template" (the model's own); see prompts.py.
    claim: use the FEVER claim-ranking prompt (App. D).
    max_prompt_tokens: the context window (default: the model's max_position_embeddings); a longer prompt has
      its passage's tail cut, and is counted in `num_truncated`.
    mesh: split batches over this mesh's data axes.

  Returns:
    One `PassageScores` per item, its passages in the given order.
  """
  max_prompt_tokens = max_prompt_tokens or config.max_position_embeddings
  make = prompts.claim_ranking_prompt_example if claim else prompts.ranking_prompt_example
  sequences, truncated, sizes = [], [], []
  for question, passages in items:
    if not question or not question.strip():
      raise ValueError("score_passages: the question is empty")
    if any(not p or not p.strip() for p in passages):
      raise ValueError(f"score_passages: a passage is empty (question {question!r})")
    question = question.strip()

    def render(one_passage, question=question):
      return prompts.render_prompt(make(question, one_passage[0]), chat_format, tokenizer)

    for passage in passages:
      ids, cut = fit_passages_to_window(render, tokenizer, [passage], max_prompt_tokens)
      sequences.append(ids)
      truncated.append(cut)
    sizes.append(len(passages))
  true_id, false_id = prompts.true_false_token_ids(tokenizer, chat_format)
  log_probs = score_token_sequences(params, config, sequences, (true_id, false_id), mesh=mesh)
  results, start = [], 0
  for size in sizes:
    rows = slice(start, start + size)
    start += size
    # P(T)/(P(T)+P(F)) from log-probs without underflow: the sigmoid of the log-odds.
    results.append(PassageScores(
        p_true=np.exp(log_probs[rows, 0]), p_true_normalised=1.0 / (1.0 + np.exp(log_probs[rows, 1] -
                                                                                log_probs[rows, 0])),
        num_truncated=int(sum(truncated[rows])),
        prompt_lengths=np.asarray([len(s) for s in sequences[rows]], np.int32)))
  return results


def score_passages(params: dict, config: LlamaConfig, tokenizer, question: str, passages: Sequence[str],
                   **options) -> PassageScores:
  """`score_questions` for one question: P("True") of each passage (options: chat_format, claim,
  max_prompt_tokens, mesh)."""
  return score_questions(params, config, tokenizer, [(question, passages)], **options)[0]
