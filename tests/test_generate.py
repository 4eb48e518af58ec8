"""KV-cache decoding equals decoding by repeated full forward passes; sampling is reproducible by seed."""

import dataclasses
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankrag_jax import generate as generate_lib
from rankrag_jax.model import config as config_lib
from rankrag_jax.backends.cpu import build as cpu_build
from rankrag_jax.backends.cpu import decode as decode_weights_lib
from rankrag_jax.model import llama

MAX_NEW = 10
# Different lengths in one batch (right padding, per-row positions), all in the 16-token bucket.
PROMPTS = [[5, 6, 7], list(range(10, 26)), [1], list(range(40, 49))]


REFERENCE_LENGTH = 32  # every reference forward is right-padded to this, so it compiles once.


@pytest.fixture(scope="module")
def tiny_model():
  config = config_lib.tiny()
  return config, jax.jit(functools.partial(llama.init_params, config))(jax.random.key(0))


@functools.partial(jax.jit, static_argnames="config")
def _full_forward_logits(params, config, tokens, segment_ids):
  return llama.Llama(config).apply({"params": params}, tokens, segment_ids=segment_ids)


def greedy_by_full_forwards(config, params, prompt, max_new, stop_ids=(), width=REFERENCE_LENGTH):
  """The reference: re-run the whole sequence without a cache for every new token.

  Right padding (segment 0) after the sequence cannot change causal logits at or before its last token.
  """
  sequence, new = list(prompt), []
  for _ in range(max_new):
    tokens = jnp.zeros((1, width), jnp.int32).at[0, :len(sequence)].set(jnp.asarray(sequence))
    segment_ids = (jnp.arange(width) < len(sequence)).astype(jnp.int32)[None]
    logits = _full_forward_logits(params, config, tokens, segment_ids)
    token = int(jnp.argmax(logits[0, len(sequence) - 1]))
    new.append(token)
    sequence.append(token)
    if token in stop_ids:
      break
  return new


# Three rows with a common 17-token prefix (16 of it computed once); batch_size=4 pads them with a fourth row.
SHARED = list(range(100, 119))
PREFIXED_PROMPTS = [SHARED + [7], SHARED + [8, 9, 10], SHARED[:17] + [3] * 5]


def test_shared_prefix_length_rounds_down_and_leaves_each_row_a_token():
  assert generate_lib.shared_prefix_length(PREFIXED_PROMPTS, multiple=16) == 16
  assert generate_lib.shared_prefix_length(PREFIXED_PROMPTS) == 17
  assert generate_lib.shared_prefix_length([SHARED, SHARED]) == len(SHARED) - 1
  assert generate_lib.shared_prefix_length(PROMPTS) == 0


def decode_weights(params, config, kind):
  """The weights generate steps: "panels" (the CPU default), "unstacked" (per-layer, XLA dots) or "stacked"."""
  if kind == "stacked":
    return None
  # Panel copies are made where attention_impl resolves to cpu_ffi (this machine has the compiled CPU kernels).
  weights_config = config if kind == "panels" else dataclasses.replace(config, attention_impl="blockwise")
  weights = decode_weights_lib.make_decode_weights(params, weights_config)
  assert weights.has_panels == (kind == "panels")
  return weights


DECODE_WEIGHTS = ["panels", "unstacked", "stacked"]


def test_decode_weights_keep_the_kernels_layout_without_cpu_kernels(tiny_model, monkeypatch):
  # No C++ compiler (CPU kernels unavailable), or bf16 weights: per-layer copies in the kernels' own layout.
  config, params = tiny_model
  monkeypatch.setattr(cpu_build, "available", lambda: False)
  weights = decode_weights_lib.make_decode_weights(params, config)
  assert not weights.has_panels
  np.testing.assert_array_equal(weights.layers[1]["mlp"]["up_proj"]["kernel"],
                                params["layers"]["mlp"]["up_proj"]["kernel"][1])
  monkeypatch.undo()
  assert not decode_weights_lib.make_decode_weights(params, dataclasses.replace(config, dtype=jnp.bfloat16)).has_panels


