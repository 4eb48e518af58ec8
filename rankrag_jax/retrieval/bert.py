"""A Flax linen BERT encoder, HF BERT safetensors import, and sentence embeddings (all-MiniLM-L6-v2 style).

Any HF BERT-style encoder directory works the same way: `config.json` + `model.safetensors` + `tokenizer.json`,
optionally sentence-transformers' `sentence_bert_config.json` (max_seq_length) and `1_Pooling/config.json`
(mean or CLS pooling).

Embedding a batch of texts: tokenise with the HF `tokenizers` library (truncated to max_seq_length), pad the
token length up to a multiple of `length_bucket` and the row count up to a power of two, so a whole corpus
compiles only a handful of shapes; run the jitted encoder, pool over the attention mask, L2-normalise.

    >>> encoder = load_sentence_encoder()            # all-MiniLM-L6-v2 from the asset cache
    >>> embeddings = encode_texts(encoder, ["who wrote hamlet?"])   # [1, 384] float32, unit norm
"""

import dataclasses
import functools
import json
import pathlib
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import tokenizers
import tqdm

from rankrag_jax import assets

DEFAULT_ENCODER_ASSET = "minilm_l6_v2"
DEFAULT_MAX_SEQ_LENGTH = 256  # sentence-transformers' default when a model does not say.
_ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),  # BERT's GELU is the exact erf form.
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT encoder hyper-parameters (the fields of an HF `config.json` we use). Hashable: a jit static arg."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf_config(cls, hf_config: Mapping[str, Any]) -> "BertConfig":
    """Reads an HF BERT `config.json` dict; refuses settings this encoder does not implement."""
    position_type = hf_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(f"position_embedding_type {position_type!r} is not supported (only 'absolute')")
    if hf_config.get("hidden_act", "gelu") not in _ACTIVATIONS:
      raise ValueError(f"hidden_act {hf_config['hidden_act']!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    if hf_config["hidden_size"] % hf_config["num_attention_heads"]:
      raise ValueError("hidden_size must be a multiple of num_attention_heads")
    return cls(vocab_size=hf_config["vocab_size"], hidden_size=hf_config["hidden_size"],
               num_layers=hf_config["num_hidden_layers"], num_heads=hf_config["num_attention_heads"],
               intermediate_size=hf_config["intermediate_size"],
               max_position_embeddings=hf_config.get("max_position_embeddings", 512),
               type_vocab_size=hf_config.get("type_vocab_size", 2),
               layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
               hidden_act=hf_config.get("hidden_act", "gelu"))


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  # use_fast_variance=False: E[(x-mean)^2] as torch computes it, not E[x^2]-mean^2.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name=name)


class BertLayer(nn.Module):
  """One post-LN transformer layer: self-attention + residual + LN, GELU MLP + residual + LN."""
  config: BertConfig

  @nn.compact
  def __call__(self, hidden: jax.Array, attention_bias: jax.Array) -> jax.Array:
    cfg = self.config
    split_heads = lambda x: x.reshape(x.shape[:2] + (cfg.num_heads, cfg.head_dim))
    query = split_heads(nn.Dense(cfg.hidden_size, name="query")(hidden))
    key = split_heads(nn.Dense(cfg.hidden_size, name="key")(hidden))
    value = split_heads(nn.Dense(cfg.hidden_size, name="value")(hidden))
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(cfg.head_dim) + attention_bias
    context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), value).reshape(hidden.shape)
    attention_out = nn.Dense(cfg.hidden_size, name="attention_output")(context)
    hidden = _layer_norm(cfg, "attention_norm")(hidden + attention_out)
    mlp = _ACTIVATIONS[cfg.hidden_act](nn.Dense(cfg.intermediate_size, name="intermediate")(hidden))
    mlp = nn.Dense(cfg.hidden_size, name="output")(mlp)
    return _layer_norm(cfg, "output_norm")(hidden + mlp)


