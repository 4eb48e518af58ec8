"""Tokenisation (answer-only loss, passage-side truncation) and SeqIO packing."""

import functools

import numpy as np
import pytest
import tensorflow as tf

from rankrag_jax import assets
from rankrag_jax import prompts
from rankrag_jax import tokenizer as tokenizer_lib
from rankrag_jax.data import packing
from rankrag_jax.data import tasks


# A character tokenizer: exact decode, and id 0 is "!" (as in Llama-3) so tests prove 0 is never padding.
SPECIALS = ("<|bos|>", "<|eos|>", "<|im_end|>")


class CharTokenizer:
  """One id per character, plus three special tokens."""

  def __init__(self, add_bos_by_default: bool = False):
    chars = "!" + "".join(chr(c) for c in range(32, 127) if chr(c) != "!") + "\n\ufffd"
    self._vocab = list(chars[:1]) + list(SPECIALS) + list(chars[1:])
    self._ids = {t: i for i, t in enumerate(self._vocab)}
    self.add_bos_by_default = add_bos_by_default
    self.source = "fake-char-tokenizer"

  bos_id = property(lambda self: self._ids["<|bos|>"])
  eos_id = property(lambda self: self._ids["<|eos|>"])
  stop_ids = property(lambda self: (self._ids["<|eos|>"], self._ids["<|im_end|>"]))

  def token_to_id(self, token):
    return self._ids.get(token)

  def encode(self, text, add_bos=False):
    ids, i = [], 0
    while i < len(text):
      special = next((s for s in SPECIALS if text.startswith(s, i)), None)
      ids.append(self._ids[special or text[i]])
      i += len(special or text[i])
    return ([self.bos_id] if add_bos else []) + ids

  def decode(self, ids, skip_special_tokens=False):
    return "".join(self._vocab[int(i)] for i in ids)


def make_example(component="toy_ra_qa", index=0, passages=("alpha beta", "gamma"), question="What is it?",
                 answer="It is alpha!", task="ra_qa", label=None):
  return prompts.make_example(component=component, example_id=f"{component}/{index}", task=task,
                              passages=list(passages), turns=[{"user": question, "assistant": answer}], label=label)


@pytest.fixture
def tok():
  return CharTokenizer()


@functools.lru_cache(maxsize=None)
def _smollm2_tokenizer():
  return tokenizer_lib.load_tokenizer(assets.asset_file("smollm2_135m_instruct"))


def _tokenize(example, tokenizer, max_length=10_000, chat_format="chatqa"):
  return packing.tokenize_example(example, tokenizer, max_length, chat_format)


@pytest.mark.parametrize("chat_format,stop", [("chatqa", "<|im_end|>"), ("chat_template", "<|im_end|>")])
def test_loss_weights_decode_to_the_answer_with_the_real_tokenizer(chat_format, stop):
  tok = _smollm2_tokenizer()
  example = prompts.make_example(
      component="toy", example_id="toy/0", task="conv_qa", passages=["Paris is the capital of France."],
      turns=[{"user": "Where is Paris?", "assistant": "In France."},
             {"user": "What is it?", "assistant": "The capital of France!"}])
  out = _tokenize(example, tok, chat_format=chat_format)
  weighted = out["targets"][out["loss_weights"] == 1]
  # ChatQA: " answer" after "Assistant:", then eos; chat template: the answer, then its own end-of-turn.
  answer = " The capital of France!" if chat_format == "chatqa" else "The capital of France!"
  assert tok.decode(weighted) == answer + stop
  # The prompt's ids are exactly what inference encodes (prompts.render_prompt), so training matches inference.
  assert out["targets"][:out["num_prompt_tokens"]].tolist() == tok.encode(prompts.render_prompt(
      example, chat_format, tok))
  assert out["loss_weights"][:out["num_prompt_tokens"]].sum() == 0
  assert "In France." in tok.decode(out["targets"][:out["num_prompt_tokens"]])  # earlier answers: no loss.


def test_loss_weights_cover_exactly_the_answer_and_stop_token(tok):
  example = make_example(answer="It is alpha!")
  out = _tokenize(example, tok)
  weighted = out["targets"][out["loss_weights"] == 1]
  assert tok.decode(weighted[:-1]) == " It is alpha!"  # the space after "Assistant:" belongs to the answer.
  assert weighted[-1] == tok.eos_id
  # Loss weights are one contiguous run at the end; everything before is the prompt, ending at "Assistant:".
  assert out["loss_weights"].tolist() == [0] * out["num_prompt_tokens"] + [1] * len(weighted)
  assert tok.decode(out["targets"][:out["num_prompt_tokens"]]) == prompts.render_prompt(example)
  assert not out["truncated"]


def test_template_end_of_turn_ends_the_answer_instead_of_an_extra_eos(tok):
  def chatml(example, chat_format, tokenizer):
    segments = prompts.render_segments(example, "chatqa", tokenizer)
    return segments[:-1] + [("answer", segments[-1][1] + "<|im_end|>\n")]
  out = packing.tokenize_example(make_example(), tok, 10_000, "chatqa", render_segments=chatml)
  weighted = out["targets"][out["loss_weights"] == 1]
  assert tok.decode(weighted) == " It is alpha!<|im_end|>"  # one stop token; the newline after it is dropped.


