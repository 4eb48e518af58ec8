"""The train state, its shardings, and the jitted train/eval steps (jit + NamedSharding: what pjit is today).

The state is a plain dict pytree, so Orbax saves and restores it without custom handlers:
    {"step": int32[], "params": {...}, "opt_state": optax state, "rng": uint32[2] (raw key data)}
Every array's sharding comes from the model's logical axis names through the Gin rules (`sharding.py`); the
optimizer state inherits its parameter's sharding (Adam moments are sharded exactly like the weights, ZeRO-3 style).
"""

import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import optax

from rankrag_jax import backends
from rankrag_jax import sharding as sharding_lib
from rankrag_jax.model import attention
from rankrag_jax.model import axes
from rankrag_jax.model.config import LlamaConfig
from rankrag_jax.model.llama import Llama
from rankrag_jax.training import lora as lora_lib
from rankrag_jax.training import loss as loss_lib

BATCH_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids", "decoder_positions",
              "decoder_loss_weights")


def _boxed_abstract_params(config: LlamaConfig):
  """ShapeDtypeStructs of the parameters, still boxed in nn.Partitioned (they carry the logical names)."""
  boxed = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return boxed["params"]


def abstract_train_state(config: LlamaConfig, optimizer: optax.GradientTransformation) -> tuple[dict, dict]:
  """(state of ShapeDtypeStructs, state of logical PartitionSpecs), with no array allocated.

  optax maps its moments over the boxed parameters, so each moment keeps its parameter's logical names;
  scalars (counts) come out unboxed and are replicated.
  """
  boxed_params = _boxed_abstract_params(config)
  boxed_opt_state = jax.eval_shape(optimizer.init, boxed_params)
  boxed_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": boxed_params,
                 "opt_state": boxed_opt_state, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  return nn.unbox(boxed_state), nn.get_partition_spec(boxed_state)


def train_state_shardings(config: LlamaConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                          rules, lora=None) -> tuple[dict, dict]:
  """(abstract state with .sharding set, NamedSharding pytree), after checking every dimension divides.

  lora: a `lora.LoraConfig`: the LoRA state instead (frozen params + adapters; `lora_step.abstract_train_state`)."""
  if lora is None:
    abstract, logical = abstract_train_state(config, optimizer)
  else:
    from rankrag_jax.training import lora_step  # local: lora_step builds on this module
    abstract, logical = lora_step.abstract_train_state(config, lora, optimizer)
  # Leaf by leaf: optax states hold empty NamedTuples (EmptyState) that must stay pytree nodes, not leaves.
  sharding_lib.validate_rules(mesh, rules)
  shardings = jax.tree.map(lambda spec: sharding_lib.logical_to_sharding(spec, mesh, rules), logical,
                           is_leaf=lambda x: isinstance(x, PartitionSpec))
  sharding_lib.check_divisible(abstract, shardings)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def batch_shardings(mesh: Mesh, rules) -> dict:
  return {key: sharding_lib.data_sharding(mesh, rules, ndim=2) for key in BATCH_KEYS}


def num_data_shards(mesh: Mesh, rules) -> int:
  """How many blocks of rows a batch is split into on `mesh` (the sizes of the mesh axes its batch axis maps to)."""
  names = sharding_lib.data_sharding(mesh, rules, ndim=2).spec[0]
  names = () if names is None else (names,) if isinstance(names, str) else names
  return math.prod(mesh.shape[name] for name in names)


def new_train_state(params: dict, optimizer: optax.GradientTransformation, seed: int) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
          "rng": jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)}


