"""Retrieval: corpus reading, BM25 (bm25s), the Flax MiniLM encoder against transformers, and faiss search.

Real data: SQuAD-2.0 paragraphs and their questions (OpenAI evals' unsolvable_questions set); real weights:
all-MiniLM-L6-v2. Both come from the asset cache.
"""
import json

import numpy as np
import pytest

from rankrag_jax import assets
from rankrag_jax.data import blend, sources
from rankrag_jax.retrieval import bert
from rankrag_jax.retrieval import bm25
from rankrag_jax.retrieval import corpus as corpus_lib
from rankrag_jax.retrieval import dense

NUM_PARAGRAPHS = 200
NUM_DENSE_PARAGRAPHS = 48  # dense tests embed fewer paragraphs: 2 shared CPU cores.


def _paragraph_id(row: int) -> str:
  return f"squad2/p{row:04d}"


@pytest.fixture(scope="module")
def squad_corpus_and_questions():
  """The first 200 distinct SQuAD-2.0 paragraphs of evals' unsolvable_questions as a Corpus, and (question,
  paragraph id) pairs for them: every question there, answerable or not, was written about its paragraph."""
  rows = sources.read_unsolvable(assets.asset_file("evals_data") / blend.EVALS_FILES["squad2"])
  row_of_paragraph, questions = {}, []
  for row in rows:
    if row["passage"] not in row_of_paragraph:
      if len(row_of_paragraph) == NUM_PARAGRAPHS:
        continue
      row_of_paragraph[row["passage"]] = len(row_of_paragraph)
    questions.append((row["question"], _paragraph_id(row_of_paragraph[row["passage"]])))
  paragraphs = list(row_of_paragraph)
  corpus = corpus_lib.Corpus(ids=tuple(_paragraph_id(i) for i in range(len(paragraphs))),
                             titles=("",) * len(paragraphs), texts=tuple(paragraphs))
  return corpus, questions


@pytest.fixture(scope="module")
def minilm():
  return bert.load_sentence_encoder()


# --- corpus ----------------------------------------------------------------------------------------------

def test_read_corpus_jsonl_reads_columns_and_skips_blank_lines(tmp_path):
  path = tmp_path / "corpus.jsonl"
  path.write_text('{"id": "a", "title": "Oxygen", "text": "O2 is dioxygen."}\n\n'
                  '{"id": 7, "title": "", "text": "No title here."}\n')
  corpus = corpus_lib.read_corpus_jsonl(path)
  assert corpus.ids == ("a", "7") and corpus.titles == ("Oxygen", "") and len(corpus) == 2
  assert corpus.passages() == ["Oxygen\nO2 is dioxygen.", "No title here."]
  assert corpus.passages_by_id(["7", "a"]) == ["No title here.", "Oxygen\nO2 is dioxygen."]
  corpus_lib.write_corpus_jsonl(corpus, tmp_path / "again.jsonl")
  assert corpus_lib.read_corpus_jsonl(tmp_path / "again.jsonl") == corpus


def test_beir_and_flashrag_corpus_rows_read(tmp_path):
  path = tmp_path / "mixed.jsonl"
  path.write_text('{"_id": "beir1", "title": "T", "text": "body one"}\n'
                  '{"id": 7, "contents": "\\"Ada Lovelace\\"\\nwrote the notes"}\n'
                  '{"id": "8", "contents": "no title here"}\n{"id": "9", "text": "no title field"}\n')
  corpus = corpus_lib.read_corpus_jsonl(path)
  assert corpus.ids == ("beir1", "7", "8", "9")
  assert corpus.titles == ("T", "Ada Lovelace", "", "")
  assert corpus.texts == ("body one", "wrote the notes", "no title here", "no title field")


@pytest.mark.parametrize("bad_line, field", [
    ('{"id": "b", "contents": 3}', "'contents' must be a string"),
    ('{"id": "b", "title": "", "text": "unterminated', "not valid JSON"),
    ('{"id": "b", "title": ""}', "'text'"),
    ('{"title": "", "text": "x"}', "'id'"),
    ('{"id": "b", "title": "", "text": "   "}', "'text' is empty"),
    ('{"id": "b", "title": null, "text": "x"}', "'title'"),
    ('["b", "", "x"]', "expected a JSON object"),
    ('{"id": "a", "title": "", "text": "again"}', "duplicate id 'a'"),
])
def test_bad_corpus_rows_name_file_line_and_field(tmp_path, bad_line, field):
  path = tmp_path / "corpus.jsonl"
  path.write_text('{"id": "a", "title": "", "text": "fine"}\n\n' + bad_line + "\n")
  with pytest.raises(corpus_lib.CorpusError) as error:
    corpus_lib.read_corpus_jsonl(path)
  assert f"{path}:3" in str(error.value) and field in str(error.value)


