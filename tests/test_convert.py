"""Checkpoints in and out, checked against transformers: HF safetensors both ways, GGUF in, and bad input."""

import dataclasses
import functools
import json
import math
import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from rankrag_jax import assets
from rankrag_jax.convert import CheckpointError, hf, load_gguf, load_hf_checkpoint, load_model, save_hf_checkpoint
from rankrag_jax.convert import gguf as gguf_convert
from rankrag_jax.convert import hf_config
from rankrag_jax.model import config as config_lib
from rankrag_jax.model import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens, positions=None, segment_ids=None):
  return llama.Llama(config).apply({"params": params}, tokens, positions, segment_ids)


def _padded_batch(vocab_size=256, seed=0):
  """Token ids, HF attention mask and HF-style positions (cumsum - 1) for a full, a left- and a right-padded row."""
  mask = np.ones((3, 10), np.int64)
  mask[1, :3] = 0
  mask[2, 6:] = 0
  ids = np.random.default_rng(seed).integers(3, vocab_size, mask.shape) * mask
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return ids, mask, positions


def _max_abs_diff_on_real_tokens(config, params, hf_model):
  ids, mask, positions = _padded_batch(config.vocab_size)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(positions)).logits.numpy()
  ours = np.asarray(_forward(config, params, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32),
                             jnp.asarray(mask, jnp.int32)))
  real = mask.astype(bool)
  assert ref[real].std() > 0.5, "logits too small for the tolerance to mean anything"
  return float(np.abs(ours[real] - ref[real]).max())


def _random_hf_model(tie_word_embeddings=False, seed=0):
  """A transformers Llama with GQA, llama3 RoPE scaling, and weights large enough to give O(1) logits."""
  config = transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
      num_key_value_heads=2, head_dim=8, rope_theta=10000.0, rope_scaling=dict(LLAMA3_ROPE), rms_norm_eps=1e-5,
      max_position_embeddings=512, tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))  # distinct norms catch a swapped attn/mlp norm.
      else:
        p.normal_(0.0, 1.0 if "embed_tokens" in name else 0.15)
  return model


