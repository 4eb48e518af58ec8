"""Checkpoints in and out: HF safetensors (both ways), GGUF (in), and `load_model` dispatching between them."""

from rankrag_jax.convert.gguf import load_gguf
from rankrag_jax.convert.hf import load_hf_checkpoint, save_hf_checkpoint
from rankrag_jax.convert.hf_config import CheckpointError, config_from_hf, config_to_hf
from rankrag_jax.convert.load import load_model

__all__ = ["CheckpointError", "config_from_hf", "config_to_hf", "load_gguf", "load_hf_checkpoint", "load_model",
           "save_hf_checkpoint"]
