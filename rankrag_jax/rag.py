"""RankRAG inference (§4.3) as a command: retrieve top-N, rerank by P("True"), generate from the top-k.

    python -m rankrag_jax.rag --checkpoint smollm2_135m_instruct --corpus corpus.jsonl \\
        --question "who wrote hamlet?" --n 100 --k 5
    python -m rankrag_jax.rag --checkpoint ckpt_dir --corpus corpus.jsonl --questions q.jsonl --out preds.jsonl \\
        [--retriever bm25|dense] [--abstain_threshold 0.1] [--chat_format chatqa|chat_template]
        [--task open_domain_qa|fever] [--gin_file run.gin --gin_bindings "generate.temperature = 0.7"]

`--checkpoint` is anything `convert.load.load_model` reads: a model asset name, a `.gguf` file, or an HF directory;
with LoRA, a PEFT adapter directory (its base from adapter_config.json, e.g. a LoRA run's `hf_peft/`) or the LoRA
run directory itself (base + adapters merged once at load); Gin `load_rag_model.adapter` puts a PEFT adapter on
any base.
The questions file is JSONL with a `question` field (optional `id`, `answers`, passed through). Each answer comes
with its kept passages and their scores (P("True") over the full vocabulary, and P(True)/(P(True)+P(False))), and
the command reports the time spent in each stage. Errors in the inputs end the command with a one-line message
naming the file or flag, and exit code 2.
"""

import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Callable, Sequence

from absl import app, flags
import gin
import jax
import numpy as np

# Every Gin-configurable module is imported here, before --gin_file is parsed (Gin locks its registry then).
from rankrag_jax import assets, cli, prompts, rerank, sharding
from rankrag_jax.convert import load
from rankrag_jax.generate import KVBuffers, generate, max_new_tokens_for_task
from rankrag_jax.model.config import LlamaConfig
from rankrag_jax.backends.cpu.decode import DecodeWeights, make_decode_weights
from rankrag_jax.model.llama import param_logical_axes
from rankrag_jax.retrieval import bm25, dense
from rankrag_jax.retrieval import corpus as corpus_lib

TASKS = ("open_domain_qa", "fever")
RETRIEVERS = ("bm25", "dense")

Search = Callable[[Sequence[str], int], tuple[np.ndarray, np.ndarray]]


class RagError(ValueError):
  """Bad command input (flag, question file, checkpoint); the message names the flag or file:line."""


@dataclasses.dataclass(frozen=True, eq=False)
class RagModel:
  """One Llama that both reranks and generates, with its tokenizer, (on >1 device) the mesh, the weights
  generation decodes from (`backends.cpu.decode.make_decode_weights`: made once at load; "auto": per generate call)
  and the KV cache memory its calls reuse (`generate.KVBuffers`)."""
  config: LlamaConfig
  params: dict
  tokenizer: object
  mesh: jax.sharding.Mesh | None = None
  decode_weights: DecodeWeights | None | str = "auto"
  kv_buffers: KVBuffers = dataclasses.field(default_factory=KVBuffers)


def place_on_mesh(params: dict, config: LlamaConfig, mesh: jax.sharding.Mesh) -> dict:
  """Puts params on `mesh` as the logical rules say: replicated on a pure data-parallel mesh, split over its
  fsdp / tensor axes otherwise (for models too big for one device)."""
  shardings = sharding.logical_to_sharding(param_logical_axes(config), mesh, sharding.logical_axis_rules())
  sharding.check_divisible(params, shardings)
  return jax.device_put(params, shardings)


@gin.configurable(denylist=["checkpoint"])
def load_rag_model(checkpoint: str, mesh_from_gin: bool = False, adapter: str | None = None) -> RagModel:
  """Loads `checkpoint` with `load_model`, placing it on a mesh when there is more than one device.

  Args:
    checkpoint: a model asset name, a .gguf file, an HF directory, a PEFT adapter directory or a LoRA run.
    adapter: a PEFT adapter directory merged into `checkpoint` (the base) at load.
    mesh_from_gin: False: a pure data-parallel mesh over all devices (params replicated, batches split), the
      fastest for models that fit one device. True: `sharding.make_mesh()` as Gin configures it (e.g. FSDP for
      70B); batches are then split over its data and fsdp axes.
  """
  if not checkpoint:
    raise RagError("--checkpoint is required (a .gguf file, an HF directory, or 'smollm2_135m_instruct')")
  config, params, tokenizer = load.load_model(checkpoint, adapter=adapter)
  if tokenizer is None:
    raise RagError(f"--checkpoint {checkpoint}: no tokenizer found (put tokenizer.json next to config.json)")
  mesh = None
  if jax.device_count() > 1:
    mesh = sharding.make_mesh() if mesh_from_gin else sharding.make_mesh(data=-1, fsdp=1, tensor=1)
    params = place_on_mesh(params, config, mesh)
  return RagModel(config, params, tokenizer, mesh, make_decode_weights(params, config, mesh))


