"""Shared test setup: CPU-only JAX, f32 matmuls at full precision, and the real assets from the cache."""
import functools
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def make_tiny_rag_model():
  """`make(window)`: a random tiny Llama over SmolLM2's real tokenizer (built once per window): fast, and every
  stage of the pipeline runs on it."""
  from rankrag_jax import assets, rag  # pylint: disable=g-import-not-at-top
  from rankrag_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from rankrag_jax.model import config as config_lib, llama  # pylint: disable=g-import-not-at-top

  @functools.cache
  def make(max_position_embeddings: int = 256) -> "rag.RagModel":
    tok = tokenizer_lib.load_tokenizer(assets.asset_file("smollm2_135m_instruct"))
    config = config_lib.tiny(vocab_size=tok.vocab_size, max_position_embeddings=max_position_embeddings)
    params = jax.jit(functools.partial(llama.init_params, config))(jax.random.key(0))
    return rag.RagModel(config, params, tok)
  return make


def sharpen_attention(params: dict, qk_scale: float, vo_scale: float) -> dict:
  """params with the q/k kernels scaled by qk_scale and v/o by vo_scale: the random init's attention is nearly
  uniform (logits ~0.07) and its output tiny against the residual, so positions and content barely move the
  logits; scaled, attention is peaked and decides them (tests/test_attention.py, test_rerank.py, test_generate.py
  show a wrong position or mask then fails)."""
  attn = dict(params["layers"]["attn"])
  for name, scale in (("q_proj", qk_scale), ("k_proj", qk_scale), ("v_proj", vo_scale), ("o_proj", vo_scale)):
    attn[name] = {"kernel": attn[name]["kernel"] * scale}
  return {**params, "layers": {**params["layers"], "attn": attn}}


# The scales of `sharp_tiny_model`.
SHARP_QK, SHARP_VO = 12.0, 12.0


@pytest.fixture(scope="session")
def sharp_tiny_model():
  """(config, params): the tiny Llama with `sharpen_attention`: attention that reacts to position and content."""
  from rankrag_jax.model import config as config_lib, llama  # pylint: disable=g-import-not-at-top
  config = config_lib.tiny()
  params = jax.jit(functools.partial(llama.init_params, config))(jax.random.key(0))
  return config, jax.jit(sharpen_attention, static_argnums=(1, 2))(params, SHARP_QK, SHARP_VO)
