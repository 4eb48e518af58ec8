"""Platform-specific attention kernels and compiler settings, beside the model (which names no backend): `cpu/`
(C++ kernels through jax.ffi, the CPU decode weights), and, where present, `tpu/` (Pallas splash attention) and
`gpu/` (Pallas flash attention). `model/attention.py` picks among them."""


def compiler_options(platform: str) -> dict | None:
  """XLA options for the jitted programs (training steps, scoring, generation) compiled for `platform`."""
  if platform != "cpu":
    return None
  from rankrag_jax.backends.cpu import xla_options  # pylint: disable=import-outside-toplevel
  return dict(xla_options.CPU_COMPILER_OPTIONS)
