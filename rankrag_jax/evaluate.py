"""Evaluation harness: retrieve -> rerank -> generate over a dataset, with the paper's metrics (§5, App. E).

    python -m rankrag_jax.evaluate --gin_file=gin_configs/eval/heldout_rerank.gin \\
        [--gin_bindings="run_evaluation.limit = 50" ...]

Datasets are JSONL in the public formats: DPR / FlashRAG QA (NQ, TriviaQA, PopQA, HotpotQA, 2WikiMQA: `question` +
`answers` | `golden_answers`, optional `ctxs`), FEVER (FlashRAG `golden_answers: ["SUPPORTS"]`, KILT `input` +
`output[].answer`, or `claim` + `label`), conversational sets (ChatRAG-Bench `messages` + `answers` + `ctxs`), and
our held-out split (`gold_passage_id`). Candidates come from BM25 or the dense retriever over a corpus JSONL, or
from each row's own `ctxs` (`retriever="given"`: DPR's retrieval output, ChatRAG-Bench's documents).

Output, in `out_dir`: `predictions.jsonl` (one record per example, appended and flushed chunk by chunk; a re-run
skips the ids already there, so a killed run resumes), `run_settings.json` (the settings that make a prediction
what it is), `summary.json` / `summary.md` (metrics.write_summary_table) and `run.json` (the settings and stage
timings). A re-run resumes only with the same prediction settings (offset, limit and chunk_size may differ); else
it refuses with `SettingsMismatch` naming each difference, so two runs' predictions never mix: use a new
`out_dir`, or `run_evaluation.overwrite = True` to delete the old output first (`eval_outputs.py`).
The pipeline's pieces are the library's: `rag.build_search`,
`rag.load_rag_model`, `rag.rank_passages`, `rag.generation_prompt`, `generate.generate`.
"""

import json
import os
import pathlib
import sys
import time
from typing import Sequence

from absl import app, flags
import gin
import numpy as np
import tqdm

# Gin-configurable modules are imported before --gin_file is parsed.
from rankrag_jax import assets, cli, metrics, rag  # rag imports rerank, prompts and generate.
from rankrag_jax.generate import generate, max_new_tokens_for_task
from rankrag_jax.data import readers
from rankrag_jax.eval_outputs import EvalError, load_finished, prediction_settings, prepare_out_dir
from rankrag_jax.retrieval import corpus as corpus_lib

TASKS = ("open_domain_qa", "fever", "conversational_qa")
RETRIEVERS = ("bm25", "dense", "given")
_FEVER_LABELS = {"supports": True, "true": True, "refutes": False, "false": False}




# ------------------------------------------------------------------------------------------------ datasets
def _string(obj: dict, field: str) -> str:
  value = obj.get(field)
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str) or not value.strip():
    raise readers.RowError(field, "missing, empty or not a string")
  return value.strip()


def _answers(obj: dict) -> tuple[str, list[str]]:
  """(field, answers) from DPR `answers`, FlashRAG `golden_answers`, HotpotQA `answer`, PopQA `possible_answers`
  (a JSON-encoded list) or KILT `output[].answer`."""
  for field in ("answers", "golden_answers", "answer", "possible_answers"):
    if field in obj:
      value = obj[field]
      if field == "possible_answers" and isinstance(value, str):
        try:
          value = json.loads(value)
        except json.JSONDecodeError:
          raise readers.RowError(field, "not a JSON-encoded list") from None
      value = [value] if isinstance(value, str) else value
      if not isinstance(value, list) or not value:
        raise readers.RowError(field, "expected a non-empty list of answers")
      for i, answer in enumerate(value):
        if not isinstance(answer, str) or not answer.strip():
          raise readers.RowError(f"{field}[{i}]", "empty or not a string")
      return field, [a.strip() for a in value]
  if isinstance(obj.get("output"), list):
    answers = [o.get("answer") for o in obj["output"] if isinstance(o, dict) and isinstance(o.get("answer"), str)]
    if answers:
      return "output", answers
  raise readers.RowError("answers", "missing (expected answers | golden_answers | answer | output[].answer)")