@functools.lru_cache(maxsize=None)
def _random_params(config, seed=0):
  """Our params with the same scales as `_random_hf_model` (cached: configs are hashable, arrays immutable)."""
  params = jax.jit(llama.init_params, static_argnums=0)(config, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  new = []
  for (path, leaf), key in zip(leaves, keys):
    name = jax.tree_util.keystr(path)
    noise = jax.random.normal(key, leaf.shape, leaf.dtype)
    new.append(1 + 0.2 * noise if "scale" in name else noise * (1.0 if "embed_tokens" in name else 0.15))
  return jax.tree.unflatten(treedef, new)


# ---------------------------------------------------------------------------------------------------------
# HF safetensors

@pytest.mark.parametrize("max_shard_size", [None, "40KB"], ids=["single_file", "sharded"])
def test_import_matches_transformers_logits(tmp_path, max_shard_size):
  hf_model = _random_hf_model()
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  hf_model.save_pretrained(tmp_path, **kwargs)
  sharded = (tmp_path / hf.SAFETENSORS_INDEX_FILE).exists()
  assert sharded == bool(max_shard_size)

  config, params = load_hf_checkpoint(tmp_path)

  assert config.num_kv_heads == 2 and not config.tie_word_embeddings
  assert config.rope_scaling == config_lib.RopeScaling(8.0, 1.0, 4.0, 64)
  diff = _max_abs_diff_on_real_tokens(config, params, hf_model)
  print(f"import ({'sharded' if sharded else 'single file'}): max |ours - transformers| = {diff:.2e}")
  assert diff < 1e-4


@pytest.mark.parametrize("tied", [False, True], ids=["untied_sharded", "tied"])
def test_export_loads_in_transformers(tmp_path, tied):
  config = config_lib.tiny(tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
  params = _random_params(config)
  written = save_hf_checkpoint(tmp_path, config, params, max_shard_size="100KB" if not tied else "5GB")
  assert all(p.exists() for p in written)
  assert (tmp_path / hf.SAFETENSORS_INDEX_FILE).exists() == (not tied)

  hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True,
                                                                     dtype=torch.float32)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert hf_model.config.tie_word_embeddings == tied
  diff = _max_abs_diff_on_real_tokens(config, params, hf_model.eval())
  print(f"export ({'tied' if tied else 'untied'}): max |ours - transformers| = {diff:.2e}")
  assert diff < 1e-4

  generation = json.loads((tmp_path / hf.GENERATION_CONFIG_FILE).read_text())
  assert generation == {"do_sample": False, "bos_token_id": 1, "eos_token_id": 2}
  # And back: the round trip is exact.
  config_back, params_back = load_hf_checkpoint(tmp_path)
  assert config_back == config
  jax.tree.map(np.testing.assert_array_equal, params_back, params)


def test_config_round_trips_through_config_json():
  for name in config_lib.PRESETS:
    config = config_lib.get_config(name)
    assert hf_config.config_from_hf(json.loads(json.dumps(hf_config.config_to_hf(config)))) == config, name
  # transformers 5 writes rope settings as `rope_parameters`.
  written = _random_hf_model().config.to_dict()
  assert "rope_parameters" in written
  assert hf_config.config_from_hf(written).rope_scaling == config_lib.RopeScaling(8.0, 1.0, 4.0, 64)


# ---------------------------------------------------------------------------------------------------------
# GGUF

def _llama_cpp_permute(weights, n_head, n_head_kv=None):
  """convert_hf_to_gguf.py's Q/K row permutation (HF rotate-half pairs -> interleaved pairs), as llama.cpp has it."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def _llama_cpp_rope_freqs(config, rope):
  """convert_hf_to_gguf.py's llama3 `rope_freqs` tensor: the divisor of each RoPE frequency."""
  freqs = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float32) / config.head_dim))
  low_wavelen = 8192 / rope.low_freq_factor
  high_wavelen = 8192 / rope.high_freq_factor
  factors = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high_wavelen:
      factors.append(1.0)
    elif wavelen > low_wavelen:
      factors.append(rope.factor)
    else:
      smooth = (8192 / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
      factors.append(1 / ((1 - smooth) / rope.factor + smooth))
  return np.array(factors, np.float32)


_HF_TO_GGUF = {hf_name: gguf_name for gguf_name, hf_name in gguf_convert.GGUF_TO_HF_NAMES.items()}


def _write_llama_gguf(path, config, params, arch="llama", tensor_types=None, metadata_overrides=None):
  """A llama.cpp-style GGUF of our params: llama.* metadata, permuted Q/K, optional llama3 rope_freqs.

  `tensor_types` maps GGUF tensor names to a quantisation type (default F32).
  """
  writer = gguf.GGUFWriter(str(path), arch)
  metadata = {"block_count": config.num_layers, "context_length": config.max_position_embeddings,
              "embedding_length": config.hidden_size, "feed_forward_length": config.intermediate_size,
              "attention.head_count": config.num_heads, "attention.head_count_kv": config.num_kv_heads,
              "rope.dimension_count": config.head_dim, "vocab_size": config.vocab_size}
  metadata.update(metadata_overrides or {})
  for key, value in metadata.items():
    writer.add_uint32(f"{arch}.{key}", value)
  writer.add_float32(f"{arch}.rope.freq_base", config.rope_theta)
  writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
  for hf_name, array in hf.hf_tensors(config, params, np.float32):
    gguf_name = re.sub(r"model\.layers\.(\d+)\.", "model.layers.{layer}.", hf_name)
    layer = re.search(r"layers\.(\d+)\.", hf_name)
    gguf_name = _HF_TO_GGUF[gguf_name].format(layer=layer.group(1) if layer else "")
    if "q_proj" in hf_name:
      array = _llama_cpp_permute(array, config.num_heads)
    elif "k_proj" in hf_name:
      array = _llama_cpp_permute(array, config.num_heads, config.num_kv_heads)
    qtype = (tensor_types or {}).get(gguf_name, gguf.GGMLQuantizationType.F32)
    if qtype == gguf.GGMLQuantizationType.F32:
      writer.add_tensor(gguf_name, array)
    elif qtype == gguf.GGMLQuantizationType.Q8_1:  # no quantiser in gguf-py: any bytes of the right size.
      block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
      raw = np.zeros((array.shape[0], array.shape[1] // block_elems * block_bytes), np.uint8)
      writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
    else:
      writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
  if config.rope_scaling is not None:
    writer.add_tensor(gguf_convert.ROPE_FREQS_TENSOR, _llama_cpp_rope_freqs(config, config.rope_scaling))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_import_undoes_llama_cpp_layout(tmp_path, tied):
  """A GGUF written the way llama.cpp writes one (reversed shapes, permuted Q/K, rope_freqs) loads back exactly."""
  config = config_lib.tiny(tie_word_embeddings=tied, rope_theta=500000.0,
                           rope_scaling=config_lib.RopeScaling(8.0, 1.0, 4.0, 8192), max_position_embeddings=512)
  params = _random_params(config)
  q8 = gguf.GGMLQuantizationType.Q8_0
  path = _write_llama_gguf(tmp_path / "tiny.gguf", config, params, tensor_types={"blk.1.ffn_up.weight": q8})

  loaded_config, loaded = load_gguf(path)

  assert loaded_config == config
  up = np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"][1])
  expected_up = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(up.T), q8), q8).T
  np.testing.assert_array_equal(loaded["layers"]["mlp"]["up_proj"]["kernel"][1], expected_up)
  loaded["layers"]["mlp"]["up_proj"]["kernel"] = params["layers"]["mlp"]["up_proj"]["kernel"]
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


@pytest.fixture(scope="module")
def smollm2():
  return load_model("smollm2_135m_instruct")


def _chat_prompt_ids(tokenizer):
  text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True)
  return tokenizer.encode(text)


