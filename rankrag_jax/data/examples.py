"""Small named builders: raw records -> Example dicts (docs/DESIGN.md schema), one per Stage-II task.

Each builder is a pure function of its records (plus a seed where it shuffles or samples; every example's
randomness comes from `random.Random(f"{seed}/{example id}")`, so it does not depend on record order or on
the other examples). Inputs are plain dicts:

  qa record        {id, question, answers: [str], gold_passage: str, retrieved | negatives: [str]}
  reading record   {id, question, passage, answer}
  dialogue         {id, document, turns: [{user, assistant, rationale?}]}
  claim record     {id, claim, evidence, relevant: bool}
  sft record       {id, turns: [{user, assistant}]}
"""

import collections
import random
from typing import Sequence

from rankrag_jax import prompts
from rankrag_jax.data.answers import has_answer, ngram_recall

RA_NUM_PASSAGES = 5  # RankRAG §4.2: gold + BM25 contexts, 5 in total.


def example_rng(seed: int, example_id: str) -> random.Random:
  """A per-example RNG: string seeds are hashed with SHA-512 by `random`, stable across runs and processes."""
  return random.Random(f"{seed}/{example_id}")


def build_context_rich_qa_examples(records: Sequence[dict], *, component: str, dataset: str | None = None
                                   ) -> list[dict]:
  """One passage + question -> answer, with the dataset's App. C.2 instruction (Table 1: context-rich QA)."""
  return [prompts.make_example(component=component, example_id=r["id"], task="context_rich_qa",
                               passages=[r["passage"]], passage_style="single",
                               turns=[{"user": prompts.context_rich_qa_question(r["question"], dataset),
                                       "assistant": r["answer"]}])
          for r in records]


def ra_passages(record: dict, seed: int, num_passages: int = RA_NUM_PASSAGES) -> tuple[list[str], int]:
  """Gold + the first num_passages-1 retrieved contexts, shuffled per example; returns (passages, gold index)."""
  others = list(record["retrieved"][:num_passages - 1])
  if len(others) < num_passages - 1:
    raise ValueError(f"{record['id']}: {len(others)} retrieved contexts, need {num_passages - 1}")
  passages = [record["gold_passage"], *others]
  order = list(range(num_passages))
  example_rng(seed, record["id"]).shuffle(order)
  return [passages[i] for i in order], order.index(0)


def build_ra_qa_examples(records: Sequence[dict], *, component: str, seed: int,
                         num_passages: int = RA_NUM_PASSAGES) -> list[dict]:
  """Retrieval-augmented QA: 5 numbered passages (gold among them, seeded shuffle) -> the first answer."""
  examples = []
  for r in records:
    passages, _ = ra_passages(r, seed, num_passages)
    examples.append(prompts.make_example(
        component=component, example_id=r["id"], task="ra_qa", passages=passages, passage_style="numbered",
        turns=[{"user": prompts.ra_qa_question(r["question"]), "assistant": r["answers"][0]}]))
  return examples


def build_ra_ranking_examples(records: Sequence[dict], *, component: str, seed: int,
                              num_passages: int = RA_NUM_PASSAGES) -> list[dict]:
  """Retrieval-augmented ranking: the same 5 passages as `build_ra_qa_examples` for a record -> relevant ids.

  Relevant = the gold passage plus every other passage containing an answer string (§4.2); label is the
  sorted 1-based ids, the target `prompts.ra_ranking_answer` ("Passage 2, Passage 4").
  """
  examples = []
  for r in records:
    passages, gold_index = ra_passages(r, seed, num_passages)
    relevant = sorted({gold_index + 1} | {i for i, p in enumerate(passages, 1) if has_answer(p, r["answers"])})
    examples.append(prompts.make_example(
        component=component, example_id=r["id"], task="ra_ranking", passages=passages, passage_style="numbered",
        turns=[{"user": prompts.ra_ranking_question(r["question"]),
                "assistant": prompts.ra_ranking_answer(relevant)}], label=relevant))
  return examples


def ranking_example(component, example_id, task, question_turn, passage, relevant, history=()) -> dict:
  return prompts.make_example(component=component, example_id=example_id, task=task, passages=[passage],
                              passage_style="single", label=relevant,
                              turns=[*history, {"user": question_turn, "assistant": prompts.ranking_answer(relevant)}])


def build_context_ranking_examples(records: Sequence[dict], *, component: str, negatives_per_question: int = 1
                                   ) -> list[dict]:
  """Context ranking pairs (§4.2): (q, gold) -> True, (q, BM25 negative) -> False; one pair per example."""
  examples = []
  for r in records:
    question_turn = prompts.context_ranking_question(r["question"])
    examples.append(ranking_example(component, f"{r['id']}/pos", "context_ranking", question_turn,
                                     r["gold_passage"], True))
    for j, negative in enumerate(r["negatives"][:negatives_per_question]):
      examples.append(ranking_example(component, f"{r['id']}/neg{j}", "context_ranking", question_turn,
                                       negative, False))
  return examples


