"""LoRA export checked against transformers + peft: the PEFT adapter directory, the merged HF checkpoint, and
base + adapter served directly (load_model), on a tiny random Llama with GQA and llama3 RoPE scaling."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from rankrag_jax.convert import CheckpointError, load_model, peft as peft_convert, save_hf_checkpoint
from rankrag_jax.model import config as config_lib
from rankrag_jax.model import llama
from rankrag_jax.training import lora as lora_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LORA = lora_lib.LoraConfig(rank=4, alpha=12.0, targets=lora_lib.ALL_TARGETS)


def _base_and_adapters(config, lora=LORA, seed=0):
  """Base weights at the scale of test_convert's (O(1) logits) and adapters with B != 0 that move them by O(1)."""
  params = llama.init_params(config, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = jax.tree.unflatten(treedef, [
      1 + 0.2 * jax.random.normal(k, x.shape) if "scale" in jax.tree_util.keystr(p)
      else jax.random.normal(k, x.shape) * (1.0 if "embed_tokens" in jax.tree_util.keystr(p) else 0.15)
      for (p, x), k in zip(leaves, keys)])
  adapters = lora_lib.init_adapters(_adapter_shapes(config, lora), seed)
  adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(seed + 2), x.shape), adapters)
  return params, adapters


def _adapter_shapes(config, lora):
  return lora_lib.split_adapters(jax.tree.map(lambda x: x.value, lora_lib.boxed_abstract_params(config, lora),
                                              is_leaf=lambda x: hasattr(x, "names")))[1]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _adapted_logits(config, lora, params, adapters, tokens, positions, segment_ids):
  """Our forward with the adapters computed beside each projection (the training form, never merged)."""
  model = lora_lib.AdaptedModel(llama.Llama(config), lora, params)
  return model.apply({"params": adapters}, tokens, positions, segment_ids)


def _batch(vocab_size, seed=0):
  """A full, a left- and a right-padded row: ids, attention mask, positions (cumsum - 1)."""
  mask = np.ones((3, 10), np.int64)
  mask[1, :3] = 0
  mask[2, 6:] = 0
  ids = np.random.default_rng(seed).integers(3, vocab_size, mask.shape) * mask
  return ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _torch_logits(model, ids, mask, positions):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()


def _ours(config, lora, params, adapters, ids, mask, positions):
  return np.asarray(_adapted_logits(config, lora, params, adapters, jnp.asarray(ids, jnp.int32),
                                    jnp.asarray(positions, jnp.int32), jnp.asarray(mask, jnp.int32)))


