"""LoRA: low-rank adapters beside the frozen projections, computed inside each layer of the scan.

For a target projection y = x·W (W [in..., out...], e.g. q_proj [embed, heads, head_dim]) the adapted layer
computes
    y = x·W + (alpha / rank) · (dropout(x)·A)·B        A [in..., rank], B [rank, out...], B = 0 at the start
beside x·W, never W + s·A·B: merging the whole stack outside the layer scan would materialise a second full-size
copy of every target weight (and its full-size gradient); here the only weight gradients are A's and B's. For
Llama-3-70B with rank 16 on all seven projections that is 0.2 GB of adapters next to 141 GB of base weights.

How it hooks in, without touching `rankrag_jax/model/`: a Flax method interceptor (`nn.intercept_methods`) wraps
`__call__` of the Dense/DenseGeneral modules named in `LoraConfig.targets`. Inside that call the module's scope is
live, so the interceptor declares `lora_a` / `lora_b` as ordinary parameters of that module: `nn.scan` stacks them
on the `layers` axis like the kernels, and they carry logical axis names (A: the kernel's input axes, B: its
output axes, rank replicated), so the same Gin rules shard them. Parameter tree of an adapted target:
    layers/attn/q_proj/{kernel [L, embed, heads, head_dim], lora_a [L, embed, r], lora_b [L, r, heads, head_dim]}
`split_adapters` / `combine` move between that tree and (base params, adapters).

Why not Qwix (MaxText's LoRA, `qwix==0.1.8` on PyPI): it intercepts every `lax.dot_general` by module-path regex
and creates the adapters in the base weight's dtype (bf16 adapters and bf16 Adam moments for a bf16 base); its
dropout draws `make_rng('dropout')` inside our `nn.scan`, which splits only the "params" stream, so every layer
would get the same mask; and our projections go through custom dot_generals on CPU (token-flattened, panel
kernels) that the attention-dispatcher rewrite is changing. Intercepting the module call is independent of how
the product is computed, and the implementation is this file.

Dropout: an independent mask per layer needs a per-layer key inside the scan, and the scan splits only "params",
so the step puts a [L, 2] key array per target into the params it applies (`dropout_keys`); the scan slices it
like a weight. Without keys (evaluation, export) there is no dropout.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from rankrag_jax.model import axes

LORA_A, LORA_B, DROPOUT_KEY = "lora_a", "lora_b", "lora_dropout_key"
ADAPTER_LEAVES = (LORA_A, LORA_B)

# Target projection -> (its module's path in our params, the kernel's input axes, output axes) (docs/DESIGN.md).
TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "q_proj": (("layers", "attn", "q_proj"), (axes.EMBED,), (axes.HEADS, axes.HEAD_DIM)),
    "k_proj": (("layers", "attn", "k_proj"), (axes.EMBED,), (axes.KV_HEADS, axes.HEAD_DIM)),
    "v_proj": (("layers", "attn", "v_proj"), (axes.EMBED,), (axes.KV_HEADS, axes.HEAD_DIM)),
    "o_proj": (("layers", "attn", "o_proj"), (axes.HEADS, axes.HEAD_DIM), (axes.EMBED,)),
    "gate_proj": (("layers", "mlp", "gate_proj"), (axes.EMBED,), (axes.MLP,)),
    "up_proj": (("layers", "mlp", "up_proj"), (axes.EMBED,), (axes.MLP,)),
    "down_proj": (("layers", "mlp", "down_proj"), (axes.MLP,), (axes.EMBED,)),
}
ALL_TARGETS = tuple(TARGETS)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Gin: `loop.train.lora = @LoraConfig()`, `LoraConfig.rank = 16` (gin_configs/lora.gin).

  rank, alpha: the update is (alpha / rank)·A·B, as PEFT's `LoraConfig(r, lora_alpha)` (no rsLoRA).
  dropout: on the adapter's input only (PEFT's `lora_dropout`), while training.
  targets: which projections get adapters, of `ALL_TARGETS`.
  """
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ALL_TARGETS

  def __post_init__(self):
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or not self.targets:
      raise ValueError(f"LoraConfig.targets: {unknown or 'empty'}; choose from {list(ALL_TARGETS)}")
    # One canonical order, so configs read back from lora.json / adapter_config.json compare equal.
    object.__setattr__(self, "targets", tuple(t for t in ALL_TARGETS if t in self.targets))
    if self.rank < 1:
      raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank


