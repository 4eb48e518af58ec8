"""`python -m rankrag_jax.convert --input X --output_hf DIR`: any checkpoint load_model reads -> HF directory.

    python -m rankrag_jax.convert --input smollm2_135m_instruct --output_hf /tmp/smollm2_hf
    python -m rankrag_jax.convert --input model.gguf --output_hf out/ --dtype bfloat16 --max_shard_size 2GB
"""

import sys

from absl import app
from absl import flags

from rankrag_jax import tokenizer as tokenizer_lib
from rankrag_jax.convert import hf
from rankrag_jax.convert import hf_config
from rankrag_jax.convert.load import load_model

_INPUT = flags.DEFINE_string("input", None, "A .gguf file, an HF directory, or a model asset name.", required=True)
_OUTPUT_HF = flags.DEFINE_string("output_hf", None, "Directory to write the HF checkpoint into.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Stored precision.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", hf.DEFAULT_MAX_SHARD_SIZE,
                                      "Largest safetensors shard, e.g. 5GB or 500MB.")


def main(argv):
  del argv
  try:
    config, params, tokenizer = load_model(_INPUT.value)
    written = hf.save_hf_checkpoint(_OUTPUT_HF.value, config, params, tokenizer=tokenizer,
                                    max_shard_size=_MAX_SHARD_SIZE.value, dtype=_DTYPE.value)
  except (hf_config.CheckpointError, tokenizer_lib.TokenizerError) as e:  # the message names the file; no traceback.
    sys.exit(f"error: {e}")
  print(f"{_INPUT.value} -> {_OUTPUT_HF.value} ({config.num_layers} layers, vocab {config.vocab_size}, "
        f"{'tied' if config.tie_word_embeddings else 'untied'} embeddings, {_DTYPE.value})")
  for path in written:
    print(f"  wrote {path} ({path.stat().st_size:,} bytes)")
  if tokenizer is None:
    print("  (no tokenizer found next to the input; none written)")


if __name__ == "__main__":
  app.run(main)
