"""HF Llama checkpoints (safetensors + config.json) <-> our params, through one name-mapping table.

`PARAM_MAPPINGS` says, once, which HF tensor holds which of our parameters and how the two layouts relate;
import (`ParamAssembler`, `load_hf_checkpoint`) and export (`hf_tensors`, `save_hf_checkpoint`) both read it,
so they cannot drift apart. The GGUF importer reuses it too, after renaming llama.cpp's tensors to HF's.

Files are read with `safetensors` (framework="numpy") and json only: never pickles. config.json <-> LlamaConfig is
in hf_config.py.
"""

import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from rankrag_jax.convert.hf_config import (CONFIG_FILE, CheckpointError, config_to_hf, generation_config_dict,
                                           np_dtype, read_hf_config)
from rankrag_jax.model.config import LlamaConfig

PathLike = str | os.PathLike

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclasses.dataclass(frozen=True)
class ParamMapping:
  """One HF tensor (one per layer when `hf_name` holds "{layer}") <-> one leaf of our params.

  `dims` are the LlamaConfig fields giving our per-layer shape. HF keeps nn.Linear weights as [out, in]; our
  kernels are [in..., out...] with head axes split out, and the first `in_ndim` of `dims` are the input:
    ours = hf.T.reshape(dims)        hf = ours.reshape(prod(in dims), prod(out dims)).T
  `in_ndim=0` means the tensor is stored the same way in both (embedding table, norm scales).
  """
  hf_name: str
  path: tuple[str, ...]
  dims: tuple[str, ...]
  in_ndim: int = 0

  @property
  def per_layer(self) -> bool:
    return "{layer}" in self.hf_name

  def shape(self, config: LlamaConfig) -> tuple[int, ...]:
    """Our shape of one layer's slice."""
    return tuple(getattr(config, d) for d in self.dims)

  def hf_shape(self, config: LlamaConfig) -> tuple[int, ...]:
    shape = self.shape(config)
    if not self.in_ndim:
      return shape
    return (math.prod(shape[self.in_ndim:]), math.prod(shape[:self.in_ndim]))

  def to_ours(self, hf_array: np.ndarray, config: LlamaConfig) -> np.ndarray:
    return hf_array.T.reshape(self.shape(config)) if self.in_ndim else hf_array

  def to_hf(self, our_array: np.ndarray, config: LlamaConfig) -> np.ndarray:
    if not self.in_ndim:
      return our_array
    return our_array.reshape(self.hf_shape(config)[::-1]).T


_LAYER = "model.layers.{layer}."
PARAM_MAPPINGS: tuple[ParamMapping, ...] = (
    ParamMapping("model.embed_tokens.weight", ("embed_tokens", "embedding"), ("vocab_size", "hidden_size")),
    ParamMapping(_LAYER + "input_layernorm.weight", ("layers", "attn_norm", "scale"), ("hidden_size",)),
    ParamMapping(_LAYER + "self_attn.q_proj.weight", ("layers", "attn", "q_proj", "kernel"),
                 ("hidden_size", "num_heads", "head_dim"), in_ndim=1),
    ParamMapping(_LAYER + "self_attn.k_proj.weight", ("layers", "attn", "k_proj", "kernel"),
                 ("hidden_size", "num_kv_heads", "head_dim"), in_ndim=1),
    ParamMapping(_LAYER + "self_attn.v_proj.weight", ("layers", "attn", "v_proj", "kernel"),
                 ("hidden_size", "num_kv_heads", "head_dim"), in_ndim=1),
    ParamMapping(_LAYER + "self_attn.o_proj.weight", ("layers", "attn", "o_proj", "kernel"),
                 ("num_heads", "head_dim", "hidden_size"), in_ndim=2),
    ParamMapping(_LAYER + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), ("hidden_size",)),
    ParamMapping(_LAYER + "mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"),
                 ("hidden_size", "intermediate_size"), in_ndim=1),
    ParamMapping(_LAYER + "mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"),
                 ("hidden_size", "intermediate_size"), in_ndim=1),
    ParamMapping(_LAYER + "mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"),
                 ("intermediate_size", "hidden_size"), in_ndim=1),
    ParamMapping("model.norm.weight", ("final_norm", "scale"), ("hidden_size",)),
    ParamMapping("lm_head.weight", ("lm_head", "kernel"), ("hidden_size", "vocab_size"), in_ndim=1),
)
# HF tensors we accept and drop: rotary tables some older exports saved (we recompute them).
_IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# Our LlamaConfig field -> its name in config.json, for error messages and the two config converters.
HF_FIELD_NAMES = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
}


