"""LoRA adapters <-> a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`).

`peft.PeftModel.from_pretrained(transformers_base, directory)` loads what `save_peft_adapter` writes onto the HF
export of the same base with equal logits (tests/test_lora_export.py). Names and layouts come from hf.py's table:
for the HF module `model.layers.{i}.self_attn.q_proj` (weight [out, in]), PEFT keeps
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, in]   = our lora_a[i] as [in, r], transposed
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [out, r]  = our lora_b[i] as [r, out], transposed
and ΔW = (lora_alpha / r)·lora_B·lora_A, which is our (alpha / r)·(A·B) transposed: the kernel's input axes
(e.g. o_proj's heads, head_dim) flatten in the same order as hf.py flattens the kernel itself, so no permutation.
Read with safetensors (numpy) and json only: never pickles.
"""

import json
import os
import pathlib

import numpy as np
import safetensors.numpy

from rankrag_jax.convert import hf
from rankrag_jax.convert.hf_config import CheckpointError
from rankrag_jax.model.config import LlamaConfig
from rankrag_jax.training import lora as lora_lib

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _kernel_mapping(target: str) -> hf.ParamMapping:
  """hf.py's table entry of the target's kernel (its HF name, our dims, how many of them are the input)."""
  path = lora_lib.TARGETS[target][0] + ("kernel",)
  (mapping,) = [m for m in hf.PARAM_MAPPINGS if m.path == path]
  return mapping


def _hf_module(target: str) -> str:
  """The HF module name template of a target, e.g. "model.layers.{layer}.self_attn.q_proj"."""
  return _kernel_mapping(target).hf_name.removesuffix(".weight")


def adapter_config(lora: lora_lib.LoraConfig, base_model: str | None) -> dict:
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
          "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
          "target_modules": sorted(lora.targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
          "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "init_lora_weights": True,
          "inference_mode": True}


def peft_tensors(config: LlamaConfig, adapters: dict, lora: lora_lib.LoraConfig) -> dict[str, np.ndarray]:
  """Our adapters (host arrays, stacked [L, ...]) -> PEFT's tensors (f32), one A and one B per layer and target."""
  tensors = {}
  for target in lora.targets:
    module = lora_lib.subtree(adapters, lora_lib.TARGETS[target][0])
    a, b = np.asarray(module[lora_lib.LORA_A], np.float32), np.asarray(module[lora_lib.LORA_B], np.float32)
    for layer in range(config.num_layers):
      name = _PREFIX + _hf_module(target).format(layer=layer)
      tensors[name + ".lora_A.weight"] = np.ascontiguousarray(a[layer].reshape(-1, lora.rank).T)
      tensors[name + ".lora_B.weight"] = np.ascontiguousarray(b[layer].reshape(lora.rank, -1).T)
  return tensors