def parse_eval_row(obj: dict, task: str) -> dict:
  """One dataset row -> {id?, question, history, answers, label, gold_ids, ctxs}; raises readers.RowError."""
  history = []
  if task == "conversational_qa" and "messages" in obj:
    messages = [m for m in obj["messages"] if isinstance(m, dict) and m.get("role") != "system"]
    if not messages or messages[-1].get("role") != "user":
      raise readers.RowError("messages", "expected the conversation to end with a user turn")
    for i, message in enumerate(messages[:-1]):
      key = {"user": "user", "assistant": "assistant"}.get(message.get("role"))
      if key is None or not isinstance(message.get("content"), str):
        raise readers.RowError(f"messages[{i}]", "expected role user|assistant and string content")
      if key == "user":
        history.append({"user": message["content"]})
      elif history:
        history[-1]["assistant"] = message["content"]
    question = _string(messages[-1], "content")
  else:
    question = _string(obj, next((f for f in ("question", "claim", "input") if f in obj), "question"))
  row = {"question": question, "history": [t for t in history if "assistant" in t]}
  if obj.get("id") is not None or obj.get("_id") is not None:
    row["id"] = _string(obj, "id" if obj.get("id") is not None else "_id")
  if task == "fever":
    label_field, raw = ("label", [obj["label"]]) if "label" in obj else _answers(obj)
    label = _FEVER_LABELS.get(str(raw[0]).strip().lower()) if raw and isinstance(raw[0], (str, bool)) else None
    if isinstance(raw[0], bool):
      label = raw[0]
    if label is None:
      raise readers.RowError(label_field, f"expected SUPPORTS/REFUTES or True/False, got {raw[0]!r}")
    row["label"] = label
  else:
    row["answers"] = _answers(obj)[1]
  gold = obj.get("gold_ids") or ([obj["gold_passage_id"]] if obj.get("gold_passage_id") else [])
  gold += [str(c.get("passage_id")) for c in obj.get("positive_ctxs") or [] if isinstance(c, dict)
           and c.get("passage_id") is not None]
  row["gold_ids"] = [str(g) for g in gold]
  ctxs = []
  for i, ctx in enumerate(obj.get("ctxs") or []):
    if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str) or not ctx["text"].strip():
      raise readers.RowError(f"ctxs[{i}].text", "missing, empty or not a string")
    ctxs.append({"id": str(ctx.get("id") or f"ctx{i}"), "title": str(ctx.get("title") or ""), "text": ctx["text"]})
  row["ctxs"] = ctxs
  return row


def resolve_path(path: str | None) -> str | None:
  """`blend:{name}` -> the default blend's file (`$RANKRAG_JAX_CACHE/default_blend/{name}`), built on first use
  (~1 min) as training builds it; others unchanged."""
  if path and path.startswith("blend:"):
    from rankrag_jax.data import blend  # local: the builder pulls in the data sources, BM25 and wikipedia readers
    return str(blend.ensure_default_blend(assets.cache_root() / "default_blend") / path[len("blend:"):])
  return path


