"""The P("True") kernel equals P("True") from a plain full forward (ours and transformers'), whatever the batching."""

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankrag_jax import assets, prompts, rerank
from rankrag_jax import tokenizer as tokenizer_lib
from rankrag_jax.model import config as config_lib
from rankrag_jax.backends.cpu import build as cpu_build
from rankrag_jax.model import llama

ANSWER_IDS = (84, 70)
QUESTION = "what is the capital of france?"
PASSAGES = ["Paris is the capital and largest city of France.",
            "The Eiffel Tower was completed in 1889 on the Champ de Mars in Paris.",
            "Bananas are botanically berries and grow in tropical regions of the world.",
            "Berlin is the capital of Germany and its largest city by population."]


@functools.partial(jax.jit, static_argnames="config")
def _full_forward_log_probs(params, config, tokens, segment_ids, last):
  """Plain full forward (no cache, no prefix sharing), full-vocabulary log-softmax at position `last`."""
  logits = llama.Llama(config).apply({"params": params}, tokens, segment_ids=segment_ids)
  return jax.nn.log_softmax(logits[0, last])


def reference_log_probs(params, config, sequences, answer_ids, pad_to=256):
  rows = []
  for seq in sequences:
    tokens = jnp.zeros((1, pad_to), jnp.int32).at[0, :len(seq)].set(jnp.asarray(seq))
    segment_ids = (jnp.arange(pad_to) < len(seq)).astype(jnp.int32)[None]
    log_probs = _full_forward_log_probs(params, config, tokens, segment_ids, len(seq) - 1)
    rows.append(np.asarray(log_probs)[list(answer_ids)])
  return np.stack(rows)


@pytest.fixture(scope="module")
def tiny_model():
  config = config_lib.tiny()
  return config, jax.jit(functools.partial(llama.init_params, config))(jax.random.key(0))


@pytest.fixture(scope="module")
def token_sequences():
  """Prompts sharing a 23-token prefix, then suffixes of very different lengths (several buckets)."""
  rng = np.random.default_rng(0)
  prefix = rng.integers(1, 256, size=23).tolist()
  return [prefix + rng.integers(1, 256, size=n).tolist() for n in (1, 5, 17, 40, 41, 90, 3, 33)]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
  return tokenizer_lib.load_tokenizer(assets.asset_file("smollm2_135m_instruct"))


def test_kernel_equals_p_true_from_a_full_forward(tiny_model, token_sequences):
  config, params = tiny_model
  assert cpu_build.attention_usable(config)  # so these scores' attention runs through cpu_attention.cc
  got = rerank.score_token_sequences(params, config, token_sequences, ANSWER_IDS)
  want = reference_log_probs(params, config, token_sequences, ANSWER_IDS)
  np.testing.assert_allclose(np.exp(got), np.exp(want), atol=1e-5, rtol=0)
  normalised = lambda lp: 1 / (1 + np.exp(lp[:, 1] - lp[:, 0]))
  np.testing.assert_allclose(normalised(got), normalised(want), atol=1e-5, rtol=0)


def test_bucketing_batching_and_shared_prefix_do_not_change_scores(tiny_model, token_sequences, monkeypatch):
  config, params = tiny_model
  budgets = []
  budget = rerank.token_layout.prefill_token_budget
  monkeypatch.setattr(rerank.token_layout, "prefill_token_budget",
                      lambda *args: budgets.append(budget(*args)) or budgets[-1])
  default = np.exp(rerank.score_token_sequences(params, config, token_sequences, ANSWER_IDS))
  assert any(budgets)  # the default runs some batch on its real tokens only
  variants = {
      "no shared prefix, one row per batch": dict(share_prefix=False, max_batch_rows=1),
      "tiny token budget": dict(max_batch_tokens=48),
      "padding slots computed (no compaction)": dict(compact_granularity=0),
      "compaction in 4-token units": dict(compact_granularity=4),
      "attention in XLA, not the CPU kernel": dict(config=dataclasses.replace(config, attention_impl="blockwise")),
      "reversed order": None,
  }
  for name, kwargs in variants.items():
    if kwargs is None:
      got = np.exp(rerank.score_token_sequences(params, config, token_sequences[::-1], ANSWER_IDS))[::-1]
    else:
      kwargs = {"config": config, **kwargs}
      got = np.exp(rerank.score_token_sequences(params, sequences=token_sequences, answer_ids=ANSWER_IDS, **kwargs))
    np.testing.assert_allclose(got, default, atol=1e-5, rtol=0, err_msg=name)