def _max_diff(ours, ref, mask):
  real = mask.astype(bool)
  return float(np.abs(ours[real] - ref[real]).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(config, params, adapters, base HF dir, PEFT dir, our logits, batch)."""
  root = tmp_path_factory.mktemp("lora_export")
  config = config_lib.tiny(bos_token_id=1, eos_token_id=2)
  params, adapters = _base_and_adapters(config)
  save_hf_checkpoint(root / "base", config, jax.device_get(params))
  peft_convert.save_peft_adapter(root / "adapter", config, jax.device_get(adapters), LORA, str(root / "base"))
  ids, mask, positions = _batch(config.vocab_size)
  ours = _ours(config, LORA, params, adapters, ids, mask, positions)
  return config, params, adapters, root, ours, (ids, mask, positions)


def _peft_model(base_dir, adapter_dir):
  base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def test_peft_adapter_loads_onto_the_transformers_base_with_our_logits(exported):
  config, params, _, root, ours, (ids, mask, positions) = exported
  model = _peft_model(root / "base", root / "adapter")
  ref = _torch_logits(model, ids, mask, positions)
  with model.disable_adapter():
    without = _torch_logits(model, ids, mask, positions)
  diff, effect = _max_diff(ours, ref, mask), _max_diff(without, ref, mask)
  print(f"PEFT round trip: max |ours - transformers+peft| = {diff:.2e} (the adapter moves logits by {effect:.2f})")
  assert effect > 0.5, "the adapters must change the logits for the comparison to mean anything"
  assert diff < 1e-4


@pytest.mark.parametrize("break_it", ["alpha_over_r_wrong", "o_proj_lora_A_flattened_heads_last"])
def test_a_broken_adapter_export_is_caught(exported, tmp_path, break_it):
  """The round-trip test fails for realistic export bugs: the scaling, and the head-axis order of o_proj's A."""
  config, _, _, root, ours, (ids, mask, positions) = exported
  broken = tmp_path / "adapter"
  broken.mkdir()
  fields = json.loads((root / "adapter" / peft_convert.ADAPTER_CONFIG_FILE).read_text())
  tensors = safetensors.numpy.load_file(str(root / "adapter" / peft_convert.ADAPTER_WEIGHTS_FILE))
  if break_it == "alpha_over_r_wrong":
    fields["lora_alpha"] = fields["lora_alpha"] * fields["r"]  # the update scaled by alpha instead of alpha / r
  else:
    for name in [n for n in tensors if "o_proj.lora_A" in n]:
      a = tensors[name].reshape(LORA.rank, config.num_heads, config.head_dim)
      tensors[name] = np.ascontiguousarray(a.transpose(0, 2, 1).reshape(LORA.rank, -1))
  (broken / peft_convert.ADAPTER_CONFIG_FILE).write_text(json.dumps(fields))
  safetensors.numpy.save_file(tensors, str(broken / peft_convert.ADAPTER_WEIGHTS_FILE))
  diff = _max_diff(ours, _torch_logits(_peft_model(root / "base", broken), ids, mask, positions), mask)
  print(f"{break_it}: max |ours - transformers+peft| = {diff:.2e}")
  assert diff > 1e-2


def test_merged_export_loads_in_transformers_with_our_logits(exported, tmp_path):
  config, params, adapters, root, ours, (ids, mask, positions) = exported
  merged = lora_lib.merge_adapters(jax.device_get(params), jax.device_get(adapters), LORA)
  save_hf_checkpoint(tmp_path, config, merged)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  diff = _max_diff(ours, _torch_logits(model, ids, mask, positions), mask)
  # and peft's own merge of our adapter gives the same weights as ours
  peft_merged = _peft_model(root / "base", root / "adapter").merge_and_unload().state_dict()
  weight_diff = max(float(np.abs(peft_merged[k].numpy() - v.numpy()).max()) for k, v in model.state_dict().items())
  print(f"merged export: max |ours - transformers| = {diff:.2e}; max |our merge - peft merge_and_unload| = "
        f"{weight_diff:.2e}")
  assert diff < 1e-4 and weight_diff < 1e-5


def test_peft_directory_reads_back_exactly_and_serves_with_its_base(exported):
  config, params, adapters, root, ours, (ids, mask, positions) = exported
  lora, read, base_model = peft_convert.load_peft_adapter(root / "adapter", config)
  assert lora == LORA and base_model == str(root / "base")
  jax.tree.map(np.testing.assert_array_equal, read, jax.device_get(adapters))
  # load_model: the adapter directory alone (its base from adapter_config.json), merged for the reranker/generator
  for served_config, served, _ in (load_model(root / "adapter"), load_model(root / "base", adapter=root / "adapter")):
    assert served_config == config
    logits = llama.Llama(config).apply({"params": served}, jnp.asarray(ids, jnp.int32),
                                       jnp.asarray(positions, jnp.int32), jnp.asarray(mask, jnp.int32))
    assert _max_diff(np.asarray(logits), ours, mask) < 1e-4


def test_unsupported_adapter_settings_name_the_file_and_field(exported, tmp_path):
  config, *_ = exported
  root = exported[3]
  fields = json.loads((root / "adapter" / peft_convert.ADAPTER_CONFIG_FILE).read_text())
  for field, value in (("use_dora", True), ("target_modules", "all-linear"), ("r", None)):
    bad = dict(fields, **{field: value}) if value is not None else {k: v for k, v in fields.items() if k != field}
    (tmp_path / peft_convert.ADAPTER_CONFIG_FILE).write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=rf"{peft_convert.ADAPTER_CONFIG_FILE}.*{field}"):
      peft_convert.load_peft_adapter(tmp_path, config)
