"""Tokenisation with passage-side truncation, loss weights on the answer only, and SeqIO packing.

One Example (docs/DESIGN.md schema) becomes one token sequence

    [bos]? + prompt tokens + answer tokens + stop token
             loss 0          loss 1          loss 1   (the model must learn to stop)

`prompts.render_segments` gives the text as ("fixed" | "passage" | "answer", text) pieces. The prompt (everything
before the answer) is tokenised as one string, exactly as the inference code tokenises a prompt, and the answer
separately, so the loss span is exactly the answer. When the sequence is longer than `max_length`, passage text is
cut (longest passage first, down to a common token cap), the prompt is re-rendered and re-tokenised; the answer,
the instructions and earlier turns are never cut. An example that does not fit even with every passage cut to one
token (a passage may not be empty) raises `ExampleTooLongError`; callers count it and skip it (never silently).

Packing uses SeqIO (`seqio.utils.trim_and_pack_dataset`) inside `AnswerLossLMFeatureConverter`, a
`seqio.FeatureConverter`. Why not `seqio.PrefixLMFeatureConverter(loss_on_targets_only=True)`: SeqIO treats token
id 0 as padding everywhere (packing measures a sequence by counting non-zero ids, loss weights are `id != 0`), but id
0 is a real token in our vocabularies (Llama-3 "!", SmolLM2 "<|endoftext|>"). With PrefixLM an answer containing
"!" would be cut short in packing and a 0 in the prompt would even get loss weight 1 (its XOR trick). It also
splits the length budget into separate inputs/targets lengths, which does not fit "cut passages, keep the answer".
So the converter packs ids shifted by +1 (0 stays free for padding) together with a loss code, and undoes the shift
after packing. It also packs the model inputs explicitly (`decoder_input_tokens[i] = tokens[i]`,
`decoder_target_tokens[i] = tokens[i + 1]`), which is the Hugging Face causal-LM convention: a model whose
tokenizer adds bos sees bos first, one that does not (SmolLM2) sees exactly its inference prompt, with no filler.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from rankrag_jax import prompts

# Loss codes packed next to the tokens; 0 is SeqIO's padding, so codes start at 1.
PROMPT_CODE = 1
ANSWER_CODE = 2
# Packed feature names (internal to the converter).
_TARGET_IDS, _INPUT_IDS, _LOSS_CODE = "target_ids", "input_ids", "loss_code"

RenderFn = Callable[[Mapping[str, Any], str, Any], Sequence[tuple[str, str]]]


class ExampleTooLongError(ValueError):
  """Even with every passage cut to one token, the instructions, turns and answer exceed `max_length`."""


@dataclasses.dataclass(frozen=True)
class RenderedText:
  """The rendered example, cut at the answer."""
  prompt: str
  answer: str
  after_answer: str


def split_at_answer(segments: Sequence[tuple[str, str]]) -> RenderedText:
  """Joins rendered segments into prompt | answer | text after the answer.

  A BPE tokenizer attaches a space to the word after it and the inference prompt ends at "Assistant:", so spaces
  between the prompt and the answer move into the answer (" Paris" is the token the model emits there).
  """
  kinds = [kind for kind, _ in segments]
  if kinds.count("answer") != 1:
    raise ValueError(f"expected exactly one 'answer' segment, got kinds {kinds}")
  index = kinds.index("answer")
  prompt = "".join(text for _, text in segments[:index])
  stripped = prompt.rstrip(" ")
  answer = prompt[len(stripped):] + segments[index][1]
  if not answer.strip():
    raise ValueError("empty answer")
  return RenderedText(stripped, answer, "".join(text for _, text in segments[index + 1:]))


def answer_token_ids(text: RenderedText, tokenizer) -> list[int]:
  """The answer's ids ending in exactly one stop token, which is inside the loss (the model must learn to stop).

  A chat template's end-of-turn (ChatML "<|im_end|>\n") is already in the answer text (prompts.py) or right after
  it: the answer then ends at that token and the text after it (a newline the model never generates) is dropped.
  Otherwise (the plain ChatQA format) eos is appended.
  """
  ids = tokenizer.encode(text.answer)
  following = tokenizer.encode(text.after_answer) if text.after_answer else []
  stops = [i for i, token in enumerate(ids) if token in tokenizer.stop_ids]
  if stops and not tokenizer.decode(ids[stops[-1] + 1:]).strip():
    return ids[:stops[-1] + 1]
  if following and following[0] in tokenizer.stop_ids:
    return ids + following[:1]
  if tokenizer.eos_id is None:
    raise ValueError(f"tokenizer {getattr(tokenizer, 'source', tokenizer)!r} has no eos token to end answers")
  return ids + [tokenizer.eos_id]


def _prompt_ids(example, tokenizer, chat_format: str, render: RenderFn) -> tuple[list[int], RenderedText]:
  text = split_at_answer(render(example, chat_format, tokenizer))
  bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos_by_default", False) else []
  return bos + tokenizer.encode(text.prompt), text


def _token_cap(lengths: Sequence[int], excess: int) -> int:
  """Largest cap c >= 1 with sum(max(0, l - c)) >= excess (or 1): the longest passages are cut first, to a common
  length. Each passage keeps at least one token, since a passage must not be empty (prompts.py)."""
  low, high = 1, max(lengths)
  while low < high:  # invariant: the answer lies in [low, high].
    mid = (low + high + 1) // 2
    if sum(max(0, n - mid) for n in lengths) >= excess:
      low = mid
    else:
      high = mid - 1
  return low


def _passage_prefix(ids: Sequence[int], n: int, tokenizer) -> str:
  """The text of a passage's first n tokens (at least one visible character; no split UTF-8 character)."""
  text = ""
  while not text.strip() and n <= len(ids):
    text = tokenizer.decode(ids[:n]).rstrip("\ufffd")
    n += 1
  return text


