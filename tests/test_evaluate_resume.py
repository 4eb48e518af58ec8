"""Resuming into an out_dir: only predictions made with the same settings are reused; others refuse or, with
overwrite=True, are replaced. Never two runs' predictions mixed in one summary."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import gin
import pytest

from rankrag_jax import eval_outputs, evaluate, rag

REPO = pathlib.Path(__file__).resolve().parents[1]
CORPUS = [{"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."},
          {"id": "berlin", "title": "Berlin", "text": "Berlin is the capital of Germany."},
          {"id": "banana", "title": "", "text": "Bananas are berries that grow in tropical regions."}]
QUESTIONS = [{"id": "q1", "question": "What is the capital of France?", "answers": ["Paris"],
              "gold_passage_id": "paris"},
             {"id": "q2", "question": "What is the capital of Germany?", "answers": ["Berlin"]}]
SETTINGS = dict(dataset="d.jsonl", task="open_domain_qa", checkpoint="smollm2_135m_instruct", corpus="c.jsonl",
                retriever="bm25", n=3, k=2, use_reranker=True, generate_answers=True, chat_format="chatqa",
                max_new_tokens=2, recall_ks=(1, 3))


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def tiny_model(make_tiny_rag_model):
  """The shared random tiny model (conftest.py): fast, and every stage of the pipeline runs on it."""
  return make_tiny_rag_model(256)


@pytest.fixture
def files(tmp_path):
  return write_jsonl(tmp_path / "d.jsonl", QUESTIONS), write_jsonl(tmp_path / "c.jsonl", CORPUS)


def no_model(checkpoint):
  pytest.fail("a model was loaded by a run that should have refused or had nothing to do")


def lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ settings
def test_prediction_settings_change_with_what_changes_a_prediction():
  base = eval_outputs.prediction_settings(**SETTINGS)
  assert base["checkpoint"] == "smollm2_135m_instruct" and base["recall_ks"] == [1, 3]
  assert base["dataset"] == os.path.abspath("d.jsonl") and base["generate.temperature"] == 0.0
  changes = dict(dataset="e.jsonl", task="fever", checkpoint="other", corpus="e.jsonl", n=4, k=3,
                 use_reranker=False, chat_format="chat_template", max_new_tokens=7, recall_ks=(1,))
  for name, value in changes.items():
    assert eval_outputs.prediction_settings(**{**SETTINGS, name: value}) != base, name
  # The default budget is resolved, so None and the task's default (32) are the same setting.
  assert eval_outputs.prediction_settings(**{**SETTINGS, "max_new_tokens": None})["max_new_tokens"] == 32
  # A setting the run does not use is None: a retriever-only run does not care about the checkpoint or K.
  ranking_only = {**SETTINGS, "use_reranker": False, "generate_answers": False}
  assert (eval_outputs.prediction_settings(**ranking_only)
          == eval_outputs.prediction_settings(**{**ranking_only, "checkpoint": "other", "k": 9, "max_new_tokens": 5}))
  # Gin bindings that change a prediction elsewhere (decoding, BM25) count too.
  gin.bind_parameter("rankrag_jax.generate.generate.temperature", 0.7)
  try:
    assert eval_outputs.prediction_settings(**SETTINGS)["generate.temperature"] == 0.7
  finally:
    gin.clear_config()


def test_settings_differences_name_old_and_new_values():
  assert eval_outputs.settings_differences({"n": 20, "k": 5}, {"n": 20, "k": 5}) == {}
  assert eval_outputs.settings_differences({"n": 20, "k": 5}, {"n": 10, "k": 5, "x": 1}) == {
      "n": (20, 10), "x": ("<unset>", 1)}


# ------------------------------------------------------------------------------------------------ end to end
def test_same_settings_resume_and_other_checkpoint_n_or_k_refuse(tmp_path, files, tiny_model, monkeypatch):
  monkeypatch.setattr(rag, "load_rag_model", lambda checkpoint: tiny_model)
  scored = []
  real_rerank = evaluate.rerank_candidates
  monkeypatch.setattr(evaluate, "rerank_candidates",
                      lambda model, examples, *a: scored.extend(e["id"] for e in examples) or real_rerank(model, examples,
                                                                                                       *a))
  dataset, corpus = files
  out = tmp_path / "out"
  run = functools.partial(evaluate.run_evaluation, dataset=dataset, corpus=corpus, out_dir=str(out), n=3, k=2,
                          recall_ks=(1, 3), max_new_tokens=2, show_progress=False, print_fn=lambda *_: None)
  run(limit=1)
  first = (out / "predictions.jsonl").read_text()
  assert json.loads((out / "run_settings.json").read_text())["n"] == 3
  # Same settings (limit, offset and chunk_size are free): q1 is kept, only q2 is computed.
  summary = run(chunk_size=1)
  assert scored == ["q1", "q2"] and summary["examples"] == 2
  assert (out / "predictions.jsonl").read_text().startswith(first)

  monkeypatch.setattr(rag, "load_rag_model", no_model)
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  for change, pattern in [(dict(checkpoint="other_model"), r"checkpoint: 'smollm2_135m_instruct' \(predictions\) "
                                                           r"!= 'other_model' \(now\)"),
                          (dict(n=2), r"n: 3 \(predictions\) != 2 \(now\)"),
                          (dict(k=1), r"k: 2 \(predictions\) != 1 \(now\)")]:
    with pytest.raises(eval_outputs.SettingsMismatch, match=pattern) as error:
      run(**change)
    message = str(error.value)
    assert str(out) in message and "new out_dir" in message and "overwrite=True" in message
    assert isinstance(error.value, ValueError)  # main() turns it into one line and exit 2.
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


def test_overwrite_replaces_the_old_predictions(tmp_path, files, monkeypatch):
  monkeypatch.setattr(rag, "load_rag_model", no_model)  # ranking only: no model
  dataset, corpus = files
  out = tmp_path / "out"
  run = functools.partial(evaluate.run_evaluation, dataset=dataset, corpus=corpus, out_dir=str(out),
                          use_reranker=False, generate_answers=False, recall_ks=(1,), show_progress=False,
                          print_fn=lambda *_: None)
  run(n=3)
  assert [len(r["ranked"]) for r in lines(out / "predictions.jsonl")] == [3, 3]
  with pytest.raises(eval_outputs.SettingsMismatch, match=r"n: 3 \(predictions\) != 2 \(now\)"):
    run(n=2, limit=1)
  summary = run(n=2, limit=1, overwrite=True)
  records = lines(out / "predictions.jsonl")
  assert [r["id"] for r in records] == ["q1"] and len(records[0]["ranked"]) == 2  # q2's n=3 record is gone
  assert summary["examples"] == 1 and json.loads((out / "run_settings.json").read_text())["n"] == 2
  assert list(json.loads((out / "summary.json").read_text()).values())[0] == summary


def test_predictions_without_settings_refuse(tmp_path, files, monkeypatch):
  monkeypatch.setattr(rag, "load_rag_model", no_model)
  dataset, corpus = files
  out = tmp_path / "out"
  run = functools.partial(evaluate.run_evaluation, dataset=dataset, corpus=corpus, out_dir=str(out),
                          use_reranker=False, generate_answers=False, recall_ks=(1,), show_progress=False,
                          print_fn=lambda *_: None)
  run()
  (out / "run_settings.json").unlink()  # as an older version left them
  old = (out / "predictions.jsonl").read_bytes()
  with pytest.raises(eval_outputs.SettingsMismatch, match=r"settings of those predictions are unknown.*overwrite=True"):
    run()
  assert (out / "predictions.jsonl").read_bytes() == old and not (out / "run_settings.json").exists()
  (out / "run_settings.json").write_text("{not json")
  with pytest.raises(eval_outputs.SettingsMismatch, match=r"not valid JSON"):
    run()
  assert run(overwrite=True)["examples"] == 2 and (out / "run_settings.json").exists()


def test_command_refuses_in_one_line_and_overwrites_with_the_gin_flag(tmp_path, files):
  dataset, corpus = files
  out = tmp_path / "out"
  command = lambda *bindings: subprocess.run(
      [sys.executable, "-m", "rankrag_jax.evaluate", "--gin_file=gin_configs/eval/heldout_retriever.gin",
       f"--gin_bindings=OUT_DIR = '{out}'", f"--gin_bindings=run_evaluation.dataset = '{dataset}'",
       f"--gin_bindings=run_evaluation.corpus = '{corpus}'", "--gin_bindings=N = 3",
       *[f"--gin_bindings={b}" for b in bindings]],
      capture_output=True, text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert command().returncode == 0
  refused = command("N = 2")
  errors = [line for line in refused.stderr.splitlines() if line.startswith("evaluate:")]
  assert refused.returncode == 2, refused.stderr[-2000:]
  assert len(errors) == 1 and "n: 3 (predictions) != 2 (now)" in errors[0] and "run_evaluation.overwrite" in errors[0]
  assert command("N = 2", "run_evaluation.overwrite = True").returncode == 0
  assert [len(r["ranked"]) for r in lines(out / "predictions.jsonl")] == [2, 2]