def test_smollm2_gguf_matches_transformers(smollm2):
  config, params, tokenizer = smollm2
  gguf_path = assets.asset_file("smollm2_135m_instruct")
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                               dtype=torch.float32).eval()
  ids = np.array([_chat_prompt_ids(tokenizer)])
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(_forward(config, params, jnp.asarray(ids, jnp.int32)))
  diff = float(np.abs(ours - ref).max())
  print(f"SmolLM2 GGUF: max |ours - transformers| = {diff:.2e} (logit scale {np.abs(ref).max():.1f})")
  assert diff < 1e-3


@functools.partial(jax.jit, static_argnums=0)
def _cached_step(config, params, tokens, cache):
  """Feeds `tokens` [1, T] through the KV cache; returns the last position's logits and the cache."""
  model = llama.Llama(config)
  t = tokens.shape[1]
  positions = cache["index"] + jnp.arange(t, dtype=jnp.int32)[None]
  hidden, cache = model.apply({"params": params}, tokens, positions, jnp.ones_like(tokens), cache=cache,
                              method=llama.Llama.hidden_states)
  return model.apply({"params": params}, hidden[:, -1], method=llama.Llama.logits_from_hidden), cache


def test_smollm2_greedy_chat_answers_paris(smollm2):
  config, params, tokenizer = smollm2
  prompt = _chat_prompt_ids(tokenizer)
  max_new_tokens = 12
  cache = llama.init_cache(config, batch_size=1, max_length=len(prompt) + max_new_tokens)
  logits, cache = _cached_step(config, params, jnp.array([prompt], jnp.int32), cache)
  answer = []
  for _ in range(max_new_tokens):
    next_id = int(jnp.argmax(logits[0]))
    if next_id in tokenizer.stop_ids:
      break
    answer.append(next_id)
    logits, cache = _cached_step(config, params, jnp.array([[next_id]], jnp.int32), cache)
  text = tokenizer.decode(answer)
  print(f"SmolLM2 greedy answer: {text!r}")
  assert "Paris" in text


# ---------------------------------------------------------------------------------------------------------
# Bad input: every error names the file and the tensor or field.

def test_missing_files_are_named(tmp_path):
  with pytest.raises(CheckpointError, match="nowhere"):
    load_hf_checkpoint(tmp_path / "nowhere")
  with pytest.raises(CheckpointError, match="config.json"):
    load_hf_checkpoint(tmp_path)
  config = config_lib.tiny()
  save_hf_checkpoint(tmp_path / "sharded", config, _random_params(config), max_shard_size="100KB")
  index = json.loads((tmp_path / "sharded" / hf.SAFETENSORS_INDEX_FILE).read_text())
  shard = sorted(set(index["weight_map"].values()))[1]
  (tmp_path / "sharded" / shard).unlink()
  with pytest.raises(CheckpointError, match=re.escape(shard) + r".*model\.safetensors\.index\.json"):
    load_hf_checkpoint(tmp_path / "sharded")
  (tmp_path / "weightless").mkdir()
  (tmp_path / "weightless" / "config.json").write_text(json.dumps(hf_config.config_to_hf(config)))
  with pytest.raises(CheckpointError, match=r"weightless.*model\.safetensors"):
    load_hf_checkpoint(tmp_path / "weightless")
  with pytest.raises(CheckpointError, match="missing.gguf"):
    load_gguf(tmp_path / "missing.gguf")
  with pytest.raises(CheckpointError, match="no_such_model"):
    load_model("no_such_model")
  (tmp_path / "orbax_like").mkdir()
  with pytest.raises(CheckpointError, match="orbax_like: neither an HF checkpoint .* nor a rankrag_jax training run"):
    load_model(tmp_path / "orbax_like")