@pytest.mark.parametrize("compact", [16, 0], ids=["compact_prefill", "padded_prefill"])
@pytest.mark.parametrize("weights", DECODE_WEIGHTS)
@pytest.mark.parametrize("prompts", [PROMPTS, PREFIXED_PROMPTS], ids=["different", "shared_prefix"])
def test_kv_cache_greedy_equals_repeated_full_forwards(tiny_model, weights, prompts, compact):
  config, params = tiny_model
  got = generate_lib.generate(params, config, prompts, max_new_tokens=MAX_NEW, stop_ids=[], batch_size=4,
                              decode_weights=decode_weights(params, config, weights), compact_granularity=compact)
  for prompt, new in zip(prompts, got):
    assert new == greedy_by_full_forwards(config, params, prompt, MAX_NEW)


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied_embeddings"])
def test_lm_head_in_column_blocks_equals_full_forwards(tied, monkeypatch, request):
  # Per-layer weights decode with the output projection in column blocks: 256 = 100 + 100 + 56 columns here.
  # jax reuses a function's traced program whatever module constants say: clear traces so generate sees 100, and
  # again afterwards so no later test gets the 100-column program.
  monkeypatch.setattr(decode_weights_lib, "LM_HEAD_BLOCK", 100)
  jax.clear_caches()
  request.addfinalizer(jax.clear_caches)
  config = config_lib.tiny(tie_word_embeddings=tied)
  params = jax.jit(functools.partial(llama.init_params, config))(jax.random.key(1))
  blocks = decode_weights_lib._lm_head_column_blocks(params, config)
  assert [b.shape for b in blocks] == [(64, 100), (64, 100), (64, 56)]
  hidden = jax.random.normal(jax.random.key(2), (3, config.hidden_size))
  want = llama.Llama(config).apply({"params": params}, hidden, method=llama.Llama.logits_from_hidden)
  got = decode_weights_lib.lm_head_logits(config, decode_weights_lib.DecodeWeights([], blocks), hidden)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got = generate_lib.generate(params, config, PREFIXED_PROMPTS, max_new_tokens=6, stop_ids=[], batch_size=4,
                              decode_weights=decode_weights(params, config, "unstacked"))
  assert got == [greedy_by_full_forwards(config, params, prompt, 6) for prompt in PREFIXED_PROMPTS]