def test_empty_corpus_is_a_clear_error(tmp_path):
  path = tmp_path / "empty.jsonl"
  path.write_text("\n  \n")
  with pytest.raises(corpus_lib.CorpusError, match="corpus is empty"):
    corpus_lib.read_corpus_jsonl(path)
  with pytest.raises(corpus_lib.CorpusError, match="corpus is empty"):
    corpus_lib.corpus_from_rows([])


# --- BM25 ------------------------------------------------------------------------------------------------

def test_bm25_finds_the_paragraph_of_squad_questions(squad_corpus_and_questions):
  corpus, questions = squad_corpus_and_questions
  index = bm25.build_bm25_index(corpus)
  queries, gold = zip(*questions[:200])
  ids, scores = bm25.search_bm25(index, queries, k=5)
  assert len(queries) == 200 and ids.shape == scores.shape == (200, 5)
  assert np.all(np.diff(scores, axis=1) <= 0), "results must be best first"
  recall_at_5 = np.mean([g in row for g, row in zip(gold, ids)])
  print(f"bm25: question recall@5 {recall_at_5:.3f} over {len(queries)} questions")
  # SQuAD questions were written looking at their paragraph: they share its content words.
  assert recall_at_5 >= 0.85, recall_at_5
  # A sentence copied from a paragraph finds that paragraph first.
  copied = corpus.texts[17].split(". ")[1]
  top_ids, _ = bm25.search_bm25(index, [copied], k=1)
  assert top_ids[0, 0] == corpus.ids[17]


def test_bm25_save_load_round_trip_is_identical(squad_corpus_and_questions, tmp_path):
  corpus, questions = squad_corpus_and_questions
  index = bm25.build_bm25_index(corpus)
  bm25.save_bm25_index(index, tmp_path / "bm25")
  # Only JSON and pickle-free .npy on disk.
  assert {p.suffix for p in (tmp_path / "bm25").iterdir()} <= {".json", ".npy"}
  loaded = bm25.load_bm25_index(tmp_path / "bm25")
  queries = [q for q, _ in questions[:50]] + ["the of and", "zyxwvut"]  # stopwords only; unknown word.
  ids, scores = bm25.search_bm25(index, queries, k=10)
  loaded_ids, loaded_scores = bm25.search_bm25(loaded, queries, k=10)
  np.testing.assert_array_equal(ids[:50], loaded_ids[:50])
  np.testing.assert_array_equal(scores, loaded_scores)
  assert np.all(scores[50:] == 0)  # queries with no indexed word match nothing.
  assert bm25.search_bm25(loaded, queries[:1], k=10_000)[0].shape == (1, len(corpus))  # k clipped.


@pytest.mark.parametrize("kind", ["bm25", "dense"])
@pytest.mark.parametrize("damage, message", [
    ("no_meta", "is not a"), ("bad_json", "not valid JSON"), ("old_version", "unsupported format_version 0"),
    ("no_ids", "missing field(s) 'doc_ids'")])
def test_damaged_index_meta_fails_naming_the_file(squad_corpus_and_questions, tmp_path, kind, damage, message):
  corpus, _ = squad_corpus_and_questions
  directory = tmp_path / kind
  if kind == "bm25":
    save, load, meta_file = bm25.save_bm25_index, bm25.load_bm25_index, bm25.META_FILE
    save(bm25.build_bm25_index(corpus), directory)
  else:
    save, load, meta_file = dense.save_dense_index, dense.load_dense_index, dense.META_FILE
    embeddings = np.random.default_rng(0).normal(size=(len(corpus), 8)).astype(np.float32)
    save(dense.build_dense_index(embeddings, corpus.ids), directory)
  assert len(load(directory).doc_ids) == len(corpus)  # intact, it loads
  meta_path = directory / meta_file
  meta = json.loads(meta_path.read_text())
  if damage == "no_meta":
    meta_path.unlink()
  elif damage == "bad_json":
    meta_path.write_text(json.dumps(meta)[:-10])
  elif damage == "old_version":
    meta_path.write_text(json.dumps({**meta, "format_version": 0}))
  else:
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "doc_ids"}))
  with pytest.raises((ValueError, FileNotFoundError), match=str(directory)) as error:
    load(directory)
  assert message in str(error.value)


# --- dense: the Flax encoder ------------------------------------------------------------------------------

