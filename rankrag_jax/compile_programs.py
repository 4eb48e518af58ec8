"""The programs `train_compile` compiles: train's Stage-II step and rerank's scoring kernel, abstract and sharded.

Each is a `Workload`: `build(config)` returns the jitted function the real command uses plus ShapeDtypeStruct
arguments carrying the Gin mesh's NamedShardings (no array is allocated), for any number of layers; and the FLOPs
the model needs per call (the MFU convention) and those the compiled program should execute.

    workload = stage2_train_workload(mesh, rules)   # from the parsed Gin: loop.train's bindings
    program = workload.build(workload.config)       # every dimension checked to divide its mesh axes (MeshError)
    program.jitted.lower(*program.abstract_args).compile()
"""

from collections.abc import Callable
import copy
import dataclasses
import inspect

import gin
import jax
import jax.numpy as jnp

from rankrag_jax import rerank
from rankrag_jax import sharding
from rankrag_jax.model import attention
from rankrag_jax.model import axes
from rankrag_jax.model import llama
from rankrag_jax.model.config import LlamaConfig
from rankrag_jax.training import loop
from rankrag_jax.training import optimizer as optimizer_lib
from rankrag_jax.training import step as step_lib


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted function and abstract, sharded arguments: what gets lowered and compiled."""
  jitted: Callable  # has .lower(*abstract_args)
  abstract_args: tuple


@dataclasses.dataclass(frozen=True)
class Workload:
  """A program family: `build(config)` gives the program for a model config (so it can vary num_layers)."""
  name: str
  kind: str  # "train" | "score"
  config: LlamaConfig
  build: Callable[[LlamaConfig], Program]
  rows: int  # sequences (train) or passages (score) per call
  tokens_per_row: int
  model_flops: float  # per call, all chips
  model_flops_formula: str
  executed_flops: float  # what the compiled program should count: + remat recompute, full TxT attention, ...
  description: str


def _attention_flops(config: LlamaConfig, query_tokens: float, mean_keys: float) -> float:
  """Forward QK^T and AV FLOPs: 2 matmuls x 2 FLOPs x heads x head_dim per (query, key) pair, per layer."""
  return 4 * config.num_heads * config.head_dim * config.num_layers * query_tokens * mean_keys


def executed_train_flops(config: LlamaConfig, rows: int, seq_len: int, loss_positions: int) -> float:
  """Matmul FLOPs the compiled train step performs, as opposed to the 6·N·tokens + causal-attention convention.

  Differences: the LM head runs on `loss_positions` per row only; masked attention computes the full T x T square
  (forward, then 2x that backward); remat recomputes in the backward pass: 'full' the whole layer forward, 'dots'
  the attention matmuls (they have batch dimensions, which that policy does not save).
  """
  tokens = rows * seq_len
  head = config.hidden_size * config.vocab_size
  layers = config.flops_per_token(0, training=False) / 2 - head  # decoder-layer matmul params
  attention = _attention_flops(config, tokens, seq_len)
  recompute = {"none": 0.0, "dots": attention, "full": attention + 2 * layers * tokens}[config.remat_policy]
  return 6 * layers * tokens + 6 * head * rows * loss_positions + 3 * attention + recompute


_TRAIN_SETTINGS = ("model_config", "batch_size", "sequence_length", "num_micro_batches", "max_loss_positions",
                   "lora")


def stage2_train_settings() -> dict:
  """The `loop.train` arguments that shape the step, as the parsed Gin binds them (its defaults where unbound).

  Only these are evaluated, so run-only settings (INIT_CHECKPOINT, TOKENIZER_PATH, ...) may stay REQUIRED.
  """
  defaults = {name: p.default for name, p in inspect.signature(loop.train).parameters.items()}
  bound = gin.get_bindings(loop.train, resolve_references=False)
  # deepcopy is how Gin evaluates a binding's references and macros (gin.get_bindings does the same).
  return {name: copy.deepcopy(bound[name]) if name in bound else defaults[name] for name in _TRAIN_SETTINGS}


def stage2_train_workload(mesh, rules) -> Workload:
  """`training.step.jit_train_step` on abstract state and a packed [batch_size, sequence_length] batch.

  Built exactly as `loop.train` builds it: the model config, batch, sequence length, micro-batches and loss
  positions from its Gin bindings; the optimizer from `optimizer.make_optimizer(learning_rate_schedule())`.
  (`loop.train` takes the architecture from the init checkpoint; the presets carry the same numbers.)
  """
  settings = stage2_train_settings()
  config, batch_size, seq_len = settings["model_config"], settings["batch_size"], settings["sequence_length"]
  max_loss_positions, num_micro_batches = settings["max_loss_positions"], settings["num_micro_batches"]
  lora = settings["lora"]
  schedule = optimizer_lib.learning_rate_schedule()
  optimizer = optimizer_lib.make_optimizer(schedule)

  def build(config: LlamaConfig) -> Program:
    step_fn, _, data_shardings, abstract_state = step_lib.jit_train_step(
        config, optimizer, schedule, mesh, rules, max_loss_positions=max_loss_positions,
        num_micro_batches=num_micro_batches, lora=lora)
    batch = {key: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=data_shardings[key])
             for key in step_lib.BATCH_KEYS}
    sharding.check_divisible(batch, data_shardings, what="batch feature")
    return Program(step_fn, (abstract_state, batch))

  tokens = batch_size * seq_len
  loss_positions = min(max_loss_positions or seq_len, seq_len)
  model_flops = config.flops_per_token(seq_len, training=True) * tokens
  executed = executed_train_flops(config, batch_size, seq_len, loss_positions)
  formula, trained = "6·N·tokens + causal attention", "AdamW f32 moments"
  if lora is not None:
    # No weight gradients for the frozen base: forward + input gradients = 4·N per token, + 6 per adapter weight.
    adapters = lora_adapter_params(config, lora)
    matmul_weights = config.flops_per_token(0, training=False) / 2  # decoder layers + LM head
    head = config.hidden_size * config.vocab_size
    model_flops += (6 * adapters - 2 * matmul_weights) * tokens
    executed += (6 * adapters - 2 * (matmul_weights - head)) * tokens - 2 * head * batch_size * loss_positions
    formula = "4·N·tokens (frozen base) + 6·N_adapters·tokens + causal attention"
    trained = (f"LoRA r={lora.rank} on {'/'.join(lora.targets)} ({adapters / 1e6:.1f}M f32 adapter params, AdamW "
               "moments for them only)")
  return Workload(
      name="train_step", kind="train", config=config, build=build, rows=batch_size, tokens_per_row=seq_len,
      model_flops=model_flops, model_flops_formula=formula, executed_flops=executed,
      description=(f"Stage-II train step: {config.num_params / 1e9:.2f}B params in "
                   f"{jnp.dtype(config.param_dtype).name}, compute {jnp.dtype(config.dtype).name}, {trained}, "
                   f"remat={config.remat_policy}, scan_layers={config.scan_layers}, batch {batch_size} x "
                   f"{seq_len}, LM head on {loss_positions} positions/row, {num_micro_batches} micro-batch(es)"))


def lora_adapter_params(config: LlamaConfig, lora) -> int:
  """Adapter parameters of `lora` on `config` (shapes only: nothing allocated)."""
  from rankrag_jax.training import lora as lora_lib  # pylint: disable=g-import-not-at-top
  boxed = lora_lib.boxed_abstract_params(config, lora)
  return lora_lib.num_adapter_params(lora_lib.split_adapters(jax.tree.map(
      lambda x: x.value, boxed, is_leaf=lambda x: hasattr(x, "names")))[1])


@gin.configurable
def score_workload(mesh, rules, rows_per_data_shard: int = 64,
                   prefix_len: int = 64, suffix_len: int = 256) -> Workload:
  """`rerank.score_token_batch` in bf16: a shared-prefix KV cache (the system turn) + a batch of suffixes.

  Defaults: a 100-word passage + the ranking question and instructions is ~190 tokens (bucket 256); the ChatQA
  system turn ~50 (bucket 64). The batch is `rows_per_data_shard` x the mesh's data-parallel ways. The model is
  `loop.train`'s (Gin `MODEL_CONFIG`), in bf16 as served.
  """
  model_config = stage2_train_settings()["model_config"]
  config = dataclasses.replace(model_config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat_policy="none")
  data_ways = mesh.shape.get(axes.DATA, 1) * mesh.shape.get(axes.FSDP, 1)
  rows = rows_per_data_shard * data_ways
  row_sharding = sharding.data_sharding(mesh, rules, ndim=2)
  # The batch-1 prefix cache is replicated over the data axes (its kv heads still follow the tensor rule).
  cache_rules = ((axes.CACHE_BATCH, None),) + tuple(r for r in rules if r[0] != axes.CACHE_BATCH)
  replicated = sharding.replicated(mesh)

  def build(config: LlamaConfig) -> Program:
    config = attention.for_target(config, mesh)  # the slice's platform, not this host's
    param_shapes = jax.eval_shape(lambda: llama.init_params(config, jax.random.key(0)))
    param_shardings = sharding.logical_to_sharding(llama.param_logical_axes(config), mesh, rules)
    sharding.check_divisible(param_shapes, param_shardings)
    cache_shapes = jax.eval_shape(lambda: llama.init_cache(config, 1, prefix_len))
    cache_shardings = sharding.logical_to_sharding(llama.cache_logical_axes(), mesh, cache_rules)
    sharding.check_divisible(cache_shapes, cache_shardings, what="prefix cache")
    tokens = jax.ShapeDtypeStruct((rows, suffix_len), jnp.int32, sharding=row_sharding)
    sharding.check_divisible(tokens, row_sharding, what="token batch")
    abstract = lambda shapes, shardings: jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    args = (abstract(param_shapes, param_shardings), config, abstract(cache_shapes, cache_shardings),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), tokens,
            jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sharding.data_sharding(mesh, rules, ndim=1)),
            jax.ShapeDtypeStruct((2,), jnp.int32, sharding=replicated))
    return Program(jax.jit(rerank.score_token_batch, static_argnames=("config",)), args)

  n_matmul = config.flops_per_token(0, training=False) / 2  # matmul params, LM head included
  head = config.hidden_size * config.vocab_size
  model_flops = (2 * (n_matmul - head) * rows * suffix_len + 2 * head * rows
                 + _attention_flops(config, rows * suffix_len, prefix_len + suffix_len / 2))
  return Workload(
      name="score_passages", kind="score", config=config, build=build, rows=rows, tokens_per_row=suffix_len,
      model_flops=model_flops,
      model_flops_formula="2·N·suffix tokens + causal attention over prefix+suffix, LM head at 1 position/row",
      executed_flops=model_flops + _attention_flops(config, rows * suffix_len, suffix_len / 2),  # full square
      description=(f"P(\"True\") scoring kernel (rerank.score_token_batch), bf16: {rows} passages x {suffix_len} "
                   f"suffix tokens after a shared {prefix_len}-token prefix cache"))