def test_panel_layers_compute_what_the_layers_compute(tiny_model):
  # The decode steps' layers, q/k/v and gate/up fused (decode_weights.fuse_panel_projections), in panel order, through
  # row_matmul, against the plain per-layer params through XLA's dots: a wrong fusion order or split differs.
  config, params = tiny_model
  weights = decode_weights(params, config, "panels")
  tokens = jnp.array([[5, 9, 2, 7], [3, 3, 8, 1]])
  positions, segment_ids = jnp.broadcast_to(jnp.arange(4), tokens.shape), jnp.ones_like(tokens)
  cache = llama.init_cache(config, 2, 8, per_layer=True)
  hidden = lambda layers, panels: decode_weights_lib.unstacked_hidden_states(config, params, layers, tokens, positions,
                                                                             segment_ids, cache, panels=panels)
  (got, got_cache), (want, want_cache) = hidden(weights.panel_layers, True), hidden(weights.layers, False)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  for name in ("k", "v"):
    np.testing.assert_allclose(np.stack(got_cache[name]), np.stack(want_cache[name]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied_embeddings"])
def test_lm_head_in_panels_equals_full_forwards(tied):
  # The panel-order output projection: 250 columns are padded to 256 for the kernel, and the logits cut back.
  config = config_lib.tiny(tie_word_embeddings=tied, vocab_size=250)
  params = jax.jit(functools.partial(llama.init_params, config))(jax.random.key(1))
  weights = decode_weights(params, config, "panels")
  hidden = jax.random.normal(jax.random.key(2), (3, config.hidden_size))
  want = llama.Llama(config).apply({"params": params}, hidden, method=llama.Llama.logits_from_hidden)
  got = decode_weights_lib.lm_head_logits(config, weights, hidden)
  assert got.shape == (3, 250)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got = generate_lib.generate(params, config, PREFIXED_PROMPTS, max_new_tokens=6, stop_ids=[], batch_size=4,
                              decode_weights=weights)
  assert got == [greedy_by_full_forwards(config, params, prompt, 6) for prompt in PREFIXED_PROMPTS]


@pytest.mark.parametrize("kind", DECODE_WEIGHTS)
def test_reused_kv_buffers_hold_nothing_over_between_calls(tiny_model, kind):
  # A call writes its cache into the previous same-shape call's (donated) buffer: the second batch must decode as
  # from fresh memory, although the buffer still holds the first batch's keys and values (and more slots of them).
  config, params = tiny_model
  weights = decode_weights(params, config, kind)
  buffers = generate_lib.KVBuffers()
  first = [[row] + list(range(61, 76)) for row in range(4)]  # no common prefix; fills the 16-token bucket
  generate_lib.generate(params, config, first, max_new_tokens=MAX_NEW, stop_ids=[], batch_size=4,
                        decode_weights=weights, kv_buffers=buffers)
  (kept,) = buffers._buffers.values()
  got = generate_lib.generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, stop_ids=[], batch_size=4,
                              decode_weights=weights, kv_buffers=buffers)
  assert all(x.is_deleted() for x in jax.tree.leaves(kept))  # donated to the second call: its memory was reused
  assert got == [greedy_by_full_forwards(config, params, prompt, MAX_NEW) for prompt in PROMPTS]


def test_kv_buffers_keep_the_most_recent_shapes():
  buffers = generate_lib.KVBuffers(max_shapes=2)
  for shape in ("a", "b", "a", "c"):
    buffers.put(shape, {"k": shape})
  assert list(buffers._buffers) == ["a", "c"]
  assert buffers.take("a", lambda: {"k": "new"}) == {"k": "a"}
  assert buffers.take("a", lambda: {"k": "new"}) == {"k": "new"}  # taken: the call that took it owns it


def test_default_prefill_runs_on_the_real_tokens_only(tiny_model, monkeypatch):
  # PROMPTS fill 29 of 4 x 16 suffix slots: the default budget (16-token units) computes 32 of them.
  config, params = tiny_model
  budgets = []
  budget = generate_lib.token_layout.prefill_token_budget
  monkeypatch.setattr(generate_lib.token_layout, "prefill_token_budget",
                      lambda *args: budgets.append(budget(*args)) or budgets[-1])
  generate_lib.generate(params, config, PROMPTS, max_new_tokens=2, stop_ids=[], batch_size=4)
  assert budgets == [32]


@pytest.mark.parametrize("max_new", [1, 2])
def test_short_budgets_equal_repeated_full_forwards(tiny_model, max_new):
  # The decode loop stops one token early and picks the last token from the last logits without a forward pass.
  config, params = tiny_model
  got = generate_lib.generate(params, config, PREFIXED_PROMPTS, max_new_tokens=max_new, stop_ids=[], batch_size=4)
  assert got == [greedy_by_full_forwards(config, params, prompt, max_new) for prompt in PREFIXED_PROMPTS]


@pytest.mark.parametrize("kind", ["panels", "stacked"])
def test_long_prefills_attend_block_by_block_and_equal_full_forwards(tiny_model, kind):
  # Suffixes longer than ops.PREFILL_QUERY_BLOCK after a shared prefix: the prefill runs in query blocks.
  config, params = tiny_model
  prompts = [SHARED + list(range(1, 120)), SHARED + list(range(30, 100)), SHARED + [7] * 3]
  got = generate_lib.generate(params, config, prompts, max_new_tokens=3, stop_ids=[], batch_size=4,
                              decode_weights=decode_weights(params, config, kind))
  assert got == [greedy_by_full_forwards(config, params, prompt, 3, width=160) for prompt in prompts]


def test_rows_stop_at_their_stop_token_and_others_continue(tiny_model):
  config, params = tiny_model
  free = generate_lib.generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, stop_ids=[], batch_size=4)
  stop = free[0][2]  # row 0's third token: row 0 must end there.
  got = generate_lib.generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, stop_ids=[stop], batch_size=4,
                              keep_stop_token=True)
  for prompt, new in zip(PROMPTS, got):
    assert new == greedy_by_full_forwards(config, params, prompt, MAX_NEW, stop_ids=(stop,))
  assert got[0] == free[0][:3]
  without_stop = generate_lib.generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, stop_ids=[stop],
                                       batch_size=4)
  assert without_stop[0] == free[0][:2]


