"""XLA:CPU options for the jitted programs (`backends.compiler_options("cpu")`).

XLA's own (Eigen) dots instead of the YNNPACK library fusion XLA:CPU picks by default: decode's [batch, d] x [d, f]
products run ~1.7x faster, prefills ~5%, and training steps with `ops.block_attention` ~4% (its batched products run
at ~half speed in YNNPACK; A/B in bench/README.md, session 10).
"""

CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
