"""The CPU decode backend: the weights `generate` decodes from on a CPU target, each layer's weights sliced once out
of the stack, optionally again with q/k/v and gate/up fused and every kernel in `row_matmul` panel order, and the LM
head in column blocks or panels (`make_decode_weights`, made once at load by `rag.load_rag_model`); and the forward
pass over them with a per-layer KV cache (`unstacked_hidden_states`). The fused panel layout exists only here:
the model has one parameter layout, and `_panel_decoder_layer` is its decoder layer on the fused panels.

Why: a decode step with few rows is a stream over every weight; on XLA:CPU, slicing each layer out of the stacked
params copies it at every step (~40% of a batch-8 SmolLM2 step), and XLA's few-row dots stream the weights on one
core at about half of what the machine reads (bench/README.md, sessions 4, 15 and 17).
"""

import functools

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rankrag_jax.backends.cpu import row_matmul
from rankrag_jax.model import attention
from rankrag_jax.model import llama
from rankrag_jax.model import token_layout
from rankrag_jax.model.config import LlamaConfig

Array = jax.Array


def unstack_layers(params: dict) -> list[dict]:
  """Each decoder layer's parameters, sliced once out of the stacked `params["layers"]`."""
  num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(num_layers)]


def fuse_panel_projections(layer: dict) -> dict:
  """One layer's params as `_panel_decoder_layer` takes them: q/k/v kernels concatenated on the heads axis
  (`attn/qkv_proj`), gate/up on the features axis (`mlp/gate_up_proj`), so that a decode step reads each group of
  weights in one row_matmul call instead of three or two (a call costs ~10 us beyond its weights' stream;
  bench/README.md, session 17)."""
  attn, mlp = dict(layer["attn"]), dict(layer["mlp"])
  qkv = [attn.pop(name)["kernel"] for name in ("q_proj", "k_proj", "v_proj")]
  gate_up = [mlp.pop(name)["kernel"] for name in ("gate_proj", "up_proj")]
  return {**layer, "attn": {**attn, "qkv_proj": {"kernel": jnp.concatenate(qkv, axis=1)}},
          "mlp": {**mlp, "gate_up_proj": {"kernel": jnp.concatenate(gate_up, axis=1)}}}


# Columns per block of `_lm_head_column_blocks`.
LM_HEAD_BLOCK = 1536


def _lm_head_kernel(params: dict, config: LlamaConfig) -> Array:
  """The output projection [D, V]."""
  if config.tie_word_embeddings:
    return params["embed_tokens"]["embedding"].T
  return params["lm_head"]["kernel"]


def _lm_head_column_blocks(params: dict, config: LlamaConfig) -> list[Array]:
  """The output projection [D, V] as [D, LM_HEAD_BLOCK] column blocks (copies, made once by `make_decode_weights`).

  Why: XLA:CPU streams a [B, D] x [D, V] product with few rows through one core at ~8.5 GB/s, whether the weights
  are the tied [V, D] table or a [D, V] kernel, and blocks of 1,536 columns at ~14 GB/s: SmolLM2's LM head takes
  ~8 instead of ~13 ms per batch-8 decode step (bench/README.md).
  """
  weights = _lm_head_kernel(params, config)
  return [weights[:, start:start + LM_HEAD_BLOCK] for start in range(0, config.vocab_size, LM_HEAD_BLOCK)]


def _lm_head_panels(params: dict, config: LlamaConfig) -> list[Array]:
  """The output projection in `row_matmul.to_panels` order, its columns zero-padded to a multiple of the panel
  width (`lm_head_logits` drops the padded logits): one block."""
  weights = _lm_head_kernel(params, config)
  return [row_matmul.to_panels(jnp.pad(weights, ((0, 0), (0, -config.vocab_size % row_matmul.PANEL))))]


