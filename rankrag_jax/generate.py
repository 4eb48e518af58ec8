"""Batched KV-cache decoding, jitted end to end: prefill once, then a `lax.while_loop` of one-token steps.

Prompts of different lengths share one batch: the tokens all of them start with (a RAG prompt's system turn and
instruction) run once, the rest of each prompt is right-padded to a length bucket, every row gets its own
positions, and pad slots carry segment id 0 so no query ever attends to them. New tokens are written after the
bucket (slot `T + step`) while their RoPE position continues the row's own prompt (`length + step`), so a row's
attention sees exactly its prompt and its own generated tokens, as an unpadded forward pass would.

    >>> new_ids = generate(params, config, [tok.encode(p) for p in prompts], max_new_tokens=32,
    ...                    stop_ids=tok.stop_ids)

Greedy decoding is the paper's setting (§5.1); temperature / top-p sampling is seeded per row, so a row's sample
does not depend on which other rows share its batch.
"""

import collections
import functools
from typing import Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rankrag_jax import backends
from rankrag_jax.backends.cpu import decode as cpu_decode
from rankrag_jax.backends.cpu.decode import DecodeWeights, lm_head_logits, make_decode_weights
from rankrag_jax.model import attention
from rankrag_jax.model import axes
from rankrag_jax.model.config import LlamaConfig
from rankrag_jax.model import llama
from rankrag_jax.model import token_layout
from rankrag_jax.model.llama import Llama

Array = jax.Array

# A batch's shared prompt prefix is rounded down to a multiple of this: few compiled shapes across batches.
PREFIX_MULTIPLE = 8


@gin.configurable
def max_new_tokens_for_task(task: str, open_domain_qa: int = 32, conversational_qa: int = 128,
                            fever: int = 8) -> int:
  """The paper's generation budget per task (§5.1): 32 open-domain QA, 128 conversational QA, 8 FEVER."""
  budgets = {"open_domain_qa": open_domain_qa, "conversational_qa": conversational_qa, "fever": fever}
  if task not in budgets:
    raise ValueError(f"unknown generation task {task!r}; known: {sorted(budgets)}")
  return budgets[task]


@gin.configurable
def length_bucket(length: int, min_bucket: int = 16) -> int:
  """The smallest of min_bucket * {1, 1.5, 2, 3, 4, 6, ...} that holds `length`: few shapes, <= 1/3 padding."""
  bucket = min_bucket
  while True:
    if length <= bucket:
      return bucket
    if length <= bucket * 3 // 2:
      return bucket * 3 // 2
    bucket *= 2


def data_parallel_size(mesh: Mesh | None) -> int:
  """How many ways a batch is split on `mesh` (its data and fsdp axes); 1 without a mesh."""
  if mesh is None:
    return 1
  return mesh.shape.get(axes.DATA, 1) * mesh.shape.get(axes.FSDP, 1)


def shard_batch(arrays, mesh: Mesh | None):
  """Places arrays with a leading batch dimension split over the mesh's data-parallel axes (no-op without one)."""
  if mesh is None or data_parallel_size(mesh) == 1:
    return arrays
  batch_axes = tuple(a for a in (axes.DATA, axes.FSDP) if a in mesh.shape)

  def put(x):
    spec = PartitionSpec(batch_axes, *([None] * (np.ndim(x) - 1)))
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree.map(put, arrays)