def mappings_for(config: LlamaConfig) -> tuple[ParamMapping, ...]:
  """The table entries this config uses (no `lm_head` when embeddings are tied)."""
  return tuple(m for m in PARAM_MAPPINGS if not (config.tie_word_embeddings and m.path[0] == "lm_head"))


def _concrete_names(config: LlamaConfig) -> dict[str, tuple[ParamMapping, int | None]]:
  """Every HF tensor name the config implies -> (mapping, layer index or None)."""
  names = {}
  for m in mappings_for(config):
    if m.per_layer:
      names.update({m.hf_name.format(layer=i): (m, i) for i in range(config.num_layers)})
    else:
      names[m.hf_name] = (m, None)
  return names


# ---------------------------------------------------------------------------------------------------------
# Import

class ParamAssembler:
  """Builds our stacked params from HF-named tensors given one at a time.

  Each tensor is converted and written straight into its layer's slice of a preallocated [L, ...] array, so
  only one copy of the weights (plus one tensor) is alive while loading. `config_source` and `field_names`
  (LlamaConfig field -> the source's name for it) only shape error messages.
  """

  def __init__(self, config: LlamaConfig, dtype=jnp.float32, config_source: str = CONFIG_FILE,
               field_names: Mapping[str, str] = HF_FIELD_NAMES):
    self.config = config
    self._dtype = np_dtype(dtype)
    self._config_source = config_source
    self._field_names = field_names
    self._expected = _concrete_names(config)
    self._seen: set[str] = set()
    self._arrays: dict[tuple[str, ...], np.ndarray] = {}

  def expects(self, hf_name: str) -> bool:
    return hf_name in self._expected

  def _shape_error(self, m: ParamMapping, file: str, tensor: str, actual, expected) -> CheckpointError:
    fields = ", ".join(f"{self._field_names.get(d, d)}={getattr(self.config, d)}" for d in m.dims)
    return CheckpointError(f"{file}: tensor {tensor!r} has shape {list(actual)}, but {self._config_source} "
                           f"({fields}) implies {list(expected)}")

  def check_shape(self, hf_name: str, shape: Sequence[int], file: str, tensor: str | None = None) -> None:
    """Raises CheckpointError when `shape` (HF layout) disagrees with the config; before reading data."""
    m, _ = self._expected[hf_name]
    if tuple(shape) != m.hf_shape(self.config):
      raise self._shape_error(m, file, tensor or hf_name, shape, m.hf_shape(self.config))

  def add(self, hf_name: str, hf_array: np.ndarray, file: str, tensor: str | None = None) -> None:
    """Converts one HF-layout tensor into our layout; `file`/`tensor` name its origin in errors."""
    if hf_name not in self._expected:
      if _IGNORED_HF_TENSORS.fullmatch(hf_name) or (hf_name == "lm_head.weight" and self.config.tie_word_embeddings):
        return  # tied checkpoints sometimes also store the (identical) head; the tied path ignores it.
      raise CheckpointError(f"{file}: unexpected tensor {tensor or hf_name!r} (not part of a Llama with "
                            f"{self._config_source}'s settings)")
    self.check_shape(hf_name, hf_array.shape, file, tensor)
    m, layer = self._expected[hf_name]
    ours = m.to_ours(hf_array, self.config)
    if m.path not in self._arrays:
      shape = ((self.config.num_layers,) if m.per_layer else ()) + m.shape(self.config)
      self._arrays[m.path] = np.empty(shape, self._dtype)
    if layer is None:
      self._arrays[m.path][...] = ours
    else:
      self._arrays[m.path][layer] = ours
    self._seen.add(hf_name)

  def missing(self) -> list[str]:
    return [n for n in self._expected if n not in self._seen]

  def finish(self, source: str) -> dict:
    """The params pytree (jax arrays); raises CheckpointError naming `source` and the missing tensors."""
    missing = self.missing()
    if missing:
      more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
      raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}{more}")
    params: dict = {}
    for path in list(self._arrays):
      node = params
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = jnp.asarray(self._arrays.pop(path))  # drop each numpy copy as soon as it is on device.
    return params


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """The weight files: the single file, or every shard the index names (all must exist)."""
  single, index = directory / SAFETENSORS_FILE, directory / SAFETENSORS_INDEX_FILE
  if single.is_file():
    return [single]
  if not index.is_file():
    raise CheckpointError(f"{directory}: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX_FILE} exists")
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (OSError, ValueError, KeyError) as e:
    raise CheckpointError(f"{index}: not a safetensors index (need a 'weight_map'): {e}") from None
  files = [directory / name for name in dict.fromkeys(weight_map.values())]
  for file in files:
    if not file.is_file():
      raise CheckpointError(f"{file}: no such file (named by {index.name})")
  return files