def lm_head_logits(config: LlamaConfig, weights: "DecodeWeights", hidden: Array) -> Array:
  """`Llama.logits_from_hidden` of hidden [B, D] from the decode weights' LM head blocks: f32 logits [B, V]."""
  hidden = hidden.astype(config.dtype)
  if weights.has_panels:
    dot = lambda block: row_matmul.panel_dot_general(hidden, block, (((1,), (0,)), ((), ())))
  else:
    dot = lambda block: hidden @ block.astype(config.dtype)
  logits = jnp.concatenate([dot(block) for block in weights.lm_head_blocks], axis=-1)
  return logits[:, :config.vocab_size].astype(jnp.float32)


@flax.struct.dataclass
class DecodeWeights:
  """What `generate.decode_batch` runs on the CPU backend (`make_decode_weights`): each layer's weights (a list of
  per-layer param dicts), the output projection [D, V] in column blocks, and optionally the layers again with q/k/v
  and gate/up fused (`fuse_panel_projections`) and every kernel in `row_matmul.to_panels` order (then the output
  projection is one panel-order block): decode steps then run their products through row_matmul's thread-pool
  kernel, while the prompt's run as XLA's dots on `layers` (made only where attention_impl resolves to cpu_ffi)."""
  layers: list
  lm_head_blocks: list
  panel_layers: list | None = None

  @property
  def has_panels(self) -> bool:
    return self.panel_layers is not None  # static: None is part of the pytree's structure


@gin.configurable(denylist=["params", "config", "mesh"])
def make_decode_weights(params: dict, config: LlamaConfig, mesh: Mesh | None = None,
                        unstack_layers_on_cpu: bool = True) -> DecodeWeights | None:
  """The weights `generate` decodes from: on a CPU target (`attention.target_platform(mesh)`), per-layer copies of
  the layer weights (`unstack_layers`) and the output projection in column blocks, which make decode steps ~2x
  faster for one more copy of the weights in memory; None (the stacked layers of `params`) on other backends or with
  unstack_layers_on_cpu=False (for a model near the host's memory).

  Where `config.attention_impl` resolves to cpu_ffi for the mesh (and the weights are f32), the layers are also
  copied in `row_matmul` panel order: decode steps then split each product over the cores, ~1.6x faster on
  the benchmark machine (bench/README.md, session 15), and the cache attention, the prompt's and the steps', runs
  on the thread pool too (`cpu_attention.cc`; session 16). The prompt prefill keeps the [K, N] copies:
  slicing the stacked params there instead made a temporary as large, and a slower call (SmolLM2: peak RSS 2,660
  vs 2,430 MiB).

  A caller that generates many times from the same params makes them once (`rag.load_rag_model` does) and passes
  them as `generate(..., decode_weights=...)`: copying SmolLM2's takes ~0.3 s (the LM head ~0.1 s of it).
  """
  if not unstack_layers_on_cpu or attention.target_platform(mesh) != "cpu":
    return None
  panels = (config.param_dtype == jnp.float32 and _layer_kernels_fit_panels(params)
            and attention.resolve_for_target(config, mesh) == "cpu_ffi")
  return _jitted_decode_weights(params, config, panels)


def _kernel_contract_ndim(path) -> int:
  """Input axes of a layer kernel: o_proj's [heads, head_dim, D] contracts two, the others [D, ...] one."""
  return 2 if any(getattr(key, "key", None) == "o_proj" for key in path) else 1


def _is_kernel(path) -> bool:
  return getattr(path[-1], "key", None) == "kernel"


def _layer_kernels_fit_panels(params: dict) -> bool:
  kernels = [(path, x) for path, x in jax.tree_util.tree_leaves_with_path(params["layers"]) if _is_kernel(path)]
  return all(row_matmul.can_panel(x.shape[1:], _kernel_contract_ndim(path)) for path, x in kernels)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _jitted_decode_weights(params: dict, config: LlamaConfig, panels: bool) -> DecodeWeights:
  layers = unstack_layers(params)
  if not panels:
    return DecodeWeights(layers, _lm_head_column_blocks(params, config))
  to_panels = lambda path, x: row_matmul.to_panels(x, _kernel_contract_ndim(path)) if _is_kernel(path) else x
  panel_layers = [jax.tree_util.tree_map_with_path(to_panels, fuse_panel_projections(layer))
                  for layer in layers]
  return DecodeWeights(layers, _lm_head_panels(params, config), panel_layers)