def _micro_batches(batch: dict, num_micro_batches: int) -> dict:
  """[B, T] -> [A, B/A, T], micro-batch a = rows a, A + a, 2A + a, ... so each data shard's rows stay local."""
  def split(x):
    b = x.shape[0]
    if b % num_micro_batches:
      raise ValueError(f"batch size {b} is not divisible by num_micro_batches={num_micro_batches}")
    x = jnp.swapaxes(x.reshape((b // num_micro_batches, num_micro_batches) + x.shape[1:]), 0, 1)
    return nn.with_logical_constraint(x, (None, axes.BATCH, axes.LENGTH))
  return jax.tree.map(split, batch)


def _summed_loss(params, batch, *, model, max_loss_positions, num_tokens, num_shards):
  sums = loss_lib.loss_sums(params, batch, model=model, max_loss_positions=max_loss_positions,
                            num_tokens=num_tokens, num_shards=num_shards)
  return sums[loss_lib.LOSS_SUM], sums


def _summed_grads(params, batch, *, model, max_loss_positions, num_micro_batches, num_tokens, num_shards):
  """Gradient of the summed loss and the summed metrics, over micro-batches with a scan when A > 1."""
  grad_fn = jax.grad(functools.partial(_summed_loss, model=model, max_loss_positions=max_loss_positions,
                                       num_tokens=num_tokens, num_shards=num_shards), has_aux=True)
  if num_micro_batches == 1:
    return grad_fn(params, batch)

  def body(carry, micro_batch):
    grads, sums = grad_fn(params, micro_batch)
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  zeros = (jax.tree.map(jnp.zeros_like, params), loss_lib.zero_sums())
  (grads, sums), _ = jax.lax.scan(body, zeros, _micro_batches(batch, num_micro_batches))
  return grads, sums


def train_step(state: dict, batch: dict, *, model: Llama, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, max_loss_positions: int | None = None,
               num_micro_batches: int = 1, num_tokens: int | None = None, num_shards: int = 1,
               lora=None) -> tuple[dict, dict]:
  """One optimizer update on the mean answer-token loss of `batch` (all micro-batches). Pure function.

  num_tokens: None, or the real tokens per (micro-batch, data shard) the model's per-token work runs on
  (`token_layout.tokens_needed` rounded up to a bucket; static). num_shards: the batch's data shards.
  lora: a `lora.LoraConfig`: update only the adapters of a LoRA state (`lora_step.train_step`).
  """
  if lora is not None:
    from rankrag_jax.training import lora_step  # local: lora_step builds on this module
    return lora_step.train_step(state, batch, model=model, lora=lora, optimizer=optimizer, schedule=schedule,
                                max_loss_positions=max_loss_positions, num_micro_batches=num_micro_batches,
                                num_tokens=num_tokens, num_shards=num_shards)
  grads, sums = _summed_grads(state["params"], batch, model=model, max_loss_positions=max_loss_positions,
                              num_micro_batches=num_micro_batches, num_tokens=num_tokens, num_shards=num_shards)
  denominator = jnp.maximum(sums[loss_lib.WEIGHT_SUM], 1e-8)
  grads = jax.tree.map(lambda g: g / denominator, grads)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
  metrics = {"loss": sums[loss_lib.LOSS_SUM] / denominator,
             "accuracy": sums[loss_lib.CORRECT_SUM] / denominator,
             "grad_norm": optax.global_norm(grads),
             "learning_rate": jnp.asarray(schedule(state["step"]), jnp.float32),
             "loss_tokens": sums[loss_lib.WEIGHT_SUM],
             loss_lib.DROPPED: sums[loss_lib.DROPPED]}
  new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}
  return new_state, metrics


def eval_step(params: dict, batch: dict, *, model: Llama, max_loss_positions: int | None = None,
              lora=None) -> dict:
  """Summed loss/weight/correct over `batch`, to be combined over eval batches by the caller.

  lora: a `lora.LoraConfig`; params are then the base and adapters in one tree (`lora.combine`)."""
  if lora is not None:
    model = lora_lib.AdaptedModel(model, lora, base={})
  return loss_lib.loss_sums(params, batch, model=model, max_loss_positions=max_loss_positions)


def jit_train_step(config: LlamaConfig, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                   mesh: Mesh, rules, *, max_loss_positions: int | None = None, num_micro_batches: int = 1,
                   lora=None):
  """train_step jitted with explicit in/out shardings and the state donated (updated in place); attention as
  `config.attention_impl` resolves for the mesh's platform (`model/attention.py`).

  lora: a `lora.LoraConfig`: the LoRA state and step (only the adapters trained; `training/lora_step.py`).

  Returns (step_fn, state_shardings, batch_shardings, abstract_state). Call step_fn(state, batch) under
  `sharding_context(mesh, rules)` (the model's activation constraints read the rules at trace time), or
  step_fn(state, batch, num_tokens, loss_positions) with a `bucketing.StepShape`'s static sizes (one compiled step
  per distinct shape; loss_positions <= max_loss_positions).
  """
  abstract, state_shardings = train_state_shardings(config, optimizer, mesh, rules, lora)
  data_shardings = batch_shardings(mesh, rules)
  step = functools.partial(train_step, model=_model(config, mesh), optimizer=optimizer, schedule=schedule,
                           num_micro_batches=num_micro_batches, num_shards=num_data_shards(mesh, rules))
  if lora is not None:
    step = functools.partial(step, lora=lora)

  def fn(state, batch, num_tokens=None, loss_positions=None):  # positional: jit with in_shardings takes no kwargs
    return step(state, batch, num_tokens=num_tokens,
                max_loss_positions=max_loss_positions if loss_positions is None else loss_positions)

  step_fn = jax.jit(fn, in_shardings=(state_shardings, data_shardings),
                    out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,),
                    static_argnums=(2, 3), compiler_options=_compiler_options(mesh))
  return step_fn, state_shardings, data_shardings, abstract


def jit_eval_step(config: LlamaConfig, mesh: Mesh, rules, param_shardings, *,
                  max_loss_positions: int | None = None, lora=None):
  fn = functools.partial(eval_step, model=_model(config, mesh),
                         max_loss_positions=max_loss_positions)
  if lora is not None:  # param_shardings: of the base and adapters in one tree
    fn = functools.partial(fn, lora=lora)
  return jax.jit(fn, in_shardings=(param_shardings, batch_shardings(mesh, rules)),
                 out_shardings=NamedSharding(mesh, PartitionSpec()), compiler_options=_compiler_options(mesh))


def _model(config: LlamaConfig, mesh: Mesh) -> Llama:
  return Llama(attention.for_target(config, mesh))


def _compiler_options(mesh: Mesh) -> dict | None:
  return backends.compiler_options(attention.target_platform(mesh))


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules):
  """Sets the mesh and Flax's logical axis rules, which the model's activation constraints read at trace time."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