def test_sampling_is_reproducible_by_seed_whatever_the_batching(tiny_model):
  config, params = tiny_model
  sample = lambda seed, batch_size: generate_lib.generate(params, config, PROMPTS, max_new_tokens=MAX_NEW,
                                                          stop_ids=[], temperature=1.0, top_p=0.9, seed=seed,
                                                          batch_size=batch_size)
  first = sample(3, 4)
  assert sample(3, 4) == first
  assert sample(3, 2) == first  # row i's key depends only on (seed, i).
  assert sample(4, 4) != first
  greedy = generate_lib.generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, stop_ids=[], batch_size=4)
  assert first != greedy


def test_top_p_near_zero_is_greedy(tiny_model):
  config, params = tiny_model
  greedy = generate_lib.generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, stop_ids=[], batch_size=4)
  nucleus_of_one = generate_lib.generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, stop_ids=[],
                                         temperature=0.7, top_p=1e-6, seed=1, batch_size=4)
  assert nucleus_of_one == greedy


def test_max_new_tokens_defaults_are_the_papers_and_gin_overrides_them():
  assert [generate_lib.max_new_tokens_for_task(t) for t in ("open_domain_qa", "conversational_qa", "fever")] == [
      32, 128, 8]
  with gin.unlock_config():
    gin.parse_config("max_new_tokens_for_task.fever = 4")
  try:
    assert generate_lib.max_new_tokens_for_task("fever") == 4
  finally:
    gin.clear_config()
  with pytest.raises(ValueError, match="unknown generation task"):
    generate_lib.max_new_tokens_for_task("summarisation")


def test_length_buckets_are_few_and_pad_at_most_a_third():
  lengths = range(1, 5000)
  buckets = {generate_lib.length_bucket(n) for n in lengths}
  assert len(buckets) <= 20
  assert all(n <= generate_lib.length_bucket(n) <= max(16, n * 3 // 2 + 1) for n in lengths)


def test_bad_generation_inputs_are_rejected(tiny_model):
  config, params = tiny_model
  with pytest.raises(ValueError, match="at least one token"):
    generate_lib.generate(params, config, [[1], []], max_new_tokens=4, stop_ids=[])
  with pytest.raises(ValueError, match="top_p"):
    generate_lib.generate(params, config, [[1]], max_new_tokens=4, stop_ids=[], top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
    generate_lib.generate(params, config, [[1]], max_new_tokens=0, stop_ids=[])
  with pytest.raises(ValueError, match="compact_granularity must be >= 0"):
    generate_lib.generate(params, config, [[1]], max_new_tokens=4, stop_ids=[], compact_granularity=-16)
  with pytest.raises(ValueError, match="decode_weights must be"):
    generate_lib.generate(params, config, [[1]], max_new_tokens=4, stop_ids=[], decode_weights="stacked")
  assert generate_lib.generate(params, config, [], max_new_tokens=4, stop_ids=[]) == []


def test_smollm2_greedy_tokens_equal_transformers(tmp_path):
  """Real SmolLM2-135M-Instruct weights, decoded from the CPU decode weights (panel kernels through row_matmul):
  the same greedy tokens as transformers' `generate` on the exported weights."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from rankrag_jax.convert import hf, load  # pylint: disable=g-import-not-at-top
  config, params, tok = load.load_model("smollm2_135m_instruct")
  questions = ["What is the capital of France?", "Name a colour of the sky.", "How many legs has a spider?"]
  prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_bos=tok.add_bos_by_default)
             for q in questions]
  weights = decode_weights(params, config, "panels")
  got = generate_lib.generate(params, config, prompts, max_new_tokens=8, stop_ids=[], decode_weights=weights)
  hf.save_hf_checkpoint(tmp_path, config, params)
  reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  for prompt, new in zip(prompts, got):
    out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=8, do_sample=False)
    want = out[0, len(prompt):].tolist()  # up to its end-of-turn token, where transformers stops and we do not
    assert len(want) >= 4 and new[:len(want)] == want
