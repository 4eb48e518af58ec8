"""Ranking and QA metrics while training: a run whose ranking gets worse is visible while it runs.

On a fixed slice of questions the run never trains on, each evaluation scores every question's BM25 top-`depth`
passages by P("True") with the current weights (`rerank.score_questions`: all questions in one pass) and reports

  rank/auc        pairwise AUC of P("True"): over every (answer passage, other passage) pair of one question, the
                  share the model orders right (ties count half). 0.5 is chance. `rank/bm25_auc`: BM25's order's.
  rank/auc_on_topic  the same over cleaner labels, where the slice has them: positive = an answer passage whose
                  title is on the question's topic (`blend.title_on_topic`), negative = a passage without an answer
                  (most answer matches in a small corpus are coincidental); beside `rank/bm25_auc_on_topic`.
  rank/recall@k   answer-Recall@k of the reranked top-`depth`, beside `rank/bm25_recall@k` (BM25's own order).
  qa/em, qa/f1    of greedy answers generated from the reranked top-`k` (App. D prompt), when `generate_answers`;
                  `qa/em_bm25`, `qa/f1_bm25` from BM25's own top-`k` (the same weights, without reranking).

The slice (`ranking_questions`): by default the NQ questions of the default blend's "validation" split (a hash of
the question id, the same split that keeps their examples out of training), that have both an answer-bearing and
an answer-free passage in their BM25 top `depth`; or any DPR/FlashRAG JSONL (`source`). The final held-out split
(EfficientQA test) is not used here, so no recipe is tuned on it.
"""

import dataclasses
import json
import pathlib
import time

from absl import logging
import gin
import numpy as np

from rankrag_jax import assets, metrics, rag, rerank
from rankrag_jax.data import answers as answers_lib
from rankrag_jax.data import readers
from rankrag_jax.generate import generate
from rankrag_jax.model.config import LlamaConfig
from rankrag_jax.retrieval import bm25
from rankrag_jax.retrieval import corpus as corpus_lib

RECALL_KS = (1, 5)


def ranking_aucs(scores: list[np.ndarray], questions: list[dict], prefix: str = "rank/") -> dict:
  """`{prefix}auc` of per-question scores over the answer labels and, for questions with `on_topic` labels,
  `{prefix}auc_on_topic` (answer passages off the topic left out of the pairs)."""
  result = {f"{prefix}auc": pooled_auc([(s, q["labels"]) for s, q in zip(scores, questions)])}
  if all("on_topic" in q for q in questions):
    keep = [q["on_topic"] | ~q["labels"] for q in questions]
    result[f"{prefix}auc_on_topic"] = pooled_auc([(s[k], q["on_topic"][k])
                                                  for s, q, k in zip(scores, questions, keep)])
  return result


