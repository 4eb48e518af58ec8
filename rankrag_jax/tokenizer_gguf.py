"""Tokenizers from GGUF files: llama.cpp's `tokenizer.ggml.*` metadata -> `rankrag_jax.tokenizer.Tokenizer`.

`tokenizer.ggml.model == "gpt2"` is a byte-level BPE (pre-tokenizer regex chosen by `tokenizer.ggml.pre`);
`"llama"` is the SentencePiece-style BPE that `tokenizer.py` also builds from `.model` files.

    >>> tok = load_gguf_tokenizer(asset_file("smollm2_135m_instruct"))
"""

import mmap
import struct
from typing import Any, Mapping, Sequence

import gguf
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from rankrag_jax.tokenizer import (LLAMA3_PRE_NAMES, LLAMA3_SPLIT_REGEX, PathLike, Tokenizer, TokenizerError,
                                   add_vocabulary_special_tokens, sentencepiece_bpe)


def load_gguf_tokenizer(path: PathLike) -> Tokenizer:
  """The tokenizer embedded in a GGUF file (its metadata only; no tensor data is read)."""
  return tokenizer_from_gguf_metadata(read_gguf_tokenizer_metadata(path), source=str(path))


_GGUF_SCALARS = {gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b", gguf.GGUFValueType.UINT16: "H",
                 gguf.GGUFValueType.INT16: "h", gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i",
                 gguf.GGUFValueType.FLOAT32: "f", gguf.GGUFValueType.BOOL: "?", gguf.GGUFValueType.UINT64: "Q",
                 gguf.GGUFValueType.INT64: "q", gguf.GGUFValueType.FLOAT64: "d"}


def read_gguf_tokenizer_metadata(path: PathLike) -> dict[str, Any]:
  """The `general.*` and `tokenizer.*` metadata of a GGUF file as Python values (tensor data is not read).

  A direct walk of the key/value section: `gguf.GGUFReader` makes a numpy view per string and takes ~10 s on
  Llama-3's 128k tokens + 280k merges; this takes ~0.3 s. (Callers already holding a GGUFReader can pass
  `{k: f.contents() for k, f in reader.fields.items()}` to `tokenizer_from_gguf_metadata` instead.)
  """
  with open(path, "rb") as f:
    if f.read(4) != b"GGUF":
      raise TokenizerError(f"{path}: not a GGUF file (no GGUF magic bytes)")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
      try:
        return _read_gguf_kv_section(blob, path)
      except TokenizerError:
        raise
      except (struct.error, ValueError) as e:
        raise TokenizerError(f"{path}: truncated or corrupt GGUF metadata ({e})") from e


def _read_gguf_kv_section(blob, path: PathLike) -> dict[str, Any]:
  """Walks the key/value section that follows the 24-byte GGUF header."""
  version, _, kv_count = struct.unpack_from("<IQQ", blob, 4)
  if version < 2:
    raise TokenizerError(f"{path}: GGUF version {version} is not supported (need >= 2)")
  pos, metadata = 24, {}

  def read_string(pos):
    (length,) = struct.unpack_from("<Q", blob, pos)
    return blob[pos + 8:pos + 8 + length].decode("utf-8", errors="replace"), pos + 8 + length

  for _ in range(kv_count):
    key, pos = read_string(pos)
    (kind,) = struct.unpack_from("<I", blob, pos)
    keep = key.startswith(("tokenizer.", "general."))
    value, pos = _read_gguf_value(blob, pos + 4, kind, read_string, keep)
    if keep:
      metadata[key] = value
  return metadata


