"""The `rag` command: clear one-line errors for bad inputs, the pipeline's bookkeeping, and a real SmolLM2 run."""

import json
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

from rankrag_jax import assets, prompts, rag, rerank
from rankrag_jax.retrieval import corpus as corpus_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
LONG_TEXT = " ".join(["The Rhine flows north through the old town of Basel and past the paper mill."] * 60)
ROWS = [{"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."},
        {"id": "rhine", "title": "Rhine", "text": LONG_TEXT},
        {"id": "banana", "title": "", "text": "Bananas are berries that grow in tropical regions."},
        {"id": "berlin", "title": "Berlin", "text": "Berlin is the capital of Germany."}]


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return str(path)


def run_command(*args):
  """`python -m rankrag_jax.rag ARGS` -> (exit code, stdout, stderr lines that are not absl/XLA logging)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "rankrag_jax.rag", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=1800)
  errors = [line for line in result.stderr.splitlines() if line.startswith("rag:")]
  return result.returncode, result.stdout, errors


@pytest.fixture(scope="module")
def tiny_rag_model(make_tiny_rag_model):
  """A random tiny Llama over SmolLM2's real tokenizer, with a 192-token window (so long passages get cut)."""
  return make_tiny_rag_model(192)


# ------------------------------------------------------------------------------------------- bad inputs
def test_unknown_checkpoint_exits_2_with_one_line_naming_it(tmp_path):
  corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
  missing = str(tmp_path / "no_such_model.gguf")
  code, _, errors = run_command("--checkpoint", missing, "--corpus", corpus, "--question", "capital of France?")
  assert code == 2
  assert len(errors) == 1 and missing in errors[0] and "Traceback" not in errors[0], errors


def test_empty_corpus_exits_2_with_one_line_naming_the_file(tmp_path):
  empty = tmp_path / "corpus.jsonl"
  empty.write_text("\n")
  code, _, errors = run_command("--checkpoint", "smollm2_135m_instruct", "--corpus", str(empty),
                                "--question", "capital of France?")
  assert code == 2
  assert len(errors) == 1 and str(empty) in errors[0] and "empty" in errors[0], errors


def test_bad_inputs_raise_clear_errors_before_any_model_loads(tmp_path):
  corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
  with pytest.raises(rag.RagError, match="--question is empty"):
    rag.run("unused", corpus, question="   ")
  with pytest.raises(rag.RagError, match="exactly one of --question or --questions"):
    rag.run("unused", corpus)
  with pytest.raises(rag.RagError, match="--corpus .*missing.jsonl: no such file"):
    rag.run("unused", str(tmp_path / "missing.jsonl"), question="q?")
  questions = tmp_path / "q.jsonl"
  questions.write_text('{"question": "ok?"}\n{"question": " "}\n')
  with pytest.raises(rag.RagError, match=r"q.jsonl:2: field 'question' is empty"):
    rag.run("unused", corpus, questions_path=str(questions))
  questions.write_text('{"question": "ok?"}\n{"query": "wrong field"}\n')
  with pytest.raises(rag.RagError, match=r"q.jsonl:2: field 'question' is missing"):
    rag.run("unused", corpus, questions_path=str(questions))
  with pytest.raises(corpus_lib.CorpusError, match="empty"):
    rag.run("unused", write_jsonl(tmp_path / "empty.jsonl", []), question="q?")