def load_hf_checkpoint(directory: PathLike, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
  """Reads an HF Llama directory (config.json + model.safetensors or a sharded index) into (config, params).

  Params are cast to `dtype`, which also becomes the config's `param_dtype`.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: no such directory")
  config = dataclasses.replace(read_hf_config(directory), param_dtype=dtype)
  assembler = ParamAssembler(config, dtype, config_source=str(directory / CONFIG_FILE))
  for file in _safetensors_files(directory):
    try:
      with safetensors.safe_open(str(file), framework="numpy") as f:
        for name in f.keys():
          if assembler.expects(name):
            assembler.check_shape(name, f.get_slice(name).get_shape(), str(file))
          assembler.add(name, f.get_tensor(name), str(file))
    except safetensors.SafetensorError as e:
      raise CheckpointError(f"{file}: not a readable safetensors file: {e}") from None
  return config, assembler.finish(str(directory))


# ---------------------------------------------------------------------------------------------------------
# Export

def _leaf(params: Mapping, path: tuple[str, ...]):
  node = params
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise CheckpointError(f"params: missing {'/'.join(path[:i + 1])}")
    node = node[key]
  return node


def _checked_leaves(config: LlamaConfig, params: Mapping) -> dict[tuple[str, ...], Any]:
  """Our leaf for every table entry, each checked against the config's shape."""
  leaves = {}
  for m in mappings_for(config):
    leaf = _leaf(params, m.path)
    expected = ((config.num_layers,) if m.per_layer else ()) + m.shape(config)
    if tuple(leaf.shape) != expected:
      fields = ", ".join(f"{d}={getattr(config, d)}" for d in m.dims)
      raise CheckpointError(f"params: {'/'.join(m.path)} has shape {list(leaf.shape)}, but the config "
                            f"({fields}, num_layers={config.num_layers}) implies {list(expected)}")
    leaves[m.path] = leaf
  return leaves


def hf_tensors(config: LlamaConfig, params: Mapping, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, numpy array in HF layout) one tensor at a time, in HF's order (layer by layer).

  Shapes are checked when this is called, not at the first `next`. Only one layer's slice is copied to
  the host at a time, so sharded device params never need a full host copy.
  """
  leaves = _checked_leaves(config, params)
  names = _concrete_names(config)

  def generate():
    for name in _ordered_names(names):
      m, layer = names[name]
      array = np.asarray(jax.device_get(leaves[m.path] if layer is None else leaves[m.path][layer]))
      array = np.ascontiguousarray(m.to_hf(array, config))
      yield name, array.astype(np_dtype(dtype), copy=False) if dtype is not None else array

  return generate()


def _ordered_names(names: Mapping[str, tuple[ParamMapping, int | None]]) -> list[str]:
  """Embedding, then layer 0's tensors, layer 1's, ..., then the final norm and head (HF's own order)."""
  def key(name):
    m, layer = names[name]
    group = 0 if m.path[0] == "embed_tokens" else (1 if layer is not None else 2)
    return (group, layer or 0, PARAM_MAPPINGS.index(m))
  return sorted(names, key=key)


def parse_size(size: int | str) -> int:
  """Bytes from an int or an HF-style size string ("5GB", "200MB", "100KiB")."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
  if not match:
    raise ValueError(f"max_shard_size={size!r}: expected bytes or a string like '5GB'")
  unit = match.group(2) or "B"
  base = 1024 if "I" in unit else 1000
  return int(float(match.group(1)) * base ** "BKMGT".index(unit[0]))


def save_hf_checkpoint(directory: PathLike, config: LlamaConfig, params: Mapping, tokenizer=None,
                       max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype=None) -> list[pathlib.Path]:
  """Writes an HF Llama directory that `AutoModelForCausalLM.from_pretrained` loads; returns the files.

  Weights go to model.safetensors, or to model-0000i-of-0000n.safetensors + index when they exceed
  `max_shard_size`; also config.json, generation_config.json and, given a tokenizer, its files
  (`tokenizer.save(dir)`). `dtype` (default: the params' own) is the stored precision.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  limit = parse_size(max_shard_size)
  names = _concrete_names(config)
  dtype = np_dtype(dtype if dtype is not None else _leaf(params, ("embed_tokens", "embedding")).dtype)
  # Plan shards from shapes alone, then materialise one shard's tensors at a time.
  shards: list[list[str]] = [[]]
  shard_bytes = total = 0
  for name in _ordered_names(names):
    m, _ = names[name]
    nbytes = math.prod(m.hf_shape(config)) * dtype.itemsize
    if shards[-1] and shard_bytes + nbytes > limit:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(name)
    shard_bytes += nbytes
    total += nbytes
  tensors = hf_tensors(config, params, dtype)  # checks every shape before any file is touched.
  for stale in [directory / SAFETENSORS_FILE, directory / SAFETENSORS_INDEX_FILE,
                *directory.glob("model-?????-of-?????.safetensors")]:
    stale.unlink(missing_ok=True)  # a previous export's shards would mix with this one's.

  written = []
  for i, shard in enumerate(shards):
    file = directory / (SAFETENSORS_FILE if len(shards) == 1 else
                        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    block = dict(next(tensors) for _ in shard)
    safetensors.numpy.save_file(block, str(file), metadata={"format": "pt"})  # transformers wants "pt".
    del block
    written.append(file)
  if len(shards) > 1:
    weight_map = {name: written[i].name for i, shard in enumerate(shards) for name in shard}
    index = directory / SAFETENSORS_INDEX_FILE
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    written.append(index)

  (directory / CONFIG_FILE).write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")
  stop_ids = list(getattr(tokenizer, "stop_ids", ()) or ()) if tokenizer is not None else []
  (directory / GENERATION_CONFIG_FILE).write_text(
      json.dumps(generation_config_dict(config, stop_ids), indent=2) + "\n")
  written += [directory / CONFIG_FILE, directory / GENERATION_CONFIG_FILE]
  if tokenizer is not None:
    tokenizer.save(directory)
    written += sorted(p for p in directory.iterdir()
                      if p.name.startswith(("tokenizer", "special_tokens_map", "chat_template")))
  return written