class BertEncoder(nn.Module):
  """BERT without a pooler head: token ids -> final hidden states `[B, T, hidden]` (inference only)."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    positions = jnp.arange(input_ids.shape[1])[None, :]
    hidden = (nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(input_ids)
              + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings")(positions)
              + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings")(token_type_ids))
    hidden = _layer_norm(cfg, "embeddings_norm")(hidden)
    # Padding keys get the most negative float: excluded exactly, and all-padding rows stay finite.
    attention_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(hidden.dtype).min)
    for i in range(cfg.num_layers):
      hidden = BertLayer(cfg, name=f"layers_{i}")(hidden, attention_bias)
    return hidden


# HF tensor name -> our param path ("/"-separated), and whether the HF [out, in] matrix is transposed to a
# Flax [in, out] kernel. "{i}" is the layer number. The one place the two layouts meet.
HF_BERT_PARAM_MAP = (
    ("embeddings.word_embeddings.weight", "word_embeddings/embedding", False),
    ("embeddings.position_embeddings.weight", "position_embeddings/embedding", False),
    ("embeddings.token_type_embeddings.weight", "token_type_embeddings/embedding", False),
    ("embeddings.LayerNorm.weight", "embeddings_norm/scale", False),
    ("embeddings.LayerNorm.bias", "embeddings_norm/bias", False),
    ("encoder.layer.{i}.attention.self.query.weight", "layers_{i}/query/kernel", True),
    ("encoder.layer.{i}.attention.self.query.bias", "layers_{i}/query/bias", False),
    ("encoder.layer.{i}.attention.self.key.weight", "layers_{i}/key/kernel", True),
    ("encoder.layer.{i}.attention.self.key.bias", "layers_{i}/key/bias", False),
    ("encoder.layer.{i}.attention.self.value.weight", "layers_{i}/value/kernel", True),
    ("encoder.layer.{i}.attention.self.value.bias", "layers_{i}/value/bias", False),
    ("encoder.layer.{i}.attention.output.dense.weight", "layers_{i}/attention_output/kernel", True),
    ("encoder.layer.{i}.attention.output.dense.bias", "layers_{i}/attention_output/bias", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "layers_{i}/attention_norm/scale", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "layers_{i}/attention_norm/bias", False),
    ("encoder.layer.{i}.intermediate.dense.weight", "layers_{i}/intermediate/kernel", True),
    ("encoder.layer.{i}.intermediate.dense.bias", "layers_{i}/intermediate/bias", False),
    ("encoder.layer.{i}.output.dense.weight", "layers_{i}/output/kernel", True),
    ("encoder.layer.{i}.output.dense.bias", "layers_{i}/output/bias", False),
    ("encoder.layer.{i}.output.LayerNorm.weight", "layers_{i}/output_norm/scale", False),
    ("encoder.layer.{i}.output.LayerNorm.bias", "layers_{i}/output_norm/bias", False),
)
# Tensors an encoder does not use: the NSP/MLM heads, the pooler, and the position_ids buffer.
_UNUSED_HF_TENSORS = re.compile(r"(pooler\.|cls\.|embeddings\.position_ids$)")


def _normalise_hf_name(name: str) -> str:
  name = name.removeprefix("bert.")  # BertFor* checkpoints nest the encoder under "bert."
  # TF-converted checkpoints call LayerNorm's parameters gamma/beta.
  return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def convert_hf_bert_params(tensors: Mapping[str, np.ndarray], config: BertConfig) -> dict:
  """HF BERT tensors (name -> array) -> our float32 param pytree; every needed tensor must be present."""
  tensors = {_normalise_hf_name(name): value for name, value in tensors.items()}
  params, used = {}, set()
  for hf_template, path_template, transpose in HF_BERT_PARAM_MAP:
    layers = range(config.num_layers) if "{i}" in hf_template else [None]
    for i in layers:
      hf_name, path = hf_template.format(i=i), path_template.format(i=i)
      if hf_name not in tensors:
        raise KeyError(f"HF checkpoint lacks tensor {hf_name!r} (for {path})")
      value = np.asarray(tensors[hf_name], dtype=np.float32)
      node = params
      *parents, leaf = path.split("/")
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = jnp.asarray(value.T if transpose else value)
      used.add(hf_name)
  unknown = sorted(n for n in tensors if n not in used and not _UNUSED_HF_TENSORS.match(n))
  if unknown:
    raise ValueError(f"HF checkpoint has tensors with no place in BertEncoder (wrong architecture?): {unknown[:8]}")
  return params


def load_hf_bert(model_dir: str | pathlib.Path) -> tuple[BertConfig, dict]:
  """Reads `config.json` + `model.safetensors` of an HF BERT-style encoder directory."""
  model_dir = pathlib.Path(model_dir)
  config = BertConfig.from_hf_config(json.loads((model_dir / "config.json").read_text()))
  weights_path = model_dir / "model.safetensors"
  if not weights_path.exists():
    raise FileNotFoundError(f"{weights_path} not found (only safetensors weights are read; no pickled .bin)")
  # framework="flax": numpy cannot represent bfloat16 checkpoints.
  with safetensors.safe_open(str(weights_path), framework="flax") as f:
    tensors = {name: f.get_tensor(name) for name in f.keys()}
  return config, convert_hf_bert_params(tensors, config)


@dataclasses.dataclass(frozen=True, eq=False)
class SentenceEncoder:
  """Everything `encode_texts` needs: the BERT config and params, the tokenizer, and the pooling recipe."""
  config: BertConfig
  params: dict
  tokenizer: tokenizers.Tokenizer
  max_seq_length: int
  pooling: str = "mean"  # "mean" over non-padding tokens, or "cls".
  normalize: bool = True

  @property
  def dim(self) -> int:
    return self.config.hidden_size


def _pooling_from_dir(model_dir: pathlib.Path) -> str:
  pooling_path = model_dir / "1_Pooling" / "config.json"
  if not pooling_path.exists():
    return "mean"
  pooling = json.loads(pooling_path.read_text())
  enabled = sorted(key for key, value in pooling.items() if key.startswith("pooling_mode_") and value)
  if enabled == ["pooling_mode_mean_tokens"]:
    return "mean"
  if enabled == ["pooling_mode_cls_token"]:
    return "cls"
  raise ValueError(f"{pooling_path}: only mean or CLS pooling is supported, got {enabled}")


@gin.configurable
def load_sentence_encoder(model_dir: str | pathlib.Path | None = None,
                          max_seq_length: int | None = None,
                          normalize: bool = True) -> SentenceEncoder:
  """Loads a sentence encoder directory (default: all-MiniLM-L6-v2 from the asset cache).

  Args:
    model_dir: an HF BERT-style directory (config.json, model.safetensors, tokenizer.json).
    max_seq_length: truncation length in tokens; default: sentence_bert_config.json's `max_seq_length`, else
      256; never more than the model's position embeddings.
    normalize: L2-normalise embeddings (so inner product = cosine).
  """
  model_dir = pathlib.Path(model_dir) if model_dir else assets.asset_file(DEFAULT_ENCODER_ASSET)
  config, params = load_hf_bert(model_dir)
  if max_seq_length is None:
    sbert_config = model_dir / "sentence_bert_config.json"
    max_seq_length = (json.loads(sbert_config.read_text()).get("max_seq_length") if sbert_config.exists()
                      else None) or DEFAULT_MAX_SEQ_LENGTH
  max_seq_length = min(max_seq_length, config.max_position_embeddings)
  tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
  # tokenizer.json may carry its own truncation/padding (MiniLM's pads to a fixed 128); we bucket ourselves.
  tokenizer.enable_truncation(max_length=max_seq_length)
  tokenizer.no_padding()
  return SentenceEncoder(config=config, params=params, tokenizer=tokenizer, max_seq_length=max_seq_length,
                         pooling=_pooling_from_dir(model_dir), normalize=normalize)


def pool_hidden_states(hidden: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
  """`[B, T, H]` -> `[B, H]`: mean over tokens where `attention_mask` is 1, or the first ([CLS]) token."""
  if pooling == "cls":
    return hidden[:, 0]
  if pooling != "mean":
    raise ValueError(f"unknown pooling {pooling!r}")
  mask = attention_mask[..., None].astype(hidden.dtype)
  # The 1e-9 floor (as sentence-transformers) keeps all-padding rows finite (they are dropped anyway).
  return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)


@functools.partial(jax.jit, static_argnames=("config", "pooling", "normalize"))
def embed_token_batch(params: dict, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array,
                      *, config: BertConfig, pooling: str, normalize: bool) -> jax.Array:
  """Token batch `[B, T]` -> sentence embeddings `[B, hidden]` float32 (jitted; one compile per shape)."""
  hidden = BertEncoder(config).apply({"params": params}, input_ids, attention_mask, token_type_ids)
  pooled = pool_hidden_states(hidden, attention_mask, pooling)
  if normalize:  # torch.nn.functional.normalize's eps.
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _padded_batch(encodings, max_seq_length: int, length_bucket: int, rows: int):
  """Stacks encodings into `[rows, L]` int32 arrays, L = longest rounded up to `length_bucket`."""
  length = min(_round_up(max(len(e.ids) for e in encodings), length_bucket), max_seq_length)
  input_ids = np.zeros((rows, length), np.int32)
  attention_mask = np.zeros((rows, length), np.int32)
  token_type_ids = np.zeros((rows, length), np.int32)
  for row, encoding in enumerate(encodings):
    n = len(encoding.ids)
    input_ids[row, :n] = encoding.ids
    attention_mask[row, :n] = encoding.attention_mask
    token_type_ids[row, :n] = encoding.type_ids
  return input_ids, attention_mask, token_type_ids


@gin.configurable(denylist=["encoder", "texts"])
def encode_texts(encoder: SentenceEncoder,
                 texts: Sequence[str],
                 batch_size: int = 64,
                 length_bucket: int = 32,
                 sort_window: int = 8192,
                 show_progress: bool = False,
                 progress_desc: str = "Embedding") -> np.ndarray:
  """Embeds `texts` -> `[N, hidden]` float32 (unit rows when `encoder.normalize`), in input order.

  Texts are tokenised `sort_window` at a time and sorted by length within the window, so each batch holds
  texts of similar length (little padding) while memory stays bounded on large corpora.
  """
  if isinstance(texts, str):
    raise TypeError("encode_texts takes a sequence of texts, not one string")
  embeddings = np.zeros((len(texts), encoder.dim), np.float32)
  with tqdm.tqdm(total=len(texts), desc=progress_desc, unit="text", disable=not show_progress) as progress:
    for window_start in range(0, len(texts), sort_window):
      window = list(texts[window_start:window_start + sort_window])
      encodings = encoder.tokenizer.encode_batch(window)
      order = np.argsort([-len(e.ids) for e in encodings], kind="stable")
      for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        # Rows padded up to a power of two (<= batch_size): few shapes, little waste for small query sets.
        padded_rows = min(batch_size, 1 << (len(rows) - 1).bit_length())
        batch = _padded_batch([encodings[r] for r in rows], encoder.max_seq_length, length_bucket, padded_rows)
        out = embed_token_batch(encoder.params, *batch, config=encoder.config, pooling=encoder.pooling,
                                normalize=encoder.normalize)
        embeddings[window_start + rows] = np.asarray(out)[:len(rows)]
        progress.update(len(rows))
  return embeddings