# ------------------------------------------------------------------------------------------- the pipeline
def test_pipeline_keeps_top_k_by_p_true_and_counts_truncated_passages(tiny_rag_model):
  corpus = corpus_lib.corpus_from_rows(ROWS)
  search = rag.build_search(corpus, "bm25")
  questions = [{"id": "a", "question": "Which town does the Rhine flow through?", "answers": ["Basel"]},
               {"id": "b", "question": "What is the capital of France?"}]
  records, timings = rag.answer_questions(tiny_rag_model, corpus, search, questions, n=4, k=2, max_new_tokens=4)
  assert set(timings) == {"retrieve_s", "rerank_s", "generate_s"}
  for record in records:
    assert isinstance(record["answer"], str) and not record["abstained"]
    scores = [p["p_true"] for p in record["passages"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert all(0 < p["p_true"] <= p["p_true_normalised"] < 1 for p in record["passages"])
    assert record["num_retrieved"] == 4
  assert records[0]["answers"] == ["Basel"]  # passed through for evaluation.
  # The 900-token Rhine passage is retrieved for both questions and cut to fit the 192-token window.
  assert records[0]["num_truncated_ranking"] == 1 and records[1]["num_truncated_ranking"] == 1


def test_fever_uses_the_claim_prompts_and_an_8_token_budget(tiny_rag_model, monkeypatch):
  corpus = corpus_lib.corpus_from_rows(ROWS)
  seen = {}

  def fake_scores(params, config, tokenizer, items, **kwargs):
    seen["claim"] = kwargs["claim"]
    return [rerank.PassageScores(np.linspace(0.9, 0.1, len(ps)), np.linspace(0.9, 0.1, len(ps)), 0,
                                 np.zeros(len(ps), np.int32)) for _, ps in items]

  def fake_generate(params, config, prompt_ids, max_new_tokens, stop_ids, **kwargs):
    seen["prompt"] = tiny_rag_model.tokenizer.decode(prompt_ids[0])
    seen["max_new_tokens"] = max_new_tokens
    return [[] for _ in prompt_ids]

  monkeypatch.setattr(rag.rerank, "score_questions", fake_scores)
  monkeypatch.setattr(rag, "generate", fake_generate)
  rag.answer_questions(tiny_rag_model, corpus, rag.build_search(corpus, "bm25"),
                       [{"question": "Paris is the capital of France."}], n=2, k=2, task="fever")
  assert seen["claim"] and seen["max_new_tokens"] == 8
  assert seen["prompt"].endswith("User: Answer the following question with True or False. Is the claim 'Paris is "
                                 "the capital of France.' correct?\n\nAssistant:")
  assert "Passage 1: " in seen["prompt"] and "Passage 2: " in seen["prompt"]


def test_both_retrievers_search_the_corpus():
  corpus = corpus_lib.corpus_from_rows(ROWS)
  for kind in rag.RETRIEVERS:
    ids, scores = rag.build_search(corpus, kind)(["What is the capital of France?"], 2)
    assert ids.shape == scores.shape == (1, 2) and ids[0][0] == "paris", kind
  with pytest.raises(rag.RagError, match="--retriever must be one of"):
    rag.build_search(corpus, "splade")


def test_abstains_below_the_threshold_without_generating(tiny_rag_model):
  corpus = corpus_lib.corpus_from_rows(ROWS)
  records, _ = rag.answer_questions(tiny_rag_model, corpus, rag.build_search(corpus, "bm25"),
                                    [{"question": "What is the capital of France?"}], n=2, k=1,
                                    abstain_threshold=1.01)
  assert records[0]["abstained"] and records[0]["answer"] == prompts.UNANSWERABLE_ANSWER
  assert "num_truncated_generation" not in records[0]


# ------------------------------------------------------------------------------------------- real run
def heldout_nq(num_questions: int, seed: int = 0):
  """The Wikipedia lead extracts as a corpus and held-out EfficientQA-test questions whose answer is in a BM25
  top-10 passage of it (most NQ answers are not in this small corpus: blend.py's coverage numbers)."""
  from rankrag_jax.data import answers, blend, negatives, readers, sources  # pylint: disable=g-import-not-at-top
  corpus = list(sources.read_wiki_summaries(assets.asset_file("wiki_summaries")))
  questions = list(readers.read_qa_jsonl(assets.asset_file("nq_open") / blend.NQ_HELDOUT_FILE))
  questions = random.Random(seed).sample(questions, 200)
  index = negatives.Bm25Index(corpus)
  found = [q for q, hits in zip(questions, index.search([q["question"] for q in questions], 10))
           if any(answers.has_answer(f"{corpus[i]['title']}\n{corpus[i]['text']}", q["answers"]) for i, _ in hits)]
  return corpus, [{"id": q["id"], "question": q["question"], "answers": q["answers"]} for q in found[:num_questions]]


@pytest.mark.slow
def test_smollm2_rag_command_answers_heldout_nq_questions(tmp_path):
  from rankrag_jax.data import answers  # pylint: disable=g-import-not-at-top
  corpus_rows, questions = heldout_nq(num_questions=3)
  corpus = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows)
  questions_path = write_jsonl(tmp_path / "heldout.jsonl", questions)
  out = tmp_path / "preds.jsonl"
  code, stdout, errors = run_command("--checkpoint", "smollm2_135m_instruct", "--corpus", corpus,
                                     "--questions", questions_path, "--out", str(out), "--n", "10", "--k", "3",
                                     "--chat_format", "chat_template")
  assert code == 0, errors
  assert "Timings (3 question(s)): index" in stdout and "rerank" in stdout and "generate" in stdout
  preds = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(questions) == 3 and [p["id"] for p in preds] == [q["id"] for q in questions]
  print(f"\n{len(corpus_rows)} Wikipedia passages; {stdout.strip().splitlines()[-1]}")
  for pred in preds:
    assert pred["answer"].strip() and len(pred["passages"]) == 3
    print(f"Q: {pred['question']}\n  gold {pred['answers']}  answer {pred['answer']!r}  "
          f"EM {answers.exact_match(pred['answer'], pred['answers'])}  "
          f"answer kept {any(answers.has_answer(p['text'], pred['answers']) for p in pred['passages'])}"
          f"  P(True) {[round(p['p_true'], 3) for p in pred['passages']]}")