def _panel_decoder_layer(config: LlamaConfig, layer: dict, x: Array, sin: Array, cos: Array,
                         vis: attention.Visibility, cache_index: Array, kv_cache: dict) -> tuple[Array, dict]:
  """`llama.DecoderLayer` on one layer of `DecodeWeights.panel_layers` (q/k/v and gate/up fused, panel order): the
  same computation, its products through `row_matmul.panel_dot_general`, attention through cpu_ffi."""
  cfg = config
  dense = lambda features, kernel, h, axis=-1: nn.DenseGeneral(
      features, axis=axis, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      dot_general=row_matmul.panel_dot_general).apply({"params": {"kernel": kernel}}, h)
  norm = lambda name, h: llama.RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype).apply(
      {"params": layer[name]}, h)
  qkv = dense((cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim), layer["attn"]["qkv_proj"]["kernel"],
              norm("attn_norm", x))
  q, k, v = jnp.split(qkv, (cfg.num_heads, cfg.num_heads + cfg.num_kv_heads), axis=-2)
  new_cache = llama.write_kv_cache(kv_cache, llama.apply_rope(k, sin, cos), v, cache_index)
  out = attention.attend(llama.apply_rope(q, sin, cos), new_cache["k"].astype(cfg.dtype),
                         new_cache["v"].astype(cfg.dtype), vis, impl="cpu_ffi", cache_index=cache_index)
  x = x + dense(cfg.hidden_size, layer["attn"]["o_proj"]["kernel"], out, axis=(-2, -1))
  gate, up = jnp.split(dense(2 * cfg.intermediate_size, layer["mlp"]["gate_up_proj"]["kernel"],
                             norm("mlp_norm", x)), 2, axis=-1)
  return x + dense(cfg.hidden_size, layer["mlp"]["down_proj"]["kernel"], nn.silu(gate) * up), new_cache


def unstacked_hidden_states(config: LlamaConfig, params: dict, layers: list[dict], tokens: Array, positions: Array,
                            segment_ids: Array, cache: dict, layout: token_layout.TokenLayout | None = None,
                            output_slots: Array | None = None, panels: bool = False) -> tuple[Array, dict]:
  """`Llama.hidden_states` with a per-layer cache (`llama.init_cache(per_layer=True)`) over `unstack_layers(params)`,
  or with `panels`, over `DecodeWeights.panel_layers` (decode steps: no layout, no output_slots).

  For decode loops: with the layers unstacked before the loop, a step neither slices each layer's weights out of
  the stack (XLA:CPU copies them, ~40% of a batch-8 SmolLM2 step) nor its cache out of the stacked cache.
  """
  if panels and (layout is not None or output_slots is not None):
    raise ValueError("unstacked_hidden_states: the panel layers run decode steps only (no layout, no output_slots)")
  model = llama.Llama(config)
  kv_segments, vis = llama.cached_visibility(cache, segment_ids)
  new_index = cache["index"] + tokens.shape[1]
  if layout is not None:
    tokens, positions = token_layout.to_compact(tokens, layout), token_layout.to_compact(positions, layout)
  x = model.apply({"params": params}, tokens, method=llama.Llama.embed)
  sin, cos = llama.rope_sin_cos(positions, config)
  layer, ks, vs = llama.DecoderLayer(config), [], []
  for i, (layer_params, k, v) in enumerate(zip(layers, cache["k"], cache["v"])):
    if panels:
      x, kv = _panel_decoder_layer(config, layer_params, x, sin, cos, vis, cache["index"], {"k": k, "v": v})
    else:
      query_slots = output_slots if i == len(layers) - 1 else None
      x, kv = layer.apply({"params": layer_params}, x, sin, cos, vis, layout, cache["index"], {"k": k, "v": v},
                          query_slots)
    ks.append(kv["k"])
    vs.append(kv["v"])
  new_cache = {"k": ks, "v": vs, "segment_ids": kv_segments, "index": new_index}
  x = model.apply({"params": params}, x, method=llama.Llama.normalize)
  return (x if layout is None or output_slots is not None else token_layout.to_padded(x, layout)), new_cache
