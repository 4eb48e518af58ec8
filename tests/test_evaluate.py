"""The evaluation harness: metrics on known cases, public dataset formats, file:line errors, resumable output."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import pytest

from rankrag_jax import evaluate, rag
from rankrag_jax.data import answers, readers
from rankrag_jax.retrieval import corpus as corpus_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CORPUS = [{"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."},
          {"id": "berlin", "title": "Berlin", "text": "Berlin is the capital of Germany."},
          {"id": "banana", "title": "", "text": "Bananas are berries that grow in tropical regions."},
          {"id": "rhine", "title": "Rhine", "text": "The Rhine flows north through Basel and past Cologne."}]
QUESTIONS = [{"id": "q1", "question": "What is the capital of France?", "answers": ["Paris"],
              "gold_passage_id": "paris"},
             {"id": "q2", "question": "What is the capital of Germany?", "answers": ["Berlin"]},
             {"id": "q3", "question": "Where do bananas grow?", "golden_answers": ["tropical regions"]},
             {"id": "q4", "question": "Which river flows through Basel?", "answers": ["the Rhine", "Rhine"]}]


def write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def tiny_model(make_tiny_rag_model):
  """The shared random tiny model (conftest.py): fast, and every stage of the pipeline runs on it."""
  return make_tiny_rag_model(256)


# ------------------------------------------------------------------------------------------------- metrics
def test_metrics_on_known_cases():
  example = {"answers": ["Paris"], "gold_ids": ["p1"]}
  ranked = [{"id": "p0", "text": "Berlin is in Germany."}, {"id": "p1", "text": "Paris, France."},
            {"id": "p2", "text": "paris again"}]
  got = evaluate.example_metrics(example, ranked, "The Paris", "open_domain_qa", (1, 2, 3))
  assert got == {"EM": 1.0, "F1": 1.0, "R@1": 0.0, "R@2": 1.0, "R@3": 1.0, "goldR@1": 0.0, "goldR@2": 1.0,
                 "goldR@3": 1.0, "MRR": 0.5}
  partial = evaluate.example_metrics({"answers": ["the Eiffel Tower"], "gold_ids": []}, ranked, "Eiffel",
                                     "open_domain_qa", (1,))
  assert partial["EM"] == 0.0 and partial["F1"] == pytest.approx(2 / 3) and "MRR" not in partial
  fever = {"label": False, "gold_ids": []}
  assert evaluate.example_metrics(fever, ranked, "False.", "fever", (1,)) == {"Acc": 1.0}
  assert evaluate.example_metrics(fever, ranked, "True", "fever", (1,)) == {"Acc": 0.0}
  assert evaluate.example_metrics(fever, ranked, "Maybe", "fever", (1,)) == {"Acc": 0.0}
  # Ranking-only runs have no answer, hence no EM/F1.
  assert "EM" not in evaluate.example_metrics(example, ranked, None, "open_domain_qa", (1,))


# ------------------------------------------------------------------------------------------------- datasets
def test_public_formats_parse(tmp_path):
  rows = [
      {"question": "who wrote hamlet", "answers": ["Shakespeare"], "ctxs": [{"id": "7", "title": "H", "text": "t"}],
       "positive_ctxs": [{"passage_id": "7"}]},                                             # DPR
      {"id": "test_1", "question": "who?", "golden_answers": ["A", "B"]},                    # FlashRAG
      {"_id": "5a8b", "question": "which?", "answer": "yes"},                                 # HotpotQA / 2Wiki
      {"id": 9, "question": "what is x's genre?", "possible_answers": "[\"jazz\", \"swing\"]"},  # PopQA
  ]
  got = evaluate.read_eval_dataset(write_jsonl(tmp_path / "qa.jsonl", rows))
  assert [r["id"] for r in got] == ["qa/1", "test_1", "5a8b", "9"]
  assert got[0]["gold_ids"] == ["7"] and got[0]["ctxs"][0]["text"] == "t"
  assert [r["answers"] for r in got[1:]] == [["A", "B"], ["yes"], ["jazz", "swing"]]

  fever = [{"id": "f1", "question": "The sky is green.", "golden_answers": ["REFUTES"]},  # FlashRAG
           {"id": "f2", "input": "Paris is in France.", "output": [{"answer": "SUPPORTS"}]},  # KILT
           {"id": "f3", "claim": "Water is wet.", "label": True}]
  got = evaluate.read_eval_dataset(write_jsonl(tmp_path / "fever.jsonl", fever), task="fever")
  assert [r["label"] for r in got] == [False, True, True]

  conv = [{"id": "c1", "messages": [{"role": "user", "content": "Who founded it?"},
                                    {"role": "assistant", "content": "Ann."},
                                    {"role": "user", "content": "When?"}],
           "answers": ["1990"], "ctxs": [{"title": "Co", "text": "Ann founded Co in 1990."}]}]
  got = evaluate.read_eval_dataset(write_jsonl(tmp_path / "conv.jsonl", conv), task="conversational_qa")
  assert got[0]["question"] == "When?" and got[0]["history"] == [{"user": "Who founded it?", "assistant": "Ann."}]


def test_bad_rows_name_file_line_and_field(tmp_path):
  path = write_jsonl(tmp_path / "bad.jsonl", [QUESTIONS[0], "", {"question": "q?", "answers": []}])
  with pytest.raises(readers.DataError, match=r"bad\.jsonl:3: field 'answers'"):
    evaluate.read_eval_dataset(path)
  path = write_jsonl(tmp_path / "bad_json.jsonl", [QUESTIONS[0], '{"question": "q?", "answers": ["a"]'])
  with pytest.raises(readers.DataError, match=r"bad_json\.jsonl:2: field '<json>'"):
    evaluate.read_eval_dataset(path)
  path = write_jsonl(tmp_path / "bad_label.jsonl", [{"claim": "c", "label": "NOT ENOUGH INFO"}])
  with pytest.raises(readers.DataError, match=r"bad_label\.jsonl:1: field 'label'"):
    evaluate.read_eval_dataset(path, task="fever")
  path = write_jsonl(tmp_path / "mixed.jsonl", [QUESTIONS[0], {"question": " ", "answers": ["a"]}, QUESTIONS[1]])
  assert [r["id"] for r in evaluate.read_eval_dataset(path, on_error="skip")] == ["q1", "q2"]


def test_command_exits_2_with_one_line_naming_the_bad_row(tmp_path):
  dataset = write_jsonl(tmp_path / "d.jsonl", [QUESTIONS[0], {"question": "no answers"}])
  corpus = write_jsonl(tmp_path / "c.jsonl", CORPUS)
  result = subprocess.run(
      [sys.executable, "-m", "rankrag_jax.evaluate", "--gin_file=gin_configs/eval/heldout_retriever.gin",
       f"--gin_bindings=OUT_DIR = '{tmp_path / 'out'}'", f"--gin_bindings=run_evaluation.dataset = '{dataset}'",
       f"--gin_bindings=run_evaluation.corpus = '{corpus}'"],
      capture_output=True, text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
  errors = [line for line in result.stderr.splitlines() if line.startswith("evaluate:")]
  assert result.returncode == 2
  assert len(errors) == 1 and "d.jsonl:2: field 'answers'" in errors[0], result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------- pipeline
def test_resume_skips_finished_ids_and_repairs_a_torn_line(tmp_path, tiny_model, monkeypatch):
  monkeypatch.setattr(rag, "load_rag_model", lambda checkpoint: tiny_model)
  scored = []
  real_rerank = evaluate.rerank_candidates
  monkeypatch.setattr(evaluate, "rerank_candidates",
                      lambda model, examples, *a: scored.extend(e["id"] for e in examples) or real_rerank(model, examples,
                                                                                                       *a))
  dataset = write_jsonl(tmp_path / "d.jsonl", QUESTIONS)
  corpus = write_jsonl(tmp_path / "c.jsonl", CORPUS)
  out = tmp_path / "out"
  run = functools.partial(evaluate.run_evaluation, dataset=dataset, corpus=corpus, out_dir=str(out), n=3, k=2,
                          chunk_size=2, recall_ks=(1, 3), max_new_tokens=4, show_progress=False,
                          print_fn=lambda *_: None)
  run(limit=2)
  assert scored == ["q1", "q2"]
  first = (out / "predictions.jsonl").read_text()
  # A run killed mid-write leaves a torn last line: it is cut off and that example is redone.
  with open(out / "predictions.jsonl", "a") as f:
    f.write('{"id": "q3", "question": "Where do ban')
  summary = run()
  assert scored == ["q1", "q2", "q3", "q4"]
  records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
  assert [r["id"] for r in records] == ["q1", "q2", "q3", "q4"]
  assert (out / "predictions.jsonl").read_text().startswith(first)
  assert summary["examples"] == 4 and set(summary) >= {"EM", "F1", "R@1", "R@3", "goldR@1", "MRR"}
  for record in records:
    assert len(record["ranked"]) == 3 and isinstance(record["answer"], str)
    p_true = [c["p_true"] for c in record["ranked"]]
    assert p_true == sorted(p_true, reverse=True)  # reranked by P(True)
  table = json.loads((out / "summary.json").read_text())
  assert list(table.values())[0] == summary
  # Everything done: a third call loads no model and scores nothing.
  monkeypatch.setattr(rag, "load_rag_model", lambda checkpoint: pytest.fail("model loaded with nothing to do"))
  assert run() == summary and len(scored) == 4


def test_without_reranker_keeps_the_retriever_order_and_fever_uses_given_ctxs(tmp_path, tiny_model, monkeypatch):
  monkeypatch.setattr(rag, "load_rag_model", lambda checkpoint: tiny_model)
  rows = [{"id": "f1", "claim": "Paris is the capital of France.", "label": "SUPPORTS",
           "ctxs": [{"id": "e1", "title": "Paris", "text": "Paris is the capital of France."},
                    {"id": "e2", "title": "", "text": "Bananas are berries."}]}]
  dataset = write_jsonl(tmp_path / "fever.jsonl", rows)
  summary = evaluate.run_evaluation(dataset=dataset, out_dir=str(tmp_path / "out"), task="fever",
                                    retriever="given", n=2, k=1, use_reranker=False, recall_ks=(1,),
                                    show_progress=False, print_fn=lambda *_: None)
  record = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())
  assert [c["id"] for c in record["ranked"]] == ["e1", "e2"] and "p_true" not in record["ranked"][0]
  assert summary["examples"] == 1 and summary["Acc"] in (0.0, 100.0)


def test_bm25_recall_on_the_real_heldout_split_matches_the_blend_coverage(tmp_path):
  """The harness (retrieval.bm25) and the blend build's coverage count (data.negatives) agree on every held-out
  question: two code paths over the same corpus, so a broken index, tokenisation or Recall@k count shows."""
  from rankrag_jax.training.data import ensure_blend
  blend_dir = ensure_blend()  # real data: builds the default blend on a fresh machine (~20 s), else reuses it.
  coverage = json.loads((blend_dir / "manifest.json").read_text())["bm25_answer_recall"]["heldout"]
  summary = evaluate.run_evaluation(dataset="blend:heldout.jsonl", corpus="blend:corpus.jsonl",
                                    out_dir=str(tmp_path), n=20, use_reranker=False, generate_answers=False,
                                    recall_ks=(1, 5, 20), show_progress=False, print_fn=lambda *_: None)
  records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
  assert len(records) == summary["examples"] == coverage["questions"] == 1769
  corpus = corpus_lib.read_corpus_jsonl(blend_dir / "corpus.jsonl")
  text_of = dict(zip(corpus.ids, corpus.passages()))
  direct = 100 * sum(answers.has_answer(text_of[r["ranked"][0]["id"]], r["answers"]) for r in records) / len(records)
  assert summary["R@1"] == pytest.approx(direct)
  for k in (1, 5, 20):
    assert summary[f"R@{k}"] == pytest.approx(100 * coverage[f"recall@{k}"], abs=0.01), k