def read_eval_dataset(path: str, task: str = "open_domain_qa", on_error: str = "raise") -> list[dict]:
  """Reads a dataset JSONL; a malformed row raises readers.DataError naming file:line and the field (or is
  skipped, with a warning and count, when on_error="skip"). Missing ids become `{file stem}/{line}`."""
  if task not in TASKS:
    raise EvalError(f"task must be one of {TASKS}, got {task!r}")
  if not os.path.isfile(path):
    raise EvalError(f"dataset {path}: no such file")
  rows, skipped, stem = [], [], pathlib.Path(path).stem
  with readers.open_text(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
          raise readers.RowError("<row>", f"expected a JSON object, got {type(obj).__name__}")
        row = parse_eval_row(obj, task)
      except json.JSONDecodeError as e:
        error = readers.DataError(path, line_no, "<json>", f"bad JSON: {e.msg} at column {e.colno}")
      except readers.RowError as e:
        error = readers.DataError(path, line_no, e.field, e.message)
      else:
        rows.append({"id": row.pop("id", f"{stem}/{line_no}"), **row})
        continue
      if on_error == "raise":
        raise error
      skipped.append(str(error))
  if skipped:
    print(f"evaluate: skipped {len(skipped)} malformed rows of {path}, e.g. {skipped[0]}", file=sys.stderr)
  ids = [r["id"] for r in rows]
  if len(set(ids)) != len(ids):
    raise EvalError(f"dataset {path}: duplicate example id {next(i for i in ids if ids.count(i) > 1)!r}")
  return rows


# ------------------------------------------------------------------------------------------------ pipeline
def retrieve(examples: Sequence[dict], corpus, search, n: int) -> list[list[dict]]:
  """Top-n candidates per example: [{id, text, retrieval_score}] from `search`, or the row's `ctxs` (search None)."""
  if search is None:
    out = []
    for example in examples:
      if not example["ctxs"]:
        raise EvalError(f"example {example['id']}: retriever='given' but the row has no ctxs")
      out.append([{"id": c["id"], "text": corpus_lib.passage_text(c["title"], c["text"]),
                   "retrieval_score": float(-rank), "retrieval_rank": rank + 1}
                  for rank, c in enumerate(example["ctxs"][:n])])
    return out
  ids, scores = search([e["question"] for e in examples], min(n, len(corpus)))
  return [[{"id": str(i), "text": t, "retrieval_score": float(s), "retrieval_rank": rank}
           for rank, (i, s, t) in enumerate(zip(row_ids, row_scores, corpus.passages_by_id([str(i) for i in row_ids])), 1)]
          for row_ids, row_scores in zip(ids, scores)]


def example_metrics(example: dict, ranked: Sequence[dict], answer: str | None, task: str,
                    recall_ks: Sequence[int]) -> dict:
  """The paper's per-example metrics: EM/F1 (QA), accuracy (FEVER), answer-Recall@k, gold-Recall@k, MRR."""
  out = {}
  if answer is not None:
    if task == "fever":
      out["Acc"] = metrics.true_false_accuracy(answer, example["label"])
    else:
      out["EM"] = metrics.exact_match_score(answer, example["answers"])
      out["F1"] = metrics.f1_score(answer, example["answers"])
  texts, ids = [c["text"] for c in ranked], [c["id"] for c in ranked]
  for k in (k for k in recall_ks if k <= len(ranked)):  # no Recall@20 for a run that kept 5 candidates.
    if task != "fever":
      out[f"R@{k}"] = metrics.answer_recall_at_k(texts, example["answers"], k)
    if example["gold_ids"]:
      out[f"goldR@{k}"] = metrics.gold_recall_at_k(ids, example["gold_ids"], k)
  if example["gold_ids"]:
    out["MRR"] = metrics.reciprocal_rank(ids, example["gold_ids"])
  return out


def rerank_candidates(model: "rag.RagModel", examples: Sequence[dict], candidates: Sequence[list[dict]], task: str,
                      chat_format: str) -> list[tuple[list[dict], int]]:
  """`rag.rank_questions` on each example's retrieved candidates, all in one scoring pass: per example, the
  candidates sorted by P("True") (each with its scores) and the number of passages cut to fit the window."""
  ranked = rag.rank_questions(model, [(e["question"], [c["text"] for c in cands])
                                      for e, cands in zip(examples, candidates)], task, chat_format)
  out = []
  for cands, (order, scores) in zip(candidates, ranked):
    for c, p, pn in zip(cands, scores.p_true, scores.p_true_normalised):
      c["p_true"], c["p_true_normalised"] = float(p), float(pn)
    out.append(([cands[i] for i in order], scores.num_truncated))
  return out


@gin.configurable(denylist=["print_fn"])
def run_evaluation(dataset: str = gin.REQUIRED, out_dir: str = gin.REQUIRED, task: str = "open_domain_qa",
                   checkpoint: str = "smollm2_135m_instruct", corpus: str | None = None, retriever: str = "bm25",
                   n: int = 20, k: int = 5, use_reranker: bool = True, generate_answers: bool = True,
                   chat_format: str = "chatqa", max_new_tokens: int | None = None, limit: int | None = None,
                   offset: int = 0, chunk_size: int = 8, recall_ks: Sequence[int] = (1, 5, 10, 20),
                   system_name: str | None = None, on_error: str = "raise", overwrite: bool = False,
                   show_progress: bool = True, print_fn=print) -> dict:
  """Runs the pipeline over `dataset[offset:offset+limit]`, resuming from `out_dir`; returns the summary.

  Args:
    dataset: dataset JSONL (see the module docstring for the formats); `blend:heldout.jsonl` names the default
      blend's held-out split (`python -m rankrag_jax.data.build` writes it).
    out_dir: predictions.jsonl, run_settings.json, summary.{json,md}, run.json go here; existing predictions are
      kept and skipped when made with the same settings (`prediction_settings`), else SettingsMismatch.
    task: "open_domain_qa" (EM/F1), "fever" (accuracy; claim prompts, App. D) or "conversational_qa" (F1/EM).
    checkpoint: the ranker/generator, anything `load_model` reads; not loaded when neither stage needs it.
    corpus: corpus JSONL for "bm25" / "dense" retrieval (`blend:corpus.jsonl`: the default blend's).
    retriever: "bm25", "dense" or "given" (each row's `ctxs`).
    n: candidates retrieved per example; k: passages given to the generator.
    use_reranker: sort the n candidates by P("True"); False keeps the retriever's order (the "w/o reranking"
      ablation, Table 3).
    generate_answers: False evaluates ranking only (no EM/F1/accuracy).
    chat_format: "chatqa" (the paper's plain text) or "chat_template" (the model's own).
    max_new_tokens: default per task (32 QA, 8 FEVER, 128 conversational; §5.1).
    limit, offset: evaluate this slice of the dataset (in file order).
    chunk_size: examples per generation batch and per flush of predictions.jsonl.
    recall_ks: the k of Recall@k.
    system_name: the row name in the summary table (default: derived from the settings).
    overwrite: delete out_dir's predictions, settings and summary first (a fresh run whatever they were).
  """
  dataset, corpus = resolve_path(dataset), resolve_path(corpus)
  if retriever not in RETRIEVERS:
    raise EvalError(f"retriever must be one of {RETRIEVERS}, got {retriever!r}")
  if n < 1 or k < 1 or chunk_size < 1:
    raise EvalError(f"n, k and chunk_size must be >= 1, got n={n}, k={k}, chunk_size={chunk_size}")
  if retriever != "given" and not (corpus and os.path.isfile(corpus)):
    raise EvalError(f"corpus {corpus}: no such file (needed by retriever={retriever!r})")
  examples = read_eval_dataset(dataset, task, on_error)[offset:None if limit is None else offset + limit]
  out = pathlib.Path(out_dir)
  prepare_out_dir(out, prediction_settings(dataset, task, checkpoint, corpus, retriever, n, k, use_reranker,
                                           generate_answers, chat_format, max_new_tokens, recall_ks), overwrite)
  predictions = out / "predictions.jsonl"
  finished = load_finished(predictions)
  todo = [e for e in examples if e["id"] not in finished]
  system_name = system_name or "{} top-{}{}{}".format(
      retriever, n, f" -> {pathlib.Path(checkpoint).name} P(True)" if use_reranker else "",
      f" -> generate top-{k}" if generate_answers else "")
  print_fn(f"{system_name}: {len(examples)} examples, {len(examples) - len(todo)} already in {predictions}")

  timings = {"index_s": 0.0, "load_s": 0.0}
  if todo:
    start = time.perf_counter()
    corpus_obj = search = None
    if retriever != "given":
      corpus_obj = corpus_lib.read_corpus_jsonl(corpus)
      search = rag.build_search(corpus_obj, retriever)
    timings["index_s"] = time.perf_counter() - start
    start = time.perf_counter()
    model = rag.load_rag_model(checkpoint) if use_reranker or generate_answers else None
    timings["load_s"] = time.perf_counter() - start
    budget = max_new_tokens or max_new_tokens_for_task(task)
    bar = tqdm.tqdm(total=len(examples), initial=len(examples) - len(todo), desc=system_name[:40],
                    disable=not show_progress, file=sys.stderr)
    with open(predictions, "a", encoding="utf-8") as sink:
      for start_index in range(0, len(todo), chunk_size):
        chunk = todo[start_index:start_index + chunk_size]
        start = time.perf_counter()
        candidates = retrieve(chunk, corpus_obj, search, n)
        retrieve_s = (time.perf_counter() - start) / len(chunk)
        start = time.perf_counter()
        reranked = (rerank_candidates(model, chunk, candidates, task, chat_format) if use_reranker
                    else [(cands, 0) for cands in candidates])
        rerank_s = (time.perf_counter() - start) / len(chunk)  # the chunk is scored in one pass.
        records, prompt_ids = [], []
        for example, (ranked, truncated) in zip(chunk, reranked):
          record = {"id": example["id"], "question": example["question"],
                    **({"label": example["label"]} if task == "fever" else {"answers": example["answers"]}),
                    "gold_ids": example["gold_ids"], "retrieve_s": retrieve_s,
                    "rerank_s": rerank_s, "num_truncated_ranking": truncated,
                    "ranked": [{key: c[key] for key in ("id", "retrieval_rank", "retrieval_score", "p_true",
                                                        "p_true_normalised") if key in c} for c in ranked]}
          if generate_answers:
            ids, cut = rag.generation_prompt(model, example["question"], [c["text"] for c in ranked[:k]], task,
                                             chat_format, budget, example["history"])
            prompt_ids.append(ids)
            record["num_truncated_generation"] = cut
          records.append((example, ranked, record))
        start = time.perf_counter()
        outputs = (generate(model.params, model.config, prompt_ids, budget, model.tokenizer.stop_ids,
                            mesh=model.mesh, decode_weights=model.decode_weights, kv_buffers=model.kv_buffers)
                   if generate_answers else [None] * len(chunk))
        generate_s = (time.perf_counter() - start) / len(chunk)
        for (example, ranked, record), ids in zip(records, outputs):
          answer = None if ids is None else model.tokenizer.decode(ids, skip_special_tokens=True).strip()
          if answer is not None:
            record.update(answer=answer, generate_s=generate_s)
          record["metrics"] = example_metrics(example, ranked, answer, task, recall_ks)
          sink.write(json.dumps(record, ensure_ascii=False) + "\n")
          finished[record["id"]] = record
        sink.flush()
        os.fsync(sink.fileno())
        bar.update(len(chunk))
    bar.close()

  rows = [finished[e["id"]]["metrics"] for e in examples if e["id"] in finished]
  names = sorted({name for row in rows for name in row}, key=_metric_order)
  summary = metrics.summarize(rows, names)
  metrics.write_summary_table({system_name: summary}, out, title=f"{pathlib.Path(dataset).name} ({task})")
  stage = {f"mean_{s}": float(np.mean([finished[e["id"]].get(s, 0.0) for e in examples if e["id"] in finished]))
           for s in ("retrieve_s", "rerank_s", "generate_s")}
  run_info = {"system": system_name, "dataset": os.path.abspath(dataset), "task": task, "checkpoint": checkpoint,
              "corpus": corpus and os.path.abspath(corpus), "retriever": retriever, "n": n, "k": k,
              "use_reranker": use_reranker, "generate_answers": generate_answers, "chat_format": chat_format,
              "offset": offset, "limit": limit, "examples": len(examples), **timings, **stage, "summary": summary}
  (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
  print_fn((out / "summary.md").read_text())
  return summary


def _metric_order(name: str):
  head, _, k = name.partition("@")
  return (["EM", "F1", "Acc", "R", "goldR", "MRR"].index(head) if head in ("EM", "F1", "Acc", "R", "goldR", "MRR")
          else 9, int(k) if k.isdigit() else 0, name)


FLAGS = flags.FLAGS
if "gin_file" not in FLAGS:  # rankrag_jax.rag (imported above) may already define the same two flags.
  flags.DEFINE_multi_string("gin_file", [], "Gin files (gin_configs/eval/*.gin).")
if "gin_bindings" not in FLAGS:
  flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. run_evaluation.limit=50.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.keep_freed_host_memory()  # before JAX starts its backend
  try:
    gin.parse_config_files_and_bindings(FLAGS.gin_file, FLAGS.gin_bindings)
    run_evaluation()
  except (ValueError, OSError, KeyError, assets.AssetError) as e:
    message = str(e)
    print(f"evaluate: error: {message.splitlines()[0] if message else type(e).__name__}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
