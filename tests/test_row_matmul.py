"""The few-row thread-pool product (row_matmul.cc through jax.ffi) against XLA's dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankrag_jax.model import row_matmul


def dense_dimension_numbers(lead_ndim: int, in_ndim: int):
  """How Flax's Dense / DenseGeneral contract activations [*lead, *in] with a kernel [*in, *out]."""
  return (tuple(range(lead_ndim, lead_ndim + in_ndim)), tuple(range(in_ndim))), ((), ())


@pytest.mark.parametrize("lead, k_in, n_out", [
    ((8, 1), (576,), (1536,)),  # a SmolLM2 decode step's gate projection
    ((3,), (64,), (24,)),  # fewer rows than a panel holds
    ((13, 1), (9, 64), (72,)),  # o_proj's two contracted axes; rows over two row groups
    ((2, 4), (64,), (3, 16)),  # k_proj's two output axes
    ((128,), (40,), (24,)),  # MAX_ROWS: still the kernel
    ((129,), (40,), (16,)),  # more rows: XLA's dot on the restored kernel
])
def test_panel_dot_general_equals_dot_general(lead, k_in, n_out):
  assert row_matmul.available()  # compiled with the host's compiler into the cache
  x = jax.random.normal(jax.random.key(0), lead + k_in)
  kernel = jax.random.normal(jax.random.key(1), k_in + n_out)
  numbers = dense_dimension_numbers(len(lead), len(k_in))
  want = jax.lax.dot_general(x, kernel, numbers)
  panels = row_matmul.to_panels(kernel, len(k_in))
  assert panels.shape == kernel.shape and not np.array_equal(panels, kernel)
  np.testing.assert_array_equal(row_matmul.from_panels(panels, len(k_in)), kernel)
  got = jax.jit(row_matmul.panel_dot_general, static_argnums=2)(x, panels, numbers)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_kernels_whose_outputs_are_not_whole_panels_are_refused():
  assert not row_matmul.can_panel((64, 12))
  with pytest.raises(ValueError, match=r"shape \(64, 12\) has 12 output features, not a multiple of 8"):
    row_matmul.to_panels(jnp.zeros((64, 12)))
  with pytest.raises(ValueError, match="a Dense contraction over the kernel's leading axes"):
    row_matmul.panel_dot_general(jnp.zeros((2, 8)), jnp.zeros((16, 8)), (((1,), (1,)), ((), ())))


def test_without_a_compiler_it_is_unavailable_and_says_why(tmp_path, monkeypatch):
  monkeypatch.setenv("RANKRAG_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler")
  warnings = []
  monkeypatch.setattr(row_matmul.logging, "warning", lambda msg, *args: warnings.append(msg % args))
  assert row_matmul.available.__wrapped__() is False
  assert len(warnings) == 1 and "no C++ compiler 'no-such-compiler'" in warnings[0]
  assert not list((tmp_path / "kernels").glob("*.so"))