def test_flax_minilm_embeddings_match_transformers(minilm, squad_corpus_and_questions):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  corpus, questions = squad_corpus_and_questions
  sentences = ["Hi.", "Who wrote Hamlet?", questions[0][0], questions[5][0], questions[40][0],
               corpus.texts[3][:300], corpus.texts[9],
               max(corpus.texts, key=len)]  # > 256 tokens: exercises truncation.
  ours = bert.encode_texts(minilm, sentences, batch_size=4)

  model_dir = str(assets.asset_file("minilm_l6_v2"))
  reference_model = transformers.BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
  reference_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  batch = reference_tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
  assert batch["input_ids"].shape[1] == 256  # the longest text was truncated
  with torch.no_grad():
    hidden = reference_model(**batch).last_hidden_state
  mask = batch["attention_mask"][..., None].float()
  reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1).numpy()

  cosine = np.sum(ours * reference, axis=-1)
  print(f"min cosine {cosine.min():.8f}, max abs diff {np.abs(ours - reference).max():.2e}")
  assert ours.shape == (8, 384)
  assert cosine.min() >= 1 - 1e-4
  np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_embeddings_do_not_depend_on_batch_composition(minilm, squad_corpus_and_questions):
  _, questions = squad_corpus_and_questions
  texts = [q for q, _ in questions[:5]]
  together = bert.encode_texts(minilm, texts)
  alone = np.concatenate([bert.encode_texts(minilm, [t]) for t in texts])
  np.testing.assert_allclose(together, alone, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(together, axis=-1), 1.0, atol=1e-5)


def test_hf_param_map_covers_every_encoder_parameter(minilm):
  import jax  # pylint: disable=g-import-not-at-top
  initialised = jax.eval_shape(lambda: bert.BertEncoder(minilm.config).init(
      jax.random.PRNGKey(0), np.zeros((1, 4), np.int32), np.ones((1, 4), np.int32))["params"])
  assert jax.tree.structure(initialised) == jax.tree.structure(minilm.params)
  assert jax.tree.map(lambda x: x.shape, initialised) == jax.tree.map(np.shape, minilm.params)


# --- dense: faiss -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_setup(minilm, squad_corpus_and_questions):
  """The first 48 paragraphs embedded once, with their questions and near-copy queries."""
  corpus, questions = squad_corpus_and_questions
  small = corpus_lib.Corpus(corpus.ids[:NUM_DENSE_PARAGRAPHS], corpus.titles[:NUM_DENSE_PARAGRAPHS],
                            corpus.texts[:NUM_DENSE_PARAGRAPHS])
  embeddings = dense.embed_corpus(minilm, small, show_progress=False)
  questions = [(q, pid) for q, pid in questions if pid in set(small.ids)][:64]
  # Near-copies: each paragraph's longest sentence, lowercased, with its first word dropped.
  near_copies = [" ".join(max(text.split(". "), key=len).lower().split()[1:]) for text in small.texts]
  return small, embeddings, questions, near_copies


def test_dense_retrieval_finds_the_right_paragraph(minilm, dense_setup):
  small, embeddings, questions, near_copies = dense_setup
  retriever = dense.DenseRetriever(minilm, dense.build_dense_index(embeddings, small.ids))
  ids, scores = retriever.search(near_copies, k=3)
  assert ids.shape == (len(small), 3) and np.all(np.diff(scores, axis=1) <= 0)
  # One sentence of a ~150-word paragraph: top 1 mostly (paragraphs of one article share topics), top 3 always.
  top1 = np.mean(ids[:, 0] == np.asarray(small.ids))
  assert top1 >= 0.9 and all(pid in row for pid, row in zip(small.ids, ids)), (top1, ids)
  question_ids, _ = retriever.search([q for q, _ in questions], k=5)
  recall_at_5 = np.mean([pid in row for (_, pid), row in zip(questions, question_ids)])
  print(f"dense: near-copy top-1 {top1:.3f}, question recall@5 {recall_at_5:.3f} ({len(questions)} questions)")
  assert recall_at_5 >= 0.85, recall_at_5


@pytest.mark.parametrize("index_type, options", [
    ("flat", {}), ("ivf", {"nlist": 4, "nprobe": 4}), ("hnsw", {"hnsw_m": 8})])
def test_dense_index_save_load_round_trip(minilm, dense_setup, tmp_path, index_type, options):
  small, embeddings, _, near_copies = dense_setup
  queries = bert.encode_texts(minilm, near_copies[:16])
  exact_ids, exact_scores = dense.search_dense(dense.build_dense_index(embeddings, small.ids), queries, k=5)
  index = dense.build_dense_index(embeddings, small.ids, index_type=index_type, **options)
  dense.save_dense_index(index, tmp_path / "dense")
  loaded = dense.load_dense_index(tmp_path / "dense")
  assert loaded.index_type == index_type and len(loaded) == len(small)
  ids, scores = dense.search_dense(index, queries, k=5)
  loaded_ids, loaded_scores = dense.search_dense(loaded, queries, k=5)
  np.testing.assert_array_equal(ids, loaded_ids)
  np.testing.assert_array_equal(scores, loaded_scores)
  # On 48 vectors with every IVF cell probed / a wide HNSW search, approximate search is exact.
  np.testing.assert_array_equal(ids, exact_ids)
  np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
