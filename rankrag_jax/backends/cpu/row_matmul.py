"""Few-row f32 products on XLA:CPU's thread pool, for decode steps: `panel_dot_general` over kernels stored in
8-column panels (`to_panels`).

Why: XLA:CPU computes a decode step's [rows, d] x [d, f] products on one thread, streaming the weights at about
half of what the machine reads; they are most of a step (bench/README.md, session 15). `row_matmul.cc` splits
each product's columns over the intra-op thread pool and reads each thread's weights as one contiguous stream.

The kernel is C++ registered through `jax.ffi` (built by `build.py`); without it (`build.available()`
False: no compiler), `panel_dot_general` runs XLA's dot on the restored kernel.
"""

import math

import jax
import jax.numpy as jnp

from rankrag_jax.backends.cpu import build

Array = jax.Array

# Columns per panel (one 256-bit vector of f32); a panelled kernel's output features must be a multiple of it.
PANEL = 8
# Products with more rows than this run as XLA dots on the restored [K, N] kernel: with many rows Eigen's blocked
# GEMM is faster (so `generate` runs prompts on [K, N] copies). Up to it the kernel is faster than that dot plus
# restoring the kernel (SmolLM2's [576, 1536] at 128 rows: 2.9 vs 4.3 ms; bench/README.md, session 15).
MAX_ROWS = 128


def _split(kernel_shape: tuple[int, ...], contract_ndim: int) -> tuple[int, int]:
  return math.prod(kernel_shape[:contract_ndim]), math.prod(kernel_shape[contract_ndim:])


def can_panel(kernel_shape: tuple[int, ...], contract_ndim: int = 1) -> bool:
  return _split(kernel_shape, contract_ndim)[1] % PANEL == 0


def _panel_split(kernel_shape: tuple[int, ...], contract_ndim: int) -> tuple[int, int]:
  k, n = _split(kernel_shape, contract_ndim)
  if n % PANEL:
    raise ValueError(f"row_matmul: a kernel of shape {kernel_shape} has {n} output features, not a multiple of "
                     f"{PANEL}")
  return k, n


def to_panels(kernel: Array, contract_ndim: int = 1) -> Array:
  """A Dense kernel [*in, *out] (contracted over its first `contract_ndim` axes: K inputs, N outputs) with its
  elements in panel order, [N / 8, K, 8], viewed in the kernel's own shape (so Flax modules accept it)."""
  k, n = _panel_split(kernel.shape, contract_ndim)
  return kernel.reshape(k, n // PANEL, PANEL).transpose(1, 0, 2).reshape(kernel.shape)


def from_panels(kernel: Array, contract_ndim: int = 1) -> Array:
  """The inverse of `to_panels`."""
  k, n = _panel_split(kernel.shape, contract_ndim)
  return kernel.reshape(n // PANEL, k, PANEL).transpose(1, 0, 2).reshape(kernel.shape)


def panel_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> Array:
  """`lax.dot_general` (as Flax's Dense and DenseGeneral call it) of activations [..., *in] with a kernel from
  `to_panels`: the thread-pool kernel for up to MAX_ROWS f32 rows, an XLA dot on the restored kernel otherwise."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  n_in = len(rhs_contract)
  if lhs_batch or rhs_batch or tuple(rhs_contract) != tuple(range(n_in)) or \
     tuple(lhs_contract) != tuple(range(lhs.ndim - n_in, lhs.ndim)):
    raise ValueError(f"panel_dot_general: expected a Dense contraction over the kernel's leading axes, got "
                     f"{dimension_numbers}")
  k, n = _panel_split(rhs.shape, n_in)
  lead, features = lhs.shape[:lhs.ndim - n_in], rhs.shape[n_in:]
  rows = math.prod(lead)
  x = lhs.reshape(rows, k)
  if rows <= MAX_ROWS and lhs.dtype == rhs.dtype == jnp.float32 and build.available():
    out = jax.ffi.ffi_call(build.ROW_MATMUL, jax.ShapeDtypeStruct((rows, n), jnp.float32))(
        x, rhs.reshape(n // PANEL, k, PANEL))
  else:
    out = jnp.matmul(x, from_panels(rhs, n_in).reshape(k, n), precision=precision,
                     preferred_element_type=preferred_element_type)
  return out.reshape(lead + features)