def _read_gguf_value(blob, pos: int, kind: int, read_string, keep: bool):
  """(value, next position); arrays of keys we do not keep are skipped over, giving None."""
  if kind in _GGUF_SCALARS:
    fmt = "<" + _GGUF_SCALARS[kind]
    return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
  if kind == gguf.GGUFValueType.STRING:
    return read_string(pos)
  if kind == gguf.GGUFValueType.ARRAY:
    item_kind, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if item_kind in _GGUF_SCALARS:
      fmt = f"<{count}{_GGUF_SCALARS[item_kind]}"
      return list(struct.unpack_from(fmt, blob, pos)) if keep else None, pos + struct.calcsize(fmt)
    read_item = read_string if item_kind == gguf.GGUFValueType.STRING else (  # the hot loop: vocab and merges.
        lambda pos: _read_gguf_value(blob, pos, item_kind, read_string, keep))
    values = []
    for _ in range(count):
      value, pos = read_item(pos)
      values.append(value)
    return values if keep else None, pos
  raise ValueError(f"unknown GGUF value type {kind} at byte {pos}")


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any], source: str) -> Tokenizer:
  """Builds the tokenizer a GGUF file describes (`tokenizer.ggml.*` keys, as llama.cpp writes them)."""
  def field(key, required=True):
    if required and key not in metadata:
      raise TokenizerError(f"{source}: GGUF has no tokenizer metadata field {key!r}")
    return metadata.get(key)

  kind = field(gguf.Keys.Tokenizer.MODEL)
  if kind not in ("gpt2", "llama"):
    raise TokenizerError(f"{source}: GGUF field 'tokenizer.ggml.model' is {kind!r}; supported: 'gpt2', 'llama'")
  tokens = list(field(gguf.Keys.Tokenizer.LIST))
  token_types = list(field(gguf.Keys.Tokenizer.TOKEN_TYPE, required=False) or [gguf.TokenType.NORMAL] * len(tokens))
  if kind == "gpt2":
    backend = _gguf_byte_level_bpe(tokens, field(gguf.Keys.Tokenizer.MERGES), token_types,
                                   field(gguf.Keys.Tokenizer.PRE, required=False) or "default")
  else:  # "llama": SentencePiece-style BPE.
    unk_id = field(gguf.Keys.Tokenizer.UNK_ID, required=False)
    backend = sentencepiece_bpe(tokens, field(gguf.Keys.Tokenizer.SCORES), token_types,
                                 unk_token=tokens[unk_id] if unk_id is not None else None,
                                 add_dummy_prefix=field(gguf.Keys.Tokenizer.ADD_PREFIX, required=False) is not False)

  def token(key):
    token_id = field(key, required=False)
    return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

  add_bos = field(gguf.Keys.Tokenizer.ADD_BOS, required=False)
  if add_bos is None:  # llama.cpp's defaults: SentencePiece vocabularies and Llama-3 take bos.
    add_bos = kind == "llama" or field(gguf.Keys.Tokenizer.PRE, required=False) in LLAMA3_PRE_NAMES
  return Tokenizer(backend, source=source, bos_token=token(gguf.Keys.Tokenizer.BOS_ID),
                   eos_token=token(gguf.Keys.Tokenizer.EOS_ID), pad_token=token(gguf.Keys.Tokenizer.PAD_ID),
                   unk_token=token(gguf.Keys.Tokenizer.UNK_ID),
                   chat_template=field(gguf.Keys.Tokenizer.CHAT_TEMPLATE, required=False),
                   add_bos_by_default=bool(add_bos),
                   extra_stop_tokens=[t for t in (token(gguf.Keys.Tokenizer.EOT_ID),) if t])


def _gguf_byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
                         pre: str) -> tokenizers.Tokenizer:
  """GPT-2-style byte-level BPE; tokens and merges are already spelled in the byte-to-unicode alphabet."""
  llama3 = pre in LLAMA3_PRE_NAMES
  backend = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                                            [tuple(m.split(" ", 1)) for m in merges], ignore_merges=llama3))
  if llama3:
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  elif pre == "smollm":
    # SmolLM's tokenizer.json (and llama.cpp's "smollm" pre-type): single digits, then the GPT-2 regex.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  else:  # "default", "gpt2" and the rest: GPT-2's own regex.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  backend.decoder = decoders.ByteLevel()
  add_vocabulary_special_tokens(backend, tokens, token_types)
  return backend