def test_bos_is_prepended_only_when_the_tokenizer_adds_it():
  with_bos = _tokenize(make_example(), CharTokenizer(add_bos_by_default=True))
  without = _tokenize(make_example(), CharTokenizer())
  assert with_bos["targets"][0] == CharTokenizer().bos_id
  assert with_bos["targets"][1:].tolist() == without["targets"].tolist()


def test_truncation_cuts_longest_passage_first_and_never_the_answer(tok):
  short, long_a, long_b = "s" * 10, "a" * 300, "b" * 200
  example = make_example(passages=(short, long_a, long_b), answer="The answer is here.")
  full = _tokenize(example, tok)
  max_length = full["num_untruncated_tokens"] - 250
  out = _tokenize(example, tok, max_length)
  text = tok.decode(out["targets"])
  assert out["truncated"] and len(out["targets"]) <= max_length
  assert out["num_untruncated_tokens"] == len(full["targets"])
  weighted = out["targets"][out["loss_weights"] == 1]
  assert tok.decode(weighted[:-1]) == " The answer is here."
  # Cut to a common cap: the short passage is untouched, both long ones shrink to the same length.
  passages = [p.split(": ", 1)[1] for p in text.split("\n\n") if p.startswith("Passage ")]
  assert passages[0] == short
  assert len(passages[1]) == len(passages[2]) < 200
  assert sum(map(len, passages)) == 510 - 250 and len(out["targets"]) == max_length  # no more than needed.
  assert "User: What is it?" in text and prompts.CHATQA_SYSTEM in text  # instructions are never cut.


def test_example_that_cannot_fit_is_raised_and_counted(tok):
  fits = make_example(index=0)
  too_long = make_example(index=1, question="q" * 500)
  with pytest.raises(packing.ExampleTooLongError, match="toy_ra_qa/1"):
    _tokenize(too_long, tok, 600)
  kept, counts = tasks.tokenize_component([fits, too_long], tok, 600, "chatqa", "toy")
  assert counts == {"examples": 2, "truncated": 0, "dropped": 1} and len(kept) == 1


def _examples_dataset(sequences):
  """{"inputs", "targets"} examples from (prompt ids, answer ids) pairs."""
  def gen():
    for prompt, answer in sequences:
      yield {"inputs": np.asarray(prompt, np.int32), "targets": np.asarray(answer, np.int32)}
  spec = {"inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)}
  return tf.data.Dataset.from_generator(gen, output_signature=spec)


def test_packed_segments_never_overlap_and_positions_restart_per_segment():
  rng = np.random.default_rng(0)
  # id 0 appears inside prompts and answers: it must stay a real token.
  sequences = [(rng.integers(0, 50, rng.integers(1, 20)).tolist(), rng.integers(0, 50, rng.integers(1, 6)).tolist())
               for _ in range(60)]
  length = 32
  rows = list(packing.pack_for_training(_examples_dataset(sequences), length).as_numpy_iterator())
  assert len(rows) < len(sequences)  # several examples per row.
  recovered = []
  for row in rows:
    assert set(row) == {"decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
                        "decoder_segment_ids", "decoder_positions"}
    seg, pos = row["decoder_segment_ids"], row["decoder_positions"]
    ids = seg[seg > 0]
    # Segments are contiguous, numbered 1..k in order, padding (0) only at the end.
    assert (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all() and ids[0] == 1
    assert (seg[len(ids):] == 0).all()
    for s in np.unique(ids):
      where = np.flatnonzero(seg == s)
      assert (pos[where] == np.arange(len(where))).all()
      inputs, targets = row["decoder_input_tokens"][where], row["decoder_target_tokens"][where]
      assert (inputs[1:] == targets[:-1]).all()  # next-token shift inside the segment only.
      recovered.append((np.concatenate([inputs[:1], targets]).tolist(), row["decoder_loss_weights"][where].tolist()))
    assert (row["decoder_loss_weights"][seg == 0] == 0).all()
  assert len(recovered) == len(sequences)
  for (tokens, weights), (prompt, answer) in zip(recovered, sequences):
    assert tokens == prompt + answer
    assert weights == [0] * (len(prompt) - 1) + [1] * len(answer)


def test_overlong_example_fails_in_the_converter_instead_of_being_trimmed():
  ds = packing.pack_for_training(_examples_dataset([([1] * 12, [2] * 10)]), 16)  # each fits, the sum does not.
  with pytest.raises(tf.errors.InvalidArgumentError, match="longer than the packed length"):
    list(ds.as_numpy_iterator())


def test_unpacked_rows_are_one_example_each():
  rows = list(packing.pack_for_training(_examples_dataset([([5, 6, 7], [8, 0])]), 8, pack=False)
              .as_numpy_iterator())
  assert len(rows) == 1
  assert rows[0]["decoder_input_tokens"].tolist() == [5, 6, 7, 8, 0, 0, 0, 0]
  assert rows[0]["decoder_target_tokens"].tolist() == [6, 7, 8, 0, 0, 0, 0, 0]
  assert rows[0]["decoder_loss_weights"].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
  assert rows[0]["decoder_segment_ids"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
  assert rows[0]["decoder_positions"].tolist() == [0, 1, 2, 3, 0, 0, 0, 0]