def auc(scores: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
  """(Share of (positive, negative) pairs with the positive scored higher, ties half; number of pairs)."""
  pos, neg = scores[labels], scores[~labels]
  if not len(pos) or not len(neg):
    return float("nan"), 0
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return float(wins), len(pos) * len(neg)


def pooled_auc(per_question: list[tuple[np.ndarray, np.ndarray]]) -> float:
  """Pairwise AUC over every question's own (positive, negative) pairs, pooled (questions with more pairs weigh
  more, as every pair counts once)."""
  wins, pairs = 0.0, 0
  for scores, labels in per_question:
    w, n = auc(scores, labels)
    if n:
      wins, pairs = wins + w, pairs + n
  return wins / pairs if pairs else float("nan")


@gin.configurable
def ranking_questions(source: str = "validation", num_questions: int = 24, depth: int = 20,
                      blend_dir: str | None = None, validation_fraction: float | None = None) -> list[dict]:
  """The fixed evaluation slice: [{id, question, answers, passages (BM25 order), labels}].

  Args:
    source: "validation" (the default blend's validation-split NQ questions) or a DPR/FlashRAG JSONL path
      (`blend:heldout.jsonl` names the blend's held-out file).
    num_questions: the first this many usable questions (file order).
    depth: BM25 candidates per question (over the blend's corpus.jsonl).
    blend_dir: the blend directory (default: the Gin-bound `register_blend_tasks.data_dir`).
    validation_fraction: default: the Gin-bound `register_blend_tasks.validation_fraction`.
  """
  from rankrag_jax.data import blend, tasks  # local: pulls in tensorflow/seqio
  bindings = gin.get_bindings(tasks.register_blend_tasks)
  directory = pathlib.Path(blend_dir or bindings.get("data_dir") or tasks.default_blend_dir())
  if source == "validation":
    fraction = validation_fraction if validation_fraction is not None else bindings.get("validation_fraction", 0.02)
    root = assets.asset_file("nq_open")
    rows = [r for name in blend.NQ_TRAIN_FILES for r in readers.read_qa_jsonl(root / name)
            if tasks.split_of(r, fraction) == "validation"]
  else:
    path = str(directory / source[len("blend:"):]) if source.startswith("blend:") else source
    rows = list(readers.read_qa_jsonl(path))
  corpus = corpus_lib.read_corpus_jsonl(directory / "corpus.jsonl")
  title_of = dict(zip(corpus.ids, corpus.titles))
  ids, _ = bm25.search_bm25(bm25.build_bm25_index(corpus), [r["question"] for r in rows], depth)
  chosen = []
  for row, hits in zip(rows, ids):
    passages = corpus.passages_by_id([str(i) for i in hits])
    labels = np.asarray([answers_lib.has_answer(p, row["answers"]) for p in passages])
    if labels.any() and not labels.all():
      on_topic = labels & np.asarray([blend.title_on_topic(row["question"], {"title": title_of[str(i)]},
                                                           row["answers"]) for i in hits])
      chosen.append({"id": row["id"], "question": row["question"], "answers": row["answers"],
                     "passages": passages, "labels": labels, "on_topic": on_topic})
    if len(chosen) == num_questions:
      break
  if not chosen:
    raise ValueError(f"ranking_questions: no question of {source!r} has an answer passage in its BM25 top {depth}")
  return chosen


@gin.configurable
@dataclasses.dataclass
class RankingEval:
  """Scores the slice with the current params; `evaluate` returns the metrics (see the module docstring)."""
  questions: list = dataclasses.field(default_factory=list)  # ranking_questions() when empty
  k: int = 5
  chat_format: str = "chatqa"
  generate_answers: bool = True
  max_new_tokens: int = 16

  def __post_init__(self):
    self.questions = self.questions or ranking_questions()
    # BM25's own numbers on the slice, for reference beside the model's.
    self.bm25_reference = {f"rank/bm25_recall@{k}": float(np.mean([q["labels"][:k].any() for q in self.questions]))
                           for k in RECALL_KS}
    # The passages are in BM25's order: a descending score per position.
    bm25_scores = [-np.arange(len(q["labels"]), dtype=np.float32) for q in self.questions]
    self.bm25_reference.update(ranking_aucs(bm25_scores, self.questions, prefix="rank/bm25_"))

  def evaluate(self, params: dict, config: LlamaConfig, tokenizer) -> dict:
    start = time.perf_counter()
    # The inference layout of the same weights: training-only reformulations (remat, query blocks) off.
    config = dataclasses.replace(config, remat_policy="none", attention_query_block=0, flatten_matmul_tokens=False)
    scores = rerank.score_questions(params, config, tokenizer, [(q["question"], q["passages"])
                                                                for q in self.questions], chat_format=self.chat_format)
    orders = [np.argsort(-s.p_true, kind="stable") for s in scores]
    result = {**ranking_aucs([s.p_true for s in scores], self.questions),
              **{f"rank/recall@{k}": float(np.mean([q["labels"][o[:k]].any() for q, o in zip(self.questions, orders)]))
                 for k in RECALL_KS},
              **self.bm25_reference, "rank/questions": len(self.questions)}
    if self.generate_answers:
      # Answers from the reranked top k and, beside them, from BM25's own top k (the same weights): EM with
      # reranking against EM without, in one generate call.
      model = rag.RagModel(config, params, tokenizer, decode_weights=None)
      bm25_orders = [np.arange(len(q["passages"])) for q in self.questions]
      prompt_ids = [rag.generation_prompt(model, q["question"], [q["passages"][i] for i in o[:self.k]],
                                          max_new_tokens=self.max_new_tokens, chat_format=self.chat_format)[0]
                    for q, o in zip(self.questions + self.questions, orders + bm25_orders)]
      outputs = generate(params, config, prompt_ids, self.max_new_tokens, tokenizer.stop_ids, decode_weights=None)
      predictions = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]
      n = len(self.questions)
      for suffix, answers in (("", predictions[:n]), ("_bm25", predictions[n:])):
        result[f"qa/em{suffix}"] = float(np.mean([metrics.exact_match_score(p, q["answers"])
                                                  for p, q in zip(answers, self.questions)]))
        result[f"qa/f1{suffix}"] = float(np.mean([metrics.f1_score(p, q["answers"])
                                                  for p, q in zip(answers, self.questions)]))
    result["rank/eval_seconds"] = time.perf_counter() - start
    return result

  @staticmethod
  def describe(result: dict) -> str:
    text = f"ranking AUC {result['rank/auc']:.3f} (BM25 {result['rank/bm25_auc']:.3f}), "
    if "rank/auc_on_topic" in result:
      text += f"on-topic {result['rank/auc_on_topic']:.3f} (BM25 {result['rank/bm25_auc_on_topic']:.3f}), "
    text += ", ".join(f"R@{k} {result[f'rank/recall@{k}']:.3f} (BM25 {result[f'rank/bm25_recall@{k}']:.3f})"
                      for k in RECALL_KS)
    if "qa/em" in result:
      text += (f", EM {result['qa/em']:.3f} F1 {result['qa/f1']:.3f} "
               f"(without reranking: EM {result['qa/em_bm25']:.3f} F1 {result['qa/f1_bm25']:.3f})")
    return text + f" on {result['rank/questions']} questions ({result['rank/eval_seconds']:.0f}s)"


def write_slice(questions: list[dict], path) -> None:
  """The slice as JSONL (for the record: which questions the run's curves are on)."""
  with open(path, "w", encoding="utf-8") as f:
    for q in questions:
      f.write(json.dumps({"id": q["id"], "question": q["question"], "answers": q["answers"],
                          "positives": int(q["labels"].sum()), "passages": len(q["labels"])}) + "\n")
  logging.info("ranking-eval slice written to %s", path)