def test_missing_tensor_is_named(tmp_path):
  config = config_lib.tiny()
  save_hf_checkpoint(tmp_path, config, _random_params(config))
  file = tmp_path / hf.SAFETENSORS_FILE
  tensors = safetensors.numpy.load_file(str(file))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  safetensors.numpy.save_file(tensors, str(file))
  with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
    load_hf_checkpoint(tmp_path)


def test_config_weight_shape_mismatch_names_file_tensor_and_field(tmp_path):
  config = config_lib.tiny()
  save_hf_checkpoint(tmp_path, config, _random_params(config))
  config_json = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config_json, "intermediate_size": 96}))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' "
                                            r"has shape .*config\.json \(.*intermediate_size=96"):
    load_hf_checkpoint(tmp_path)
  with pytest.raises(CheckpointError, match=r"params: layers/mlp/\w+_proj/kernel has shape"):
    save_hf_checkpoint(tmp_path / "out", dataclasses.replace(config, intermediate_size=96), _random_params(config))


def test_unsupported_config_fields_are_named():
  base = hf_config.config_to_hf(config_lib.tiny())
  with pytest.raises(CheckpointError, match=r"config\.json: rope_scaling\.rope_type='yarn'"):
    hf_config.config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(CheckpointError, match=r"config\.json: model_type='mistral'"):
    hf_config.config_from_hf({**base, "model_type": "mistral", "architectures": ["MistralForCausalLM"]})
  with pytest.raises(CheckpointError, match=r"config\.json: required field 'hidden_size'"):
    hf_config.config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})


def test_unsupported_gguf_architecture_is_named(tmp_path):
  path = tmp_path / "gpt2.gguf"
  writer = gguf.GGUFWriter(str(path), "gpt2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(CheckpointError, match=r"gpt2\.gguf: general\.architecture='gpt2' is not supported"):
    load_gguf(path)


def test_unsupported_gguf_quant_type_and_shape_mismatch_are_named(tmp_path):
  config = config_lib.tiny(rope_scaling=None)
  params = _random_params(config)
  path = _write_llama_gguf(tmp_path / "q81.gguf", config, params,
                           tensor_types={"blk.0.attn_v.weight": gguf.GGMLQuantizationType.Q8_1})
  with pytest.raises(CheckpointError, match=r"q81\.gguf: tensor 'blk\.0\.attn_v\.weight' has type Q8_1"):
    load_gguf(path)
  path = _write_llama_gguf(tmp_path / "shape.gguf", config, params, metadata_overrides={"feed_forward_length": 96})
  with pytest.raises(CheckpointError, match=r"shape\.gguf: tensor 'blk\.0\.ffn_\w+\.weight' has shape .*"
                                            r"llama\.feed_forward_length=96"):
    load_gguf(path)


def test_bfloat16_export_round_trips(tmp_path):
  config = config_lib.tiny()
  params = _random_params(config)
  save_hf_checkpoint(tmp_path, config, params, dtype="bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  as_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  _, loaded_f32 = load_hf_checkpoint(tmp_path)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.float32)), loaded_f32, as_bf16)
  config_bf16, loaded_bf16 = load_hf_checkpoint(tmp_path, dtype=jnp.bfloat16)
  assert config_bf16.param_dtype == jnp.bfloat16
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b) or a.dtype == jnp.bfloat16, loaded_bf16, as_bf16)


@pytest.mark.slow
def test_cli_exports_smollm2_that_transformers_runs(tmp_path):
  """`python -m rankrag_jax.convert` GGUF -> HF dir; transformers' own tokenizer + model then answer Paris."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = tmp_path / "smollm2_hf"
  result = subprocess.run([sys.executable, "-m", "rankrag_jax.convert", "--input", "smollm2_135m_instruct",
                           "--output_hf", str(out), "--dtype", "bfloat16"], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "model.safetensors" in result.stdout and "tokenizer.json" in result.stdout
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                  dtype=torch.float32)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
  output = model.generate(**ids, max_new_tokens=12)
  assert "Paris" in tokenizer.decode(output[0, ids["input_ids"].shape[1]:])