def _a_init(fan_in: int):
  """PEFT's default for A (kaiming-uniform with a = sqrt(5)): uniform in +-1/sqrt(fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def _add_adapter(lora: LoraConfig, next_fun, args, kwargs, context):
  """The interceptor: x·W from the module itself, plus the low-rank term for targeted projections."""
  module = context.module
  y = next_fun(*args, **kwargs)
  if (context.method_name != "__call__" or module.name not in lora.targets
      or not isinstance(module, (nn.Dense, nn.DenseGeneral))):
    return y
  _, in_axes, out_axes = TARGETS[module.name]
  x = args[0]
  n_in, n_out = len(in_axes), len(out_axes)
  in_shape, out_shape = x.shape[x.ndim - n_in:], y.shape[y.ndim - n_out:]
  # f32 adapters whatever the base's dtype: their Adam moments and small updates stay exact.
  a = module.param(LORA_A, nn.with_logical_partitioning(_a_init(math.prod(in_shape)), in_axes + (None,)),
                   in_shape + (lora.rank,), jnp.float32)
  b = module.param(LORA_B, nn.with_logical_partitioning(nn.initializers.zeros, (None,) + out_axes),
                   (lora.rank,) + out_shape, jnp.float32)
  if lora.dropout and module.has_variable("params", DROPOUT_KEY):
    key = jax.random.wrap_key_data(module.get_variable("params", DROPOUT_KEY))
    keep = jax.random.bernoulli(key, 1.0 - lora.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - lora.dropout), 0.0).astype(x.dtype)
  dtype = module.dtype or x.dtype
  x_dims = tuple(range(x.ndim - n_in, x.ndim))
  xa = jax.lax.dot_general(x.astype(dtype), a.astype(dtype), ((x_dims, tuple(range(n_in))), ((), ())))
  delta = jax.lax.dot_general(xa * jnp.asarray(lora.scaling, dtype), b.astype(dtype),
                              (((xa.ndim - 1,), (0,)), ((), ())))
  return y + delta.astype(y.dtype)


def intercept(lora: LoraConfig):
  """Context manager: inside it, every Llama apply/init adds the adapters of `lora`."""
  return nn.intercept_methods(functools.partial(_add_adapter, lora))


def _filter(tree: dict, keep) -> dict:
  """The nested dict restricted to leaves whose last key satisfies `keep`; empty dicts dropped."""
  out = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      sub = _filter(value, keep)
      if sub:
        out[name] = sub
    elif keep(name):
      out[name] = value
  return out


def split_adapters(params: dict) -> tuple[dict, dict]:
  """(base params: the Llama tree, adapters: only the lora_a / lora_b leaves, same nesting)."""
  return (_filter(params, lambda name: name not in ADAPTER_LEAVES),
          _filter(params, lambda name: name in ADAPTER_LEAVES))


def combine(*trees: dict) -> dict:
  """Nested dicts merged (the base, adapters, dropout keys): what an intercepted apply reads."""
  out: dict = {}
  for tree in trees:
    for name, value in tree.items():
      out[name] = combine(out[name], value) if isinstance(value, dict) and name in out else value
  return out


def boxed_abstract_params(config, lora: LoraConfig) -> dict:
  """Llama's parameters plus the adapters, as boxed ShapeDtypeStructs (they carry the logical names)."""
  from rankrag_jax.model.llama import Llama  # local: this module's tree helpers are used without the model too
  with intercept(lora):
    boxed = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return boxed["params"]