def _top_p_filter(logits: Array, top_p: Array) -> Array:
  """Keeps the smallest set of most likely tokens whose probability reaches top_p; others get -inf."""
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # A token stays if the mass strictly before it is below top_p (so the most likely token always stays).
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
  threshold = jnp.min(kept, axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def _next_tokens(logits: Array, row_keys: Array, step: Array, temperature: Array, top_p: Array,
                 sample: bool) -> Array:
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = _top_p_filter(logits / temperature, top_p)
  keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def decode_batch(params: dict, weights: DecodeWeights | None, config: LlamaConfig, kv_buffer: dict, tokens: Array,
                 lengths: Array, stop_ids: Array, row_keys: Array, temperature: Array, top_p: Array, *,
                 max_new_tokens: int, sample: bool = False, prefix_length: int = 0, num_tokens: int = 0,
                 num_shards: int = 1) -> tuple[Array, Array, dict]:
  """Generates up to `max_new_tokens` tokens for each right-padded prompt row.

  Args:
    params: model parameters.
    weights: None to step the stacked layers of `params`, or `make_decode_weights(params, config)`: per-layer
      copies of the layer weights to run with a per-layer cache, and the LM head (`DecodeWeights`). On XLA:CPU,
      stepping the stacked layers copies every layer's weights out of the stack at each step (~40% of a batch-8
      SmolLM2 step).
    config: the model's config (static; its attention_impl resolved for the target, `attention.for_target`).
    kv_buffer: {"k", "v"} of `empty_kv_buffer` for B rows and T + max_new_tokens slots, whatever they hold (a
      previous call's cache): the call writes its KV cache there (jitted: donated) and returns it. Every slot is
      written before it is read.
    tokens: int32 [B, T] prompts, right-padded (pad ids are ignored).
    lengths: int32 [B] real prompt lengths (>= 1).
    stop_ids: int32 [S] ids that end a row (the stop id itself is emitted and counted).
    row_keys: [B] PRNG keys, one per row (unused when greedy).
    temperature, top_p: float32 scalars for sampling.
    max_new_tokens: the decode budget (static: sizes the KV cache and the output).
    sample: False for greedy (argmax), True for temperature / top-p sampling.
    prefix_length: how many leading tokens all rows share, computed once (static; < every row's length).
    num_tokens: 0, or the prompt prefill's compact token budget per data shard (static; >= each shard's real
      tokens after the prefix, `prefill_token_budget`): its projections and MLP then run on the real tokens only.
    num_shards: the data shards the rows are split over (static; with num_tokens).

  Returns:
    (new_tokens int32 [B, max_new_tokens], num_new int32 [B], the kv_buffer); token entries past num_new are 0.
  """
  model = Llama(config)
  batch, prompt_len = tokens.shape
  slots = jnp.arange(prompt_len)
  positions = jnp.broadcast_to(slots, (batch, prompt_len))
  segment_ids = (slots[None, :] < lengths[:, None]).astype(jnp.int32)
  unstack_layers = weights is not None
  if unstack_layers:  # each step reads every layer's weights and cache in place.
    # The prompt's products (hundreds of rows) run as XLA's dots on the [K, N] copies, decode steps' on the
    # panel copies when there are some.
    prefill_forward = functools.partial(cpu_decode.unstacked_hidden_states, config, params, weights.layers)
    step_forward = prefill_forward
    if weights.has_panels:
      step_forward = functools.partial(cpu_decode.unstacked_hidden_states, config, params, weights.panel_layers,
                                       panels=True)
    lm_head = functools.partial(lm_head_logits, config, weights)
  else:
    step_forward = prefill_forward = functools.partial(model.apply, {"params": params}, method=Llama.hidden_states)
    lm_head = functools.partial(model.apply, {"params": params}, method=Llama.logits_from_hidden)
  # The cache's index is static during the prefill: it attends block by block (ops.prefill_blockwise_attention).
  # The prompt slots are all written below; the new tokens' slots are zeroed, so nothing stale is ever read.
  cache = {"k": _zero_slots(kv_buffer["k"], prompt_len), "v": _zero_slots(kv_buffer["v"], prompt_len),
           "segment_ids": jnp.zeros((batch, prompt_len + max_new_tokens), jnp.int32), "index": 0}
  p = prefix_length
  if p:  # the rows' common prefix runs once (batch 1); its keys/values are then every row's first slots.
    prefix = llama.init_cache(config, 1, p, per_layer=unstack_layers)
    prefix["index"] = 0
    _, prefix = prefill_forward(tokens[:1, :p], positions[:1, :p], segment_ids[:1, :p], prefix,
                                output_slots=jnp.full((1, 1), p - 1, jnp.int32))  # only its cache is used
    cache = _with_prefix_in_every_row(cache, prefix)
  layout = token_layout.make_layout(segment_ids[:, p:], num_shards, num_tokens) if num_tokens else None
  # Only each prompt's last token needs logits: with per-layer weights the last layer runs its queries and MLP
  # there only (the stacked layers gather it after the last layer).
  hidden, cache = prefill_forward(tokens[:, p:], positions[:, p:], segment_ids[:, p:], cache, layout=layout,
                                  output_slots=(lengths - 1 - p)[:, None])
  cache["index"] = jnp.int32(cache["index"])  # the decode loop carries it
  last_hidden = hidden[:, 0]
  logits = lm_head(last_hidden)

  def emit(state):  # picks each running row's next token from `logits`; a row is done once it emits a stop id.
    step, cache, logits, done, new_tokens, num_new = state
    token = jnp.where(done, 0, _next_tokens(logits, row_keys, step, temperature, top_p, sample))
    return (step + 1, cache, logits, done | jnp.isin(token, stop_ids), new_tokens.at[:, step].set(token),
            num_new + (~done).astype(jnp.int32)), token

  def emit_and_step(state):
    (step, cache, _, done, new_tokens, num_new), token = emit(state)
    hidden, cache = step_forward(token[:, None], (lengths + step - 1)[:, None], jnp.ones((batch, 1), jnp.int32), cache)
    logits = lm_head(hidden[:, 0])
    return step, cache, logits, done, new_tokens, num_new

  # The last token needs no forward pass: the loop stops one token early and `emit` picks it from the last logits
  # (a no-op for rows already done).
  state = (jnp.zeros((), jnp.int32), cache, logits, jnp.zeros((batch,), bool),
           jnp.zeros((batch, max_new_tokens), jnp.int32), jnp.zeros((batch,), jnp.int32))
  state = jax.lax.while_loop(lambda s: (s[0] < max_new_tokens - 1) & ~jnp.all(s[3]), emit_and_step, state)
  (_, cache, _, _, new_tokens, num_new), _ = emit(state)
  return new_tokens, num_new, {"k": cache["k"], "v": cache["v"]}


def _zero_slots(kv, start: int):
  """Keys or values (stacked or per-layer) with slots [start, S) zeroed."""
  return jax.tree.map(lambda x: x.at[..., start:, :].set(0), kv)


def _with_prefix_in_every_row(cache: dict, prefix: dict) -> dict:
  """`cache` with the batch-1 `prefix` cache's p slots written at slots [0, p) of every row."""
  def write(x, prefix_x):  # per-layer [B, Kh, S, D] or stacked [L, B, Kh, S, D]
    batch_axis = x.ndim - 4
    rows = jnp.broadcast_to(prefix_x, prefix_x.shape[:batch_axis] + (x.shape[batch_axis],)
                            + prefix_x.shape[batch_axis + 1:])
    return jax.lax.dynamic_update_slice_in_dim(x, rows.astype(x.dtype), 0, axis=x.ndim - 2)
  p = prefix["segment_ids"].shape[1]
  return {"k": jax.tree.map(write, cache["k"], prefix["k"]), "v": jax.tree.map(write, cache["v"], prefix["v"]),
          "segment_ids": cache["segment_ids"].at[:, :p].set(prefix["segment_ids"]), "index": prefix["index"]}


def empty_kv_buffer(config: LlamaConfig, batch: int, slots: int, per_layer: bool, mesh: Mesh | None = None) -> dict:
  """Zeroed keys and values for `decode_batch` (per-layer or stacked, as `llama.init_cache`), their batch axis
  split over the mesh's data-parallel axes."""
  cache = _jitted_init_cache(config, batch, slots, per_layer=per_layer)
  kv = {"k": cache["k"], "v": cache["v"]}
  if mesh is None or data_parallel_size(mesh) == 1:
    return kv
  batch_axes = tuple(a for a in (axes.DATA, axes.FSDP) if a in mesh.shape)
  spec = PartitionSpec(batch_axes) if per_layer else PartitionSpec(None, batch_axes)
  return jax.device_put(kv, NamedSharding(mesh, spec))


_jitted_init_cache = jax.jit(llama.init_cache, static_argnums=(0, 1, 2), static_argnames="per_layer")


def shared_prefix_length(sequences: Sequence[Sequence[int]], multiple: int = 1) -> int:
  """Tokens every sequence starts with, leaving at least one token of each of its own, rounded down to
  `multiple` (so a few compiled shapes serve all batches)."""
  limit = min(len(s) for s in sequences) - 1
  first = sequences[0]
  length = 0
  while length < limit and all(s[length] == first[length] for s in sequences):
    length += 1
  return length // multiple * multiple


@functools.cache
def _jitted_decode_batch(platform: str):
  """decode_batch jitted for the target `platform`, with its `backends.compiler_options`."""
  return jax.jit(decode_batch, static_argnames=("config", "max_new_tokens", "sample", "prefix_length", "num_tokens",
                                                "num_shards"),
                 donate_argnames="kv_buffer", compiler_options=backends.compiler_options(platform))


@gin.configurable
class KVBuffers:
  """The KV cache memory of `generate`'s recent batch shapes, kept between calls for the next batch of a shape.

  Why: a decode program's cache is most of its memory (SmolLM2, 8 rows x 280 slots: 103 MB). Allocated per call,
  the host's allocator maps it fresh and every 4 KiB page faults in on first write (~0.12 s per call on the
  benchmark machine); a buffer that a call donates back to the next is already resident.
  """

  def __init__(self, max_shapes: int = 2):
    if max_shapes < 0:
      raise ValueError(f"KVBuffers: max_shapes must be >= 0 (0 keeps none), got {max_shapes}")
    self.max_shapes = max_shapes
    self._buffers: collections.OrderedDict = collections.OrderedDict()

  def take(self, shape: tuple, make: Callable[[], dict]) -> dict:
    """The kept buffer for `shape` (removed: the call donates it), or `make()`."""
    return self._buffers.pop(shape, None) or make()

  def put(self, shape: tuple, kv: dict) -> None:
    """Keeps `kv` for the next call of `shape`, dropping the least recently kept beyond max_shapes."""
    self._buffers[shape] = kv
    self._buffers.move_to_end(shape)
    while len(self._buffers) > self.max_shapes:
      self._buffers.popitem(last=False)


@gin.configurable(denylist=["params", "config", "prompts", "max_new_tokens", "stop_ids"])
def generate(params: dict, config: LlamaConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             stop_ids: Sequence[int], temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             batch_size: int = 8, mesh: Mesh | None = None, keep_stop_token: bool = False,
             decode_weights: DecodeWeights | None | str = "auto", compact_granularity: int = 16,
             kv_buffers: KVBuffers | None = None) -> list[list[int]]:
  """Continues each prompt (token ids) and returns its new token ids, in the order of `prompts`.

  Args:
    params, config: the model.
    prompts: token-id lists (each non-empty).
    max_new_tokens: at most this many new tokens per prompt (see `max_new_tokens_for_task`).
    stop_ids: a row stops after emitting one of these (EOS / end-of-turn).
    temperature: 0 for greedy decoding (the paper's setting); > 0 samples.
    top_p: nucleus mass kept when sampling.
    seed: sampling seed; row i always uses key fold_in(seed, i), whatever the batching.
    batch_size: rows per compiled batch (prompts are grouped by length bucket; short batches are padded).
    mesh: when given with >1 data-parallel device, batches are split over its data axes.
    keep_stop_token: whether the returned ids end with the stop id that ended the row.
    decode_weights: the weights to decode from, as `make_decode_weights(params, config, mesh)` makes them once for
      many calls; None steps the stacked layers of `params`; "auto" calls `make_decode_weights` (once per call).
    compact_granularity: the prompt prefill runs its projections and MLP on the real tokens only, their count
      rounded up to this (one compiled program per count: `token_layout.prefill_token_budget`); 0 computes the
      padded rows too (bench/README.md: ~10% of the prefill for 8 RAG prompts).
    kv_buffers: where the KV cache memory of recent batch shapes is kept between calls (`KVBuffers`; a caller
      that generates many times passes the same one, as `rag.RagModel` does); None: fresh memory per batch.

  Returns:
    One list of new token ids per prompt.
  """
  if not prompts:
    return []
  if any(len(p) == 0 for p in prompts):
    raise ValueError("generate: every prompt needs at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  if compact_granularity < 0:
    raise ValueError(f"generate: compact_granularity must be >= 0 (0: no compaction), got {compact_granularity}")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
  config = attention.for_target(config, mesh)
  if isinstance(decode_weights, str):
    if decode_weights != "auto":
      raise ValueError("generate: decode_weights must be make_decode_weights(params, config), None or 'auto', got "
                       f"{decode_weights!r}")
    decode_weights = make_decode_weights(params, config, mesh)
  rows_per_batch = -(-batch_size // data_parallel_size(mesh)) * data_parallel_size(mesh)
  stop = jnp.asarray(sorted(set(stop_ids)) or [-1], jnp.int32)
  base_key = jax.random.key(seed)
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  results: list[list[int]] = [[] for _ in prompts]
  for start in range(0, len(order), rows_per_batch):
    rows = order[start:start + rows_per_batch]
    # RAG prompts of one batch share their system turn and instruction: it is computed once, and only the rest
    # of each prompt is padded (to a length bucket).
    prefix_length = shared_prefix_length([prompts[i] for i in rows], PREFIX_MULTIPLE)
    bucket = prefix_length + length_bucket(max(len(prompts[i]) for i in rows) - prefix_length)
    # A short (last) batch is padded to a power of two, not to batch_size: few shapes, little wasted compute.
    padded_rows = min(rows_per_batch, 1 << (len(rows) - 1).bit_length())
    padded_rows = -(-padded_rows // data_parallel_size(mesh)) * data_parallel_size(mesh)
    tokens = np.zeros((padded_rows, bucket), np.int32)
    lengths = np.ones((padded_rows,), np.int32)
    # Padding rows repeat the first row (their output is discarded), so they share its prefix.
    for r, i in enumerate(rows + [rows[0]] * (padded_rows - len(rows))):
      tokens[r, :len(prompts[i])] = prompts[i]
      lengths[r] = len(prompts[i])
    num_shards = data_parallel_size(mesh)
    suffix_segments = np.arange(prefix_length, bucket)[None, :] < lengths[:, None]
    num_tokens = token_layout.prefill_token_budget(suffix_segments, num_shards, compact_granularity)
    row_ids = np.asarray(rows + [0] * (padded_rows - len(rows)), np.uint32)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base_key, row_ids)
    tokens, lengths, row_keys = shard_batch((tokens, lengths, row_keys), mesh)
    decode = _jitted_decode_batch(attention.target_platform(mesh))
    kv_shape = (padded_rows, bucket + max_new_tokens, decode_weights is not None)
    make_kv = lambda: empty_kv_buffer(config, *kv_shape, mesh)
    kv = make_kv() if kv_buffers is None else kv_buffers.take(kv_shape, make_kv)
    new_tokens, num_new, kv = decode(params, decode_weights, config, kv, tokens, lengths, stop, row_keys,
                                     jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                                     max_new_tokens=max_new_tokens, sample=temperature > 0,
                                     prefix_length=prefix_length, num_tokens=num_tokens, num_shards=num_shards)
    if kv_buffers is not None:
      kv_buffers.put(kv_shape, kv)
    new_tokens, num_new = np.asarray(new_tokens), np.asarray(num_new)
    stop_set = set(int(s) for s in stop_ids)
    for r, i in enumerate(rows):
      ids = new_tokens[r, :num_new[r]].tolist()
      if ids and ids[-1] in stop_set and not keep_stop_token:
        ids = ids[:-1]
      results[i] = ids
  return results