def chunk_words(text: str, words_per_chunk: int = 150) -> list[str]:
  """Consecutive `words_per_chunk`-word chunks (§4.2 splits conversational documents into 150-word chunks)."""
  words = text.split()
  return [" ".join(words[i:i + words_per_chunk]) for i in range(0, len(words), words_per_chunk)]


def chunk_relevance(chunk: str, reference: str, relevant_above: float = 0.5, irrelevant_below: float = 0.1
                    ) -> bool | None:
  """§4.2: 4-gram recall of the chunk against the answer > 0.5 relevant, < 0.1 irrelevant, else None (dropped)."""
  recall = ngram_recall(chunk, reference, n=4)
  if recall > relevant_above:
    return True
  if recall < irrelevant_below:
    return False
  return None


def _unanswerable_to_chatqa(answer: str) -> str:
  return prompts.UNANSWERABLE_ANSWER if answer.strip().lower() == "unknown" else answer


def build_conversational_ranking_examples(dialogues: Sequence[dict], *, component: str, words_per_chunk: int = 150,
                                          relevant_above: float = 0.5, irrelevant_below: float = 0.1,
                                          dropped: collections.Counter | None = None) -> list[dict]:
  """Conversational ranking pairs: earlier turns kept, then the ranking question about the latest question.

  The reference for recall is the turn's rationale when the dataset has one (CoQA's free-form answers, e.g.
  "He DID.", are often not in the text) and the answer otherwise. Ambiguous chunks are counted in
  `dropped["ambiguous"]` when a Counter is passed.
  """
  examples = []
  for d in dialogues:
    chunks = chunk_words(d["document"], words_per_chunk)
    for t, turn in enumerate(d["turns"]):
      reference = turn.get("rationale") or turn["assistant"]
      history = [{"user": h["user"], "assistant": _unanswerable_to_chatqa(h["assistant"])} for h in d["turns"][:t]]
      for c, chunk in enumerate(chunks):
        relevant = chunk_relevance(chunk, reference, relevant_above, irrelevant_below)
        if relevant is None:
          if dropped is not None:
            dropped["ambiguous"] += 1
          continue
        examples.append(ranking_example(component, f"{d['id']}/turn{t}/chunk{c}", "conv_ranking",
                                         prompts.context_ranking_question(turn["user"]), chunk, relevant, history))
  return examples


def build_claim_ranking_examples(records: Sequence[dict], *, component: str) -> list[dict]:
  """Claim-evidence relevance with the FEVER ranking prompt (App. D); relevant = evidence decides the claim."""
  return [ranking_example(component, r["id"], "claim_ranking", prompts.claim_ranking_question(r["claim"]),
                           r["evidence"], bool(r["relevant"])) for r in records]


def build_sft_examples(records: Sequence[dict], *, component: str) -> list[dict]:
  """Stage-I SFT conversations: no system turn, no context, loss on the last answer (§4.1)."""
  return [prompts.make_example(component=component, example_id=r["id"], task="sft", system="", passages=[],
                               passage_style="none", turns=r["turns"]) for r in records]


def build_conversational_qa_examples(dialogues: Sequence[dict], *, component: str, seed: int,
                                     dataset: str | None = "coqa", cuts_per_dialogue: int = 1) -> list[dict]:
  """Multi-turn QA over one document: each dialogue cut after a seeded-random turn, whose answer is the target.

  The dataset instruction goes on the first user turn only (ChatQA-1.5's formatting). CoQA's "unknown" becomes
  ChatQA's unanswerable response, which the system turn asks for.
  """
  examples = []
  for d in dialogues:
    n = len(d["turns"])
    cuts = sorted(example_rng(seed, d["id"]).sample(range(1, n + 1), min(cuts_per_dialogue, n)))
    for cut in cuts:
      turns = [{"user": t["user"], "assistant": _unanswerable_to_chatqa(t["assistant"])} for t in d["turns"][:cut]]
      turns[0] = {**turns[0], "user": f"{prompts.DATASET_INSTRUCTIONS.get(dataset, prompts.CONTEXT_QA_INSTRUCTION)} "
                                      f"{turns[0]['user']}"}
      examples.append(prompts.make_example(component=component, example_id=f"{d['id']}/turn{cut - 1}",
                                           task="conv_qa", passages=[d["document"]], passage_style="single",
                                           turns=turns))
  return examples
