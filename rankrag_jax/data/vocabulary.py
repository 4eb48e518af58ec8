"""`seqio.Vocabulary` over our `Tokenizer`, so SeqIO tasks tokenise exactly as training and inference do.

    >>> vocab = RankRAGVocabulary(str(asset_file("llama3_tokenizer")))
    >>> vocab.encode("Hello world")            # [9906, 1917]
    >>> vocab.encode_tf(tf.constant("Hello"))  # tf.Tensor([9906], dtype=int32)

The vocabulary holds only the tokenizer's path and loads it on first use, so it pickles small, compares by
path, and can be bound in Gin (`seqio.Task(..., output_features={"targets": Feature(RankRAGVocabulary(PATH))})`).

Unlike SeqIO's SentencePiece vocabularies, id 0 is an ordinary token here (Llama-3: "!"). Padding is marked by
segment ids / loss weights, never by the token value, so `pad_id` is the tokenizer's pad (eos when it has
none) and decoding stops at the first eos rather than dropping zeros.
"""

import pathlib
from typing import Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from rankrag_jax import tokenizer as tokenizer_lib


def _as_text(value) -> str:
  """A string element as `tf.numpy_function` hands it over (bytes, or a 0-d object array of bytes)."""
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RankRAGVocabulary(seqio.Vocabulary):
  """SeqIO vocabulary backed by `rankrag_jax.tokenizer.load_tokenizer(path)`; no bos/eos is added on encode."""

  def __init__(self, path: str):
    super().__init__(extra_ids=0)
    self._path = str(path)
    self._tokenizer: Optional[tokenizer_lib.Tokenizer] = None

  @property
  def path(self) -> str:
    return self._path

  @property
  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    if self._tokenizer is None:  # lazily: constructing the vocabulary (Gin, task registration) stays cheap.
      self._tokenizer = tokenizer_lib.load_tokenizer(self._path)
    return self._tokenizer

  @property
  def bos_id(self) -> Optional[int]:
    return self.tokenizer.bos_id

  @property
  def eos_id(self) -> Optional[int]:
    return self.tokenizer.eos_id

  @property
  def pad_id(self) -> int:
    return self.tokenizer.pad_id

  @property
  def unk_id(self) -> Optional[int]:
    return self.tokenizer.unk_id

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def _encode(self, s: str) -> Sequence[int]:
    return self.tokenizer.encode(s)

  def _up_to_eos(self, ids: Sequence[int]) -> list[int]:
    ids = [int(i) for i in ids]
    eos = self.eos_id
    return ids[:ids.index(eos)] if eos is not None and eos in ids else ids

  def _decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` up to (not including) the first eos; other special tokens are kept as text."""
    return self.tokenizer.decode(self._up_to_eos(ids))

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """A scalar string -> int32 ids [length]; a vector of strings -> a RaggedTensor [batch, (length)]."""
    s = tf.convert_to_tensor(s, dtype=tf.string)
    if s.shape.rank == 0:
      ids = tf.numpy_function(lambda text: np.asarray(self._encode(_as_text(text)), np.int32),
                              [s], tf.int32, stateful=False)
      ids.set_shape([None])
      return ids
    if s.shape.rank != 1:
      raise ValueError(f"encode_tf takes a scalar or a vector of strings, got shape {s.shape}")

    def encode_batch(texts):
      encoded = [self._encode(_as_text(t)) for t in texts]
      values = np.asarray([i for ids in encoded for i in ids], np.int32)
      return values, np.asarray([len(ids) for ids in encoded], np.int64)

    values, lengths = tf.numpy_function(encode_batch, [s], [tf.int32, tf.int64], stateful=False)
    values.set_shape([None])
    lengths.set_shape([s.shape[0]])
    return tf.RaggedTensor.from_row_lengths(values, lengths)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int ids [..., length] -> strings [...], each decoded up to its first eos."""
    ids = tf.convert_to_tensor(ids)

    def decode_rows(rows):
      flat = rows.reshape(-1, rows.shape[-1])
      texts = [self._decode(row).encode("utf-8") for row in flat]
      return np.asarray(texts, dtype=object).reshape(rows.shape[:-1])

    texts = tf.numpy_function(decode_rows, [ids], tf.string, stateful=False)
    texts.set_shape(ids.shape[:-1])
    return texts

  def __eq__(self, other) -> bool:
    if not isinstance(other, RankRAGVocabulary):
      return False
    return pathlib.Path(self._path).resolve() == pathlib.Path(other.path).resolve()

  def __hash__(self) -> int:
    return hash(("RankRAGVocabulary", str(pathlib.Path(self._path).resolve())))

  def __getstate__(self):
    return {"_path": self._path, "_extra_ids": self._extra_ids}  # the loaded tokenizer is rebuilt on demand.

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._tokenizer = None

  def __repr__(self) -> str:
    return f"RankRAGVocabulary({self._path!r})"