def test_batches_use_few_shapes_and_little_padding():
  def shapes_and_padding(lengths, **kwargs):
    shapes, padded, seen = set(), 0, []
    for rows, bucket, padded_rows in rerank._batches(lengths, **kwargs):
      assert all(lengths[i] <= bucket for i in rows) and len(rows) <= padded_rows
      shapes.add((padded_rows, bucket))
      padded += padded_rows * bucket
      seen += list(rows)
    assert sorted(seen) == list(range(len(lengths)))
    return len(shapes), padded / sum(lengths)

  num_shapes, padding = shapes_and_padding(list(range(1, 300)), max_batch_tokens=2048, max_batch_rows=64,
                                           multiple=1)
  assert num_shapes <= 20 and padding <= 1.1
  # bench/score.py's case: 100 passage suffixes of 139..203 tokens.
  lengths = list(np.random.default_rng(0).integers(139, 204, 100))
  num_shapes, padding = shapes_and_padding(lengths, max_batch_tokens=8192, max_batch_rows=16, multiple=1)
  assert num_shapes <= 6 and padding <= 1.08
  num_shapes, padding = shapes_and_padding(lengths, max_batch_tokens=8192, max_batch_rows=16, multiple=4)
  assert num_shapes <= 6 and padding <= 1.08


def test_shared_prefix_is_the_common_tokens_and_leaves_one_to_score():
  assert rerank.shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
  assert rerank.shared_prefix_length([[1, 2, 3]]) == 2
  assert rerank.shared_prefix_length([[1, 2], [1, 2, 3]]) == 1
  assert rerank.shared_prefix_length([[7], [8]]) == 0