def save_peft_adapter(directory: str | os.PathLike, config: LlamaConfig, adapters: dict,
                      lora: lora_lib.LoraConfig, base_model: str | None) -> pathlib.Path:
  """Writes the PEFT directory; `base_model` (what the run's init_checkpoint named) goes in its config."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(peft_tensors(config, adapters, lora), str(directory / ADAPTER_WEIGHTS_FILE),
                              metadata={"format": "pt"})
  (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config(lora, base_model), indent=1))
  return directory


def _target_names(value, path) -> tuple[str, ...]:
  if isinstance(value, str):  # PEFT also allows a regex or "all-linear"; we write (and read) explicit lists
    raise CheckpointError(f"{path}: target_modules {value!r} is a pattern; list the projections, of "
                          f"{list(lora_lib.ALL_TARGETS)}")
  unknown = [t for t in value if t not in lora_lib.TARGETS]
  if unknown:
    raise CheckpointError(f"{path}: target_modules {unknown} are not Llama projections we adapt "
                          f"({list(lora_lib.ALL_TARGETS)})")
  return tuple(value)


def read_adapter_config(directory: str | os.PathLike) -> tuple[lora_lib.LoraConfig, str | None]:
  """(LoraConfig, base_model_name_or_path) from adapter_config.json; what we cannot apply exactly is an error."""
  path = pathlib.Path(directory) / ADAPTER_CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f"{directory}: not a PEFT adapter directory (no {ADAPTER_CONFIG_FILE})")
  try:
    fields = json.loads(path.read_text())
  except ValueError as e:
    raise CheckpointError(f"{path}: not JSON ({e})") from e
  unsupported = {"peft_type": "LORA", "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                 "use_dora": False, "modules_to_save": None, "layers_to_transform": None}
  for field, wanted in unsupported.items():
    if fields.get(field, wanted) != wanted:
      raise CheckpointError(f"{path}: {field} = {fields[field]!r} is not supported (only {wanted!r})")
  for field in ("r", "lora_alpha", "target_modules"):
    if field not in fields:
      raise CheckpointError(f"{path}: missing field {field!r}")
  if fields.get("rank_pattern") or fields.get("alpha_pattern"):
    raise CheckpointError(f"{path}: per-module rank_pattern / alpha_pattern are not supported")
  try:
    lora = lora_lib.LoraConfig(rank=int(fields["r"]), alpha=float(fields["lora_alpha"]),
                               dropout=float(fields.get("lora_dropout") or 0.0),
                               targets=_target_names(fields["target_modules"], path))
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from e
  return lora, fields.get("base_model_name_or_path")


def load_peft_adapter(directory: str | os.PathLike,
                      config: LlamaConfig) -> tuple[lora_lib.LoraConfig, dict, str | None]:
  """(LoraConfig, adapters as stacked numpy f32 [L, ...], base model reference) from a PEFT directory."""
  directory = pathlib.Path(directory)
  lora, base_model = read_adapter_config(directory)
  weights_path = directory / ADAPTER_WEIGHTS_FILE
  if not weights_path.is_file():
    raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS_FILE} (a .bin adapter is a pickle: not read)")
  tensors = safetensors.numpy.load_file(str(weights_path))
  adapters: dict = {}
  for target in lora.targets:
    module_path, _, _ = lora_lib.TARGETS[target]
    mapping = _kernel_mapping(target)
    in_ndim, dims = mapping.in_ndim, mapping.shape(config)
    a_layers, b_layers = [], []
    for layer in range(config.num_layers):
      name = _PREFIX + _hf_module(target).format(layer=layer)
      try:
        a, b = tensors.pop(name + ".lora_A.weight"), tensors.pop(name + ".lora_B.weight")
      except KeyError as e:
        raise CheckpointError(f"{weights_path}: missing tensor {e.args[0]!r}") from e
      want_a, want_b = (lora.rank, int(np.prod(dims[:in_ndim]))), (int(np.prod(dims[in_ndim:])), lora.rank)
      if a.shape != want_a or b.shape != want_b:
        raise CheckpointError(f"{weights_path}: {name} lora_A {list(a.shape)} / lora_B {list(b.shape)}, but r="
                              f"{lora.rank} and the model's config imply {list(want_a)} / {list(want_b)}")
      a_layers.append(a.T.reshape(dims[:in_ndim] + (lora.rank,)))
      b_layers.append(b.T.reshape((lora.rank,) + dims[in_ndim:]))
    module = {lora_lib.LORA_A: np.stack(a_layers).astype(np.float32),
              lora_lib.LORA_B: np.stack(b_layers).astype(np.float32)}
    adapters = lora_lib.combine(adapters, lora_lib.nest(module_path, module))
  if tensors:
    raise CheckpointError(f"{weights_path}: unexpected tensor(s) {sorted(tensors)[:5]} (not adapters of "
                          f"{list(lora.targets)} in a {config.num_layers}-layer Llama)")
  return lora, adapters, base_model