def init_adapters(adapter_shapes: dict, seed: int, shardings=None) -> dict:
  """Fresh adapters (A random, B zero) of `adapter_shapes` (ShapeDtypeStructs), created in their shards."""
  def make(key):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapter_shapes)
    keys = jax.random.split(key, len(leaves))
    values = []
    for (path, shape), k in zip(leaves, keys):
      if path[-1].key == LORA_B:
        values.append(jnp.zeros(shape.shape, shape.dtype))
      else:  # A [L, in..., r]: fan-in is the product of the input axes
        values.append(_a_init(math.prod(shape.shape[1:-1]))(k, shape.shape, shape.dtype))
    return jax.tree.unflatten(treedef, values)
  return jax.jit(make, out_shardings=shardings)(jax.random.fold_in(jax.random.key(seed), 0x10a))


def dropout_keys(key: jax.Array, lora: LoraConfig, num_layers: int) -> dict:
  """A [L, 2] uint32 key per target: the scan hands layer l row l, so each layer and projection draws its own mask."""
  if not lora.dropout:
    return {}
  keys = jax.random.key_data(jax.random.split(key, (len(lora.targets), num_layers)))
  out: dict = {}
  for target, target_keys in zip(lora.targets, keys):
    path = TARGETS[target][0]
    out = combine(out, nest(path, {DROPOUT_KEY: target_keys.astype(jnp.uint32)}))
  return out


def subtree(tree: dict, path: tuple[str, ...]):
  for name in path:
    tree = tree[name]
  return tree


def nest(path: tuple[str, ...], leaf) -> dict:
  """{path[0]: {path[1]: ... leaf}}."""
  for name in reversed(path):
    leaf = {name: leaf}
  return leaf


def delta_kernel(adapters: dict, lora: LoraConfig, target: str, xp=np):
  """(alpha/r)·A·B for every layer, in the kernel's shape [L, in..., out...] (f32)."""
  module = subtree(adapters, TARGETS[target][0])
  a, b = xp.asarray(module[LORA_A], xp.float32), xp.asarray(module[LORA_B], xp.float32)
  n_layers, rank = a.shape[0], a.shape[-1]
  flat = xp.matmul(a.reshape(n_layers, -1, rank), b.reshape(n_layers, rank, -1)) * lora.scaling
  return flat.reshape(a.shape[:-1] + b.shape[2:])


def merge_adapters(params: dict, adapters: dict, lora: LoraConfig, xp=np) -> dict:
  """Base params with W + (alpha/r)·A·B in every target kernel, in the base's dtype (inference, HF export).

  A full-size copy of the targeted weights: for serving and export, never inside the training step."""
  merged = jax.tree.map(lambda x: x, params)  # new dicts; unchanged leaves shared
  for target in lora.targets:
    module = subtree(merged, TARGETS[target][0])
    kernel = module["kernel"]
    module["kernel"] = (xp.asarray(kernel, xp.float32) + delta_kernel(adapters, lora, target, xp)).astype(kernel.dtype)
  return merged


def num_adapter_params(adapters: dict) -> int:
  return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(adapters))


class AdaptedModel:
  """A Llama whose `apply({"params": adapters}, ...)` runs the model on base ∪ adapters (∪ dropout keys) with the
  interceptor on: what `loss.loss_sums` and `step.train_step` call, so their gradient is the adapters' only."""

  def __init__(self, model, lora: LoraConfig, base: dict, keys: dict | None = None):
    self.model, self.lora, self.base, self.keys = model, lora, base, keys or {}

  def apply(self, variables: dict, *args, **kwargs):
    params = combine(self.base, variables["params"], self.keys)
    with intercept(self.lora):
      return self.model.apply({"params": params}, *args, **kwargs)