def test_score_passages_renders_the_papers_prompt_and_counts_truncation(smollm2_tokenizer):
  tok = smollm2_tokenizer
  config = config_lib.tiny(vocab_size=tok.vocab_size, max_position_embeddings=160)
  params = jax.jit(functools.partial(llama.init_params, config))(jax.random.key(1))
  long_passage = " ".join(["The river flows north through the old town and past the mill."] * 40)
  passages = PASSAGES + [long_passage]
  scores = rerank.score_passages(params, config, tok, QUESTION, passages, chat_format="chatqa")
  assert scores.num_truncated == 1
  assert scores.prompt_lengths.max() <= 160 and scores.prompt_lengths[-1] >= 150
  # The same prompts through a plain full forward.
  true_false = prompts.true_false_token_ids(tok, "chatqa")
  sequences = []
  for passage in PASSAGES:
    text = prompts.render_prompt(prompts.ranking_prompt_example(QUESTION, passage), "chatqa", tok)
    assert text.endswith("Return True if relevant, otherwise False.\n\nAssistant:")
    sequences.append(tok.encode(text))
  want = np.exp(reference_log_probs(params, config, sequences, true_false))
  np.testing.assert_allclose(scores.p_true[:4], want[:, 0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(scores.p_true_normalised[:4], want[:, 0] / want.sum(axis=1), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(scores.prompt_lengths[:4], [len(s) for s in sequences])


def test_several_questions_in_one_pass_score_as_each_alone(smollm2_tokenizer):
  """score_questions batches questions' passages together (the evaluation harness's rate): each question's
  scores, truncation count and order are those of its own score_passages call."""
  tok = smollm2_tokenizer
  config = config_lib.tiny(vocab_size=tok.vocab_size, max_position_embeddings=160)
  params = jax.jit(functools.partial(llama.init_params, config))(jax.random.key(1))
  long_passage = " ".join(["The river flows north through the old town and past the mill."] * 40)
  items = [(QUESTION, PASSAGES), ("Where does the river flow?", [long_passage, PASSAGES[1]]),
           ("Who built the mill?", PASSAGES[2:])]
  together = rerank.score_questions(params, config, tok, items)
  assert [len(s.p_true) for s in together] == [len(ps) for _, ps in items]
  for (question, passages), got in zip(items, together):
    alone = rerank.score_passages(params, config, tok, question, passages)
    np.testing.assert_allclose(got.p_true, alone.p_true, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.p_true_normalised, alone.p_true_normalised, atol=1e-6, rtol=0)
    assert got.num_truncated == alone.num_truncated
    np.testing.assert_array_equal(got.prompt_lengths, alone.prompt_lengths)
  assert together[1].num_truncated == 1 and together[0].num_truncated == 0


def test_empty_question_or_passage_is_a_clear_error(tiny_model, smollm2_tokenizer):
  config, params = tiny_model
  with pytest.raises(ValueError, match="question is empty"):
    rerank.score_passages(params, config, smollm2_tokenizer, "  ", PASSAGES)
  with pytest.raises(ValueError, match="passage is empty"):
    rerank.score_passages(params, config, smollm2_tokenizer, QUESTION, ["fine", " "])
  with pytest.raises(ValueError, match="compact_granularity must be >= 0"):
    rerank.score_token_sequences(params, config, [[1, 2]], ANSWER_IDS, compact_granularity=-1)


def test_a_question_too_long_for_the_window_is_a_clear_error(smollm2_tokenizer):
  ids = lambda text: smollm2_tokenizer.encode(text)
  render = lambda ps: "User: " + " ".join(["why?"] * 300) + " Passage: " + ps[0]
  with pytest.raises(ValueError, match="even with every passage cut to one token"):
    rerank.fit_passages_to_window(render, smollm2_tokenizer, ["some passage"], max_tokens=100)
  assert ids("x")  # the tokenizer is real, not a stub.


def test_scores_are_the_same_when_sharded_over_two_devices(tmp_path):
  """Batches split over a 2-device data axis (forced host devices) score as on one device."""
  script = textwrap.dedent("""
      import functools, jax, numpy as np  # noqa
      jax.config.update("jax_default_matmul_precision", "highest")
      from rankrag_jax import generate, rag, rerank, sharding
      from rankrag_jax.model import config as config_lib, llama
      assert jax.device_count() == 2
      config = config_lib.tiny()
      params = jax.jit(functools.partial(llama.init_params, config))(jax.random.key(0))
      rng = np.random.default_rng(0)
      seqs = [[3] * 9 + rng.integers(1, 256, size=n).tolist() for n in (1, 5, 17, 3, 33)]
      mesh = sharding.make_mesh(data=2, fsdp=1, tensor=1)
      one = rerank.score_token_sequences(params, config, seqs, (84, 70))
      two = rerank.score_token_sequences(jax.device_put(params, sharding.replicated(mesh)), config, seqs,
                                         (84, 70), mesh=mesh)
      fsdp_mesh = sharding.make_mesh(data=1, fsdp=2, tensor=1)  # params split too, batch over fsdp.
      fsdp = rerank.score_token_sequences(rag.place_on_mesh(params, config, fsdp_mesh), config, seqs, (84, 70),
                                          mesh=fsdp_mesh)
      print("max_abs_diff", float(np.abs(np.exp(one) - np.exp(two)).max()))
      print("fsdp_max_abs_diff", float(np.abs(np.exp(one) - np.exp(fsdp)).max()))
      g1 = generate.generate(params, config, seqs, max_new_tokens=4, stop_ids=[])
      g2 = generate.generate(params, config, seqs, max_new_tokens=4, stop_ids=[], mesh=mesh)
      print("generation_equal", g1 == g2)
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-3000:]
  values = dict(line.split() for line in result.stdout.splitlines() if line.count(" ") == 1)
  assert float(values["max_abs_diff"]) <= 1e-5 and float(values["fsdp_max_abs_diff"]) <= 1e-5, result.stdout
  assert "generation_equal True" in result.stdout


@pytest.fixture(scope="module")
def smollm2():
  from rankrag_jax.convert import load  # pylint: disable=g-import-not-at-top
  return load.load_model("smollm2_135m_instruct")


def test_smollm2_scores_equal_transformers_p_true(smollm2, tmp_path):
  """Real SmolLM2-135M-Instruct weights: our kernel vs transformers' LlamaForCausalLM on the exported weights."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from rankrag_jax.convert import hf  # pylint: disable=g-import-not-at-top
  config, params, tok = smollm2
  hf.save_hf_checkpoint(tmp_path, config, params)
  reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
  for chat_format in ("chatqa", "chat_template"):
    scores = rerank.score_passages(params, config, tok, QUESTION, PASSAGES, chat_format=chat_format)
    true_id, false_id = prompts.true_false_token_ids(tok, chat_format)
    want_true, want_false = [], []
    for passage in PASSAGES:
      text = prompts.render_prompt(prompts.ranking_prompt_example(QUESTION, passage), chat_format, tok)
      ids = torch.tensor([tok.encode(text, add_bos=tok.add_bos_by_default)])
      with torch.no_grad():
        probs = torch.softmax(reference(ids).logits[0, -1].double(), dim=-1)
      want_true.append(float(probs[true_id]))
      want_false.append(float(probs[false_id]))
    want_true, want_false = np.asarray(want_true), np.asarray(want_false)
    print(f"{chat_format}: ours {scores.p_true} transformers {want_true} "
          f"max|diff| {np.abs(scores.p_true - want_true).max():.2e}")
    np.testing.assert_allclose(scores.p_true, want_true, atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores.p_true_normalised, want_true / (want_true + want_false), atol=1e-4, rtol=0)