def _truncate_passages(example, tokenizer, chat_format: str, render: RenderFn, prompt_budget: int,
                       prompt_ids: list[int]) -> list[int]:
  """Cuts passage tokens until the re-rendered prompt fits `prompt_budget`; returns the new prompt ids."""
  passage_ids = [tokenizer.encode(p) for p in example.get("passages") or []]
  lengths = [len(ids) for ids in passage_ids]
  excess = len(prompt_ids) - prompt_budget
  while excess > 0:
    if all(n <= 1 for n in lengths):
      what = "with every passage cut to one token" if lengths else "(no passages to cut)"
      raise ExampleTooLongError(f"example {example.get('id')!r}: the prompt is {len(prompt_ids)} tokens {what}; "
                                f"{prompt_budget} fit next to the answer")
    cap = _token_cap(lengths, excess)
    # Re-tokenising the joined prompt can move a boundary token, hence the loop; each round cuts >= 1 token.
    lengths = [min(n, cap) for n in lengths]
    passages = [p if n == len(ids) else _passage_prefix(ids, n, tokenizer)
                for p, ids, n in zip(example["passages"], passage_ids, lengths)]
    prompt_ids, _ = _prompt_ids({**example, "passages": passages}, tokenizer, chat_format, render)
    excess = len(prompt_ids) - prompt_budget
  return prompt_ids


def tokenize_example(example: Mapping[str, Any], tokenizer, max_length: int, chat_format: str,
                     render_segments: Optional[RenderFn] = None) -> dict[str, Any]:
  """Tokenises one Example into a decoder-only sequence with loss on the answer and its stop token.

  Args:
    example: an Example dict (docs/DESIGN.md).
    tokenizer: a `rankrag_jax.tokenizer.Tokenizer` (or anything with encode/decode/eos_id/stop_ids).
    max_length: the most tokens the sequence may have (bos, prompt, answer and stop token included).
    chat_format: passed to `prompts.render_segments` (the paper's plain ChatQA text or the model's template).
    render_segments: the renderer; defaults to `prompts.render_segments`.

  Returns:
    dict with `targets` (int32 [n], the whole sequence), `loss_weights` (int32 [n], 1 exactly on the answer and the
    stop token), `truncated` (bool), `num_prompt_tokens` and `num_untruncated_tokens` (the length before cutting).

  Raises:
    ExampleTooLongError: the example cannot fit even with every passage cut to one token.
  """
  render = render_segments or prompts.render_segments
  prompt_ids, text = _prompt_ids(example, tokenizer, chat_format, render)
  answer_ids = answer_token_ids(text, tokenizer)
  num_untruncated = len(prompt_ids) + len(answer_ids)
  prompt_budget = max_length - len(answer_ids)
  truncated = len(prompt_ids) > prompt_budget
  if truncated:
    prompt_ids = _truncate_passages(example, tokenizer, chat_format, render, prompt_budget, prompt_ids)
  return {
      "targets": np.asarray(prompt_ids + answer_ids, np.int32),
      "loss_weights": np.asarray([0] * len(prompt_ids) + [1] * len(answer_ids), np.int32),
      "truncated": truncated,
      "num_prompt_tokens": len(prompt_ids),
      "num_untruncated_tokens": num_untruncated,
  }