def build_search(corpus, kind: str = "bm25") -> Search:
  """A `search(queries, n) -> (ids [Q, n], scores [Q, n])` over `corpus` with BM25 or the dense retriever."""
  if kind == "bm25":
    index = bm25.build_bm25_index(corpus)
    return lambda queries, n: bm25.search_bm25(index, list(queries), n)
  if kind == "dense":
    retriever = dense.build_dense_retriever(corpus)
    return lambda queries, n: retriever.search(list(queries), n)
  raise RagError(f"--retriever must be one of {RETRIEVERS}, got {kind!r}")


def read_questions(path: str) -> list[dict]:
  """Reads a questions JSONL (`question` required; `id`, `answers` optional); errors name file:line."""
  if not os.path.isfile(path):
    raise RagError(f"--questions {path}: no such file")
  questions = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise RagError(f"{path}:{number}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict) or not isinstance(row.get("question"), str):
        raise RagError(f"{path}:{number}: field 'question' is missing or not a string")
      if not row["question"].strip():
        raise RagError(f"{path}:{number}: field 'question' is empty")
      questions.append({"id": str(row.get("id", f"q{len(questions)}")), **row})
  if not questions:
    raise RagError(f"{path}: no questions (expected one JSON object per line with a 'question' field)")
  return questions


def _passage_texts(corpus, ids) -> list[str]:
  return corpus.passages_by_id([str(i) for i in ids])


def rank_questions(model: RagModel, items: Sequence[tuple[str, Sequence[str]]], task: str = "open_domain_qa",
                   chat_format: str = "chatqa", max_prompt_tokens: int | None = None
                   ) -> list[tuple[np.ndarray, rerank.PassageScores]]:
  """The rerank stage for several (question, passages) items in one scoring pass: per item, the passage indices
  by P("True"), best first, and the scores (in the given order). The sort is stable: ties keep the retriever's
  order."""
  scores = rerank.score_questions(model.params, model.config, model.tokenizer, items, chat_format=chat_format,
                                  claim=task == "fever", max_prompt_tokens=max_prompt_tokens, mesh=model.mesh)
  return [(np.argsort(-s.p_true, kind="stable"), s) for s in scores]


def rank_passages(model: RagModel, question: str, passages: Sequence[str], task: str = "open_domain_qa",
                  chat_format: str = "chatqa", max_prompt_tokens: int | None = None
                  ) -> tuple[np.ndarray, rerank.PassageScores]:
  """`rank_questions` for one question."""
  return rank_questions(model, [(question, passages)], task, chat_format, max_prompt_tokens)[0]


def generation_prompt(model: RagModel, question: str, passages: Sequence[str], task: str = "open_domain_qa",
                      chat_format: str = "chatqa", max_new_tokens: int = 32, history: Sequence[dict] = (),
                      max_prompt_tokens: int | None = None) -> tuple[list[int], int]:
  """The generate stage's prompt (App. D) over the kept passages: (token ids, passages cut). Passage tails are
  cut so that prompt + `max_new_tokens` fit the context window."""
  if task == "fever":
    make = lambda ps: prompts.fever_generation_prompt_example(question, ps)
  else:
    make = lambda ps: prompts.generation_prompt_example(question, ps, history)
  render = lambda ps: prompts.render_prompt(make(ps), chat_format, model.tokenizer)
  window = (max_prompt_tokens or model.config.max_position_embeddings) - max_new_tokens
  return rerank.fit_passages_to_window(render, model.tokenizer, list(passages), window)


@gin.configurable(denylist=["model", "corpus", "search", "questions"])
def answer_questions(model: RagModel, corpus, search: Search, questions: Sequence[dict], n: int = 100, k: int = 5,
                     task: str = "open_domain_qa", chat_format: str = "chatqa",
                     abstain_threshold: float | None = None, max_new_tokens: int | None = None,
                     max_prompt_tokens: int | None = None) -> tuple[list[dict], dict]:
  """Retrieve -> rerank -> generate for each question; returns (one record per question, stage timings in s).

  Args:
    model: the reranker/generator.
    corpus: a `retrieval.corpus.Corpus`.
    search: `build_search`'s retriever over `corpus`.
    questions: dicts with `question` (and anything else, passed through).
    n: retrieved candidates per question (the paper: 100 for 8B, 30 for 70B).
    k: passages kept for generation (the paper: 5).
    task: "open_domain_qa" or "fever" (claim prompts for ranking and generation, App. D).
    chat_format: "chatqa" (the paper's plain text) or "chat_template" (the model's own, e.g. SmolLM2's ChatML).
    abstain_threshold: when the best kept P("True") is below it, answer prompts.UNANSWERABLE_ANSWER without
      generating (the ChatQA system turn asks the model to say so).
    max_new_tokens: generation budget; default per task (`max_new_tokens_for_task`).
    max_prompt_tokens: the context window; default the model's max_position_embeddings.
  """
  if task not in TASKS:
    raise RagError(f"--task must be one of {TASKS}, got {task!r}")
  if n < 1 or k < 1:
    raise RagError(f"--n and --k must be >= 1, got n={n}, k={k}")
  texts = [q["question"].strip() for q in questions]
  if any(not t for t in texts):
    raise RagError("the question is empty")
  n = min(n, len(corpus))
  k = min(k, n)
  max_new_tokens = max_new_tokens or max_new_tokens_for_task(task)
  window = max_prompt_tokens or model.config.max_position_embeddings
  timings = {"retrieve_s": 0.0, "rerank_s": 0.0, "generate_s": 0.0}

  start = time.perf_counter()
  retrieved_ids, retrieved_scores = search(texts, n)
  timings["retrieve_s"] = time.perf_counter() - start

  records, prompt_ids, to_generate = [], [], []
  for i, (question, text) in enumerate(zip(questions, texts)):
    start = time.perf_counter()
    candidates = _passage_texts(corpus, retrieved_ids[i])
    order, scores = rank_passages(model, text, candidates, task, chat_format, window)
    elapsed = time.perf_counter() - start
    timings["rerank_s"] += elapsed
    kept = order[:k]
    record = {**question, "question": text,
              "passages": [{"id": str(retrieved_ids[i][j]), "p_true": float(scores.p_true[j]),
                            "p_true_normalised": float(scores.p_true_normalised[j]),
                            "retrieval_score": float(retrieved_scores[i][j]), "retrieval_rank": int(j) + 1,
                            "text": candidates[j]} for j in kept],
              "num_retrieved": len(candidates), "num_truncated_ranking": scores.num_truncated,
              "rerank_s": elapsed}
    best = float(scores.p_true[kept[0]])
    record["abstained"] = abstain_threshold is not None and best < abstain_threshold
    if record["abstained"]:
      record["answer"] = prompts.UNANSWERABLE_ANSWER
    else:
      ids, cut = generation_prompt(model, text, [candidates[j] for j in kept], task, chat_format, max_new_tokens,
                                   max_prompt_tokens=window)
      record["num_truncated_generation"] = cut
      prompt_ids.append(ids)
      to_generate.append(record)
    records.append(record)

  start = time.perf_counter()
  outputs = generate(model.params, model.config, prompt_ids, max_new_tokens, model.tokenizer.stop_ids,
                     mesh=model.mesh, decode_weights=model.decode_weights,
                     kv_buffers=model.kv_buffers)
  timings["generate_s"] = time.perf_counter() - start
  for record, ids in zip(to_generate, outputs):
    record["answer"] = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
  return records, timings


def format_record(record: dict) -> str:
  """A human-readable answer with its kept passages."""
  lines = [f"Question: {record['question']}", f"Answer: {record['answer']}"
           + ("  (abstained: best P(True) below the threshold)" if record["abstained"] else ""),
           "Kept passages (P(True), P(True)/(P(True)+P(False)), retrieval rank, id):"]
  for rank, p in enumerate(record["passages"], start=1):
    snippet = " ".join(p["text"].split())
    snippet = snippet if len(snippet) <= 160 else snippet[:157] + "..."
    lines.append(f"  {rank}. {p['p_true']:.4f}  {p['p_true_normalised']:.4f}  #{p['retrieval_rank']:<3d} "
                 f"[{p['id']}] {snippet}")
  return "\n".join(lines)


def run(checkpoint: str, corpus_path: str, question: str | None = None, questions_path: str | None = None,
        out: str | None = None, n: int = 100, k: int = 5, retriever: str = "bm25",
        abstain_threshold: float | None = None, chat_format: str | None = None, task: str | None = None,
        print_fn=print) -> list[dict]:
  """The command: validates inputs cheaply first (before loading any model), then runs the pipeline."""
  if (question is None) == (questions_path is None):
    raise RagError("give exactly one of --question or --questions")
  if question is not None and not question.strip():
    raise RagError("--question is empty")
  if retriever not in RETRIEVERS:
    raise RagError(f"--retriever must be one of {RETRIEVERS}, got {retriever!r}")
  if not corpus_path or not os.path.isfile(corpus_path):
    raise RagError(f"--corpus {corpus_path}: no such file")
  questions = read_questions(questions_path) if questions_path else [{"id": "q0", "question": question}]
  timings = {}
  start = time.perf_counter()
  corpus = corpus_lib.read_corpus_jsonl(corpus_path)
  search = build_search(corpus, retriever)
  timings["index_s"] = time.perf_counter() - start
  start = time.perf_counter()
  model = load_rag_model(checkpoint)
  timings["load_s"] = time.perf_counter() - start
  # Flags that are not given leave Gin's bindings (or the defaults) in force.
  overrides = {name: value for name, value in (("chat_format", chat_format), ("task", task)) if value}
  records, stage_timings = answer_questions(model, corpus, search, questions, n=n, k=k,
                                            abstain_threshold=abstain_threshold, **overrides)
  timings.update(stage_timings)
  timing_text = ", ".join(f"{name[:-2]} {seconds:.2f}s" for name, seconds in timings.items())
  truncated = sum(r["num_truncated_ranking"] + r.get("num_truncated_generation", 0) for r in records)
  if out:
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
      for record in records:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print_fn(f"Wrote {len(records)} answers to {out}")
  else:
    for record in records:
      print_fn(format_record(record) + "\n")
  print_fn(f"Passages truncated to fit the context window: {truncated}")
  print_fn(f"Timings ({len(records)} question(s)): {timing_text}")
  return records


FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A .gguf file, an HF directory, or a model asset name.")
flags.DEFINE_string("corpus", None, "Corpus JSONL: one {id, title, text} per line.")
flags.DEFINE_string("question", None, "One question to answer.")
flags.DEFINE_string("questions", None, "Questions JSONL ({question, id?, answers?} per line).")
flags.DEFINE_string("out", None, "Write answers as JSONL here (default: print them).")
flags.DEFINE_integer("n", 100, "Retrieved candidates per question.")
flags.DEFINE_integer("k", 5, "Reranked passages kept for generation.")
flags.DEFINE_enum("retriever", "bm25", RETRIEVERS, "First-stage retriever.")
flags.DEFINE_float("abstain_threshold", None, "Answer 'cannot find' when the best P(True) is below this.")
flags.DEFINE_enum("chat_format", None, prompts.CHAT_FORMATS,
                  "Prompt rendering: the paper's plain 'chatqa' text (default) or the model's 'chat_template'.")
flags.DEFINE_enum("task", None, TASKS, "open_domain_qa (default; 32 new tokens) or fever (claim prompts; 8).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.keep_freed_host_memory()  # before JAX starts its backend
  try:
    cli.parse_gin()  # --gin_file / --gin_bindings, e.g. answer_questions.task='fever', generate.temperature.
    run(FLAGS.checkpoint, FLAGS.corpus, FLAGS.question, FLAGS.questions, FLAGS.out, FLAGS.n, FLAGS.k,
        FLAGS.retriever, FLAGS.abstain_threshold, FLAGS.chat_format, FLAGS.task)
  except (ValueError, OSError, assets.AssetError) as e:
    # Input errors (ours, the corpus reader's, load_model's, gin's, assets') carry a message naming the file or
    # field; the traceback would only bury it.
    message = str(e)
    print(f"rag: error: {message.splitlines()[0] if message else type(e).__name__}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