def task_feature_lengths(sequence_length: int) -> dict[str, int]:
  """Task feature lengths for `AnswerLossLMFeatureConverter`: prompt and answer share one budget."""
  return {"inputs": sequence_length, "targets": sequence_length}


class AnswerLossLMFeatureConverter(seqio.FeatureConverter):
  """Decoder-only LM features with loss weights on the answer ("targets") only; packs with SeqIO.

  Task features: `inputs` = prompt ids (bos included when the tokenizer adds one), `targets` = answer ids + stop.
  `task_feature_lengths = {"inputs": L, "targets": L}` (see `task_feature_lengths`): both share one budget, the
  packed length L, because truncation already cut passages so that each whole sequence fits; an example with
  len(inputs) + len(targets) - 1 > L fails loudly instead of being trimmed (trimming would cut the answer).

  Model features, each [L]: decoder_target_tokens, decoder_input_tokens, decoder_loss_weights, decoder_segment_ids
  (0 = padding; 1..k for the packed examples, or 1 when not packing) and decoder_positions (from 0 in each segment).
  """

  TASK_FEATURES = {
      "inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
      "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
  }
  MODEL_FEATURES = {
      "decoder_target_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
      "decoder_input_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
      "decoder_loss_weights": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
      # Also unpacked (1 on tokens, 0 on padding): id 0 is a real token, so only segment ids mark padding.
      "decoder_segment_ids": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
      "decoder_positions": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
  }
  PACKING_FEATURE_DTYPES = {
      "decoder_segment_ids": tf.int32,
      "decoder_positions": tf.int32,
  }

  def _packed_length(self, task_lengths: Mapping[str, int]) -> int:
    if task_lengths["inputs"] != task_lengths["targets"]:
      raise ValueError(f"inputs and targets share one budget; use task_feature_lengths(L), got {task_lengths}")
    return task_lengths["targets"]

  def _shift_for_packing(self, features: Mapping[str, tf.Tensor], length: int) -> dict[str, tf.Tensor]:
    sequence = tf.concat([features["inputs"], features["targets"]], axis=0)
    codes = tf.concat([tf.fill(tf.shape(features["inputs"]), PROMPT_CODE),
                       tf.fill(tf.shape(features["targets"]), ANSWER_CODE)], axis=0)
    with tf.control_dependencies([tf.debugging.assert_less_equal(
        tf.size(sequence) - 1, length,
        message=f"example longer than the packed length {length}; tokenize with max_length <= {length}")]):
      sequence = tf.identity(sequence)
    return {_TARGET_IDS: sequence[1:] + 1, _INPUT_IDS: sequence[:-1] + 1, _LOSS_CODE: codes[1:]}

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    target_ids = features[_TARGET_IDS]
    real = target_ids > 0
    converted = {
        "decoder_target_tokens": tf.where(real, target_ids - 1, 0),
        "decoder_input_tokens": tf.where(real, features[_INPUT_IDS] - 1, 0),
        "decoder_loss_weights": tf.cast(tf.equal(features[_LOSS_CODE], ANSWER_CODE), tf.int32),
    }
    if self.pack:
      converted["decoder_segment_ids"] = features[_TARGET_IDS + "_segment_ids"]
      converted["decoder_positions"] = features[_TARGET_IDS + "_positions"]
    else:
      converted["decoder_segment_ids"] = tf.cast(real, tf.int32)
      converted["decoder_positions"] = tf.where(real, tf.range(tf.size(target_ids)), 0)
    return converted

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    length = self._packed_length(task_feature_lengths)
    ds = ds.map(lambda ex: self._shift_for_packing(ex, length), num_parallel_calls=tf.data.AUTOTUNE)
    # All three features have the same length per example, so SeqIO packs them identically.
    ds = self._pack_or_pad(ds, {_TARGET_IDS: length, _INPUT_IDS: length, _LOSS_CODE: length})
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    length = self._packed_length(task_feature_lengths)
    return {name: length for name in self.MODEL_FEATURES}


def pack_for_training(ds: tf.data.Dataset, sequence_length: int, pack: bool = True) -> tf.data.Dataset:
  """Converts a dataset of {"inputs", "targets"} examples into packed decoder-only rows of `sequence_length`."""
  converter = AnswerLossLMFeatureConverter(pack=pack)
  return converter(ds, task_feature_lengths(sequence_length))
