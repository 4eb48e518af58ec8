"""The embedded default Stage-II blend, built from real data that ships inside registry packages.

Sources (all BIG-bench 1.0.0 task files, Apache-2.0, each dataset under its own licence; the Wikipedia slice
from the gensim 4.4.0 wheel, CC BY-SA):
  disfl_qa/task.json            8,000 SQuAD-2.0 questions (disfluent rewrites) over 1,204 paragraphs:
                                context-rich QA, RA-QA, RA-ranking, context ranking; retrieval held-out set.
  natural_instructions/subtask028 DROP, subtask002 Quoref, subtask061 ROPES: context-rich QA, with the paper's
                                instruction "Answer the following question with a short span." (App. C.2).
  coqa_conversational_question_answering/coqa.test.json: conversational QA + conversational ranking.
  vitaminc_fact_verification:   claim-evidence relevance with the FEVER ranking prompt.
  natural_instructions (SFT_SUBTASKS): Natural Instructions v1 generation tasks as the Stage-I / SFT component.
  enwiki slice (~106 articles -> ~4.4k 100-word passages): distractors in the retrieval corpus.

disfl_qa is split by paragraph: every question of a held-out paragraph goes to `heldout.jsonl`, and held-out
paragraphs are neither examples nor BM25 candidates in training; they are in `corpus.jsonl` for evaluation.
"""

import collections
import json
import math
import pathlib
import random
import time

import gin
from absl import logging

from rankrag_jax import assets, prompts
from rankrag_jax.data import examples as builders
from rankrag_jax.data import negatives, readers, sources, wikipedia
from rankrag_jax.data.answers import has_answer

# component -> (task, source, the paper's Appendix-B blend entry it stands in for, or None).
COMPONENTS = {
    # SQuAD reading comprehension has an App. C.2 instruction (inherited from ChatQA) but no App. B ratio of its own.
    "disfl_qa_context_qa": ("context_rich_qa", "disfl_qa", None),
    "disfl_qa_ra_qa": ("ra_qa", "disfl_qa", "SQuAD RA-QA"),
    "disfl_qa_ra_ranking": ("ra_ranking", "disfl_qa", "SQuAD RA-ranking"),
    "disfl_qa_context_ranking": ("context_ranking", "disfl_qa", "MS MARCO ranking"),
    "drop_context_qa": ("context_rich_qa", "drop", "DROP"),
    "quoref_context_qa": ("context_rich_qa", "quoref", "Quoref"),
    "ropes_context_qa": ("context_rich_qa", "ropes", "ROPES"),
    "coqa_conv_qa": ("conv_qa", "coqa", "ConvQA"),
    "coqa_conv_ranking": ("conv_ranking", "coqa", "ConvQA ranking"),
    "vitaminc_claim_ranking": ("claim_ranking", "vitaminc", None),
    "natural_instructions_sft": ("sft", "natural_instructions", "SFT"),
}
DEFAULT_SIZES = {
    "disfl_qa_context_qa": 500, "disfl_qa_ra_qa": 800, "disfl_qa_ra_ranking": 300, "disfl_qa_context_ranking": 800,
    "drop_context_qa": 400, "quoref_context_qa": 250, "ropes_context_qa": 250, "coqa_conv_qa": 700,
    "coqa_conv_ranking": 400, "vitaminc_claim_ranking": 400, "natural_instructions_sft": 800,
}
SOURCE_FILES = {
    "disfl_qa": "disfl_qa/task.json",
    "drop": "natural_instructions/subtask028_drop_answer_generation/task.json",
    "quoref": "natural_instructions/subtask002_quoref_answer_generation/task.json",
    "ropes": "natural_instructions/subtask061_ropes_answer_generation/task.json",
    "coqa": "coqa_conversational_question_answering/coqa.test.json",
    "vitaminc": "vitaminc_fact_verification/task.json",
}
# Generation tasks whose outputs are free text, none of them the reading-comprehension subtasks used above.
SFT_SUBTASKS = (
    "subtask001_quoref_question_generation", "subtask023_cosmosqa_question_generation",
    "subtask024_cosmosqa_answer_generation", "subtask026_drop_question_generation",
    "subtask037_qasc_generate_related_fact", "subtask038_qasc_combined_fact", "subtask040_qasc_question_generation",
    "subtask045_miscellaneous_sentence_paraphrasing", "subtask053_multirc_correct_bad_question",
    "subtask059_ropes_story_generation",
)
LICENCES = {"disfl_qa": "CC BY-SA 4.0 (SQuAD 2.0; Disfl-QA)", "drop": "CC BY-SA 4.0", "quoref": "CC BY 4.0",
            "ropes": "CC BY 4.0", "coqa": "CC BY-SA 4.0 / MSR-LA / Apache (per CoQA domain)",
            "vitaminc": "CC BY-SA 3.0", "natural_instructions": "Apache-2.0 (task sources keep theirs)",
            "enwiki": "CC BY-SA 3.0 (Wikipedia)", "bigbench": "Apache-2.0"}


# ----------------------------------------------------------------------------------------------- sampling
def _sample(items, size, rng):
  return rng.sample(items, min(size, len(items)))


def _round_robin(lists, size):
  """Takes one item from each list in turn until `size` items: equal shares, small lists topped up by others."""
  chosen, position = [], 0
  while len(chosen) < size and any(position < len(items) for items in lists):
    chosen += [items[position] for items in lists if position < len(items)][:size - len(chosen)]
    position += 1
  return chosen


def _balanced_sample(items, size, rng, label_key="label"):
  """Up to half True / half False labels (topping up from the larger class), shuffled."""
  by_label = {True: [e for e in items if e[label_key]], False: [e for e in items if not e[label_key]]}
  take_true = min(len(by_label[True]), max(size // 2, size - len(by_label[False])))
  chosen = _sample(by_label[True], take_true, rng) + _sample(by_label[False], size - take_true, rng)
  rng.shuffle(chosen)
  return chosen


def _label_stats(component_examples):
  labels = [e["label"] for e in component_examples]
  if labels and all(isinstance(label, bool) for label in labels):
    return {"true_fraction": round(sum(labels) / len(labels), 4)}
  if labels and all(isinstance(label, list) for label in labels):
    return {"mean_relevant_passages": round(sum(map(len, labels)) / len(labels), 4)}
  return {}


# ----------------------------------------------------------------------------------------- component groups
def _disfl_qa_components(train, train_unanswerable, index, sizes, seed, rng, context_ranking_negatives,
                         unanswerable_fraction, stats) -> dict:
  """RA-QA, RA-ranking, context ranking and context-rich QA from disfl_qa's training paragraphs."""
  components = {}
  for name, build in (("disfl_qa_ra_qa", builders.build_ra_qa_examples),
                      ("disfl_qa_ra_ranking", builders.build_ra_ranking_examples)):
    records = [dict(q, gold_passage=q["context"]) for q in _sample(train, sizes[name], rng(name))]
    retrieved = negatives.retrieve_bm25_contexts([r["question"] for r in records], None, builders.RA_NUM_PASSAGES - 1,
                                                 gold_ids=[r["gold_passage_id"] for r in records], index=index)
    for record, hits in zip(records, retrieved):
      record["retrieved"] = [h["text"] for h in hits]
    enough = [r for r in records if len(r["retrieved"]) == builders.RA_NUM_PASSAGES - 1]
    stats[f"{name}_too_few_bm25_contexts"] = len(records) - len(enough)
    components[name] = build(enough, component=name, seed=seed)

  name = "disfl_qa_context_ranking"
  questions = _sample(train, math.ceil(sizes[name] / (1 + context_ranking_negatives)), rng(name))
  mined = negatives.mine_bm25_negatives([q["question"] for q in questions], [q["answers"] for q in questions], None,
                                        context_ranking_negatives, index=index,
                                        gold_ids=[q["gold_passage_id"] for q in questions])
  records = [dict(q, gold_passage=q["context"], negatives=[h["text"] for h in hits])
             for q, hits in zip(questions, mined)]
  components[name] = builders.build_context_ranking_examples(
      records, component=name, negatives_per_question=context_ranking_negatives)[:sizes[name]]

  name = "disfl_qa_context_qa"
  n_unanswerable = min(round(sizes[name] * unanswerable_fraction), len(train_unanswerable))
  reading = [{"id": q["id"], "question": q["question"], "passage": q["context"], "answer": q["answers"][0]}
             for q in _sample(train, sizes[name] - n_unanswerable, rng(name))]
  reading += [{"id": q["id"], "question": q["question"], "passage": q["context"], "answer": prompts.UNANSWERABLE_ANSWER}
              for q in _sample(train_unanswerable, n_unanswerable, rng(f"{name}/unanswerable"))]
  rng(f"{name}/order").shuffle(reading)
  components[name] = builders.build_context_rich_qa_examples(reading, component=name, dataset="squad2.0")
  return components


def _coqa_components(dialogues, sizes, seed, rng, stats) -> dict:
  """Conversational QA (one seeded cut per dialogue) and balanced conversational ranking pairs."""
  components = {"coqa_conv_qa": builders.build_conversational_qa_examples(
      _sample(dialogues, sizes["coqa_conv_qa"], rng("coqa_conv_qa")), component="coqa_conv_qa", seed=seed)}
  # Labelling every (turn, chunk) pair of 700 stories is ~25k 4-gram recalls: label dialogues in a seeded order
  # until each class can fill half the component.
  ambiguous, pairs, size = collections.Counter(), [], sizes["coqa_conv_ranking"]
  ordered = _sample(dialogues, len(dialogues), rng("coqa_conv_ranking/order"))
  for start in range(0, len(ordered), 20):
    pairs += builders.build_conversational_ranking_examples(ordered[start:start + 20], component="coqa_conv_ranking",
                                                            dropped=ambiguous)
    if min(sum(e["label"] == label for e in pairs) for label in (True, False)) >= (size + 1) // 2:
      break
  components["coqa_conv_ranking"] = _balanced_sample(pairs, size, rng("coqa_conv_ranking"))
  stats["coqa_conv_ranking"] = {"pairs_labelled": len(pairs), "ambiguous_pairs_dropped": ambiguous["ambiguous"]}
  return components


def _sft_records(root, size, on_error, rng, skipped) -> list[dict]:
  """Natural Instructions v1 generation tasks as single-turn SFT: "{task definition + prompt}\n\n{input}"."""
  per_subtask = []
  for subtask in SFT_SUBTASKS:
    path = root / "natural_instructions" / subtask / "task.json"
    prefix = readers.read_bigbench_task_info(path).get("task_prefix", "").strip()
    task_rows = readers.read_bigbench_task(path, on_error)
    shuffled = list(task_rows)
    rng(f"sft/{subtask}").shuffle(shuffled)
    sources.count_skips(skipped, path, task_rows.errors, task_rows.skipped)
    per_subtask.append([{"id": r["id"], "turns": [{"user": f"{prefix}\n\n{r['input']}".strip(),
                                                   "assistant": r["targets"][0]}]} for r in shuffled])
  return _round_robin(per_subtask, size)


# ---------------------------------------------------------------------------------------------- the build
@gin.configurable
def build_default_blend(out_dir, seed: int = 0, sizes: dict | None = None, heldout_fraction: float = 0.1,
                        unanswerable_fraction: float = 0.1, context_ranking_negatives: int = 1,
                        on_error: str = "skip", bigbench_dir=None, enwiki_path=None) -> dict:
  """Builds every component into `out_dir`; returns (and writes) the manifest.

  Writes `{component}.jsonl` (Example dicts), `corpus.jsonl` ({id, title, text}: disfl_qa paragraphs + the
  Wikipedia passages), `heldout.jsonl` ({id, question, answers, gold_passage_id}) and `manifest.json`.

  Args:
    out_dir: output directory (created).
    seed: every sample, split and shuffle derives from it; same seed, same bytes.
    sizes: per-component example counts overriding DEFAULT_SIZES (a component gets fewer if its source runs out).
    heldout_fraction: fraction of disfl_qa paragraphs (with all their questions) held out.
    unanswerable_fraction: share of disfl_qa context-rich QA examples that are SQuAD-2.0 unanswerable, answered
      with ChatQA's "Sorry. I cannot find the answer based on the context.".
    context_ranking_negatives: BM25 negatives per question in context ranking (each is its own example).
    on_error: "skip" a malformed source row and count it (with its file:line message) in the manifest, or
      "raise". The default skips: disfl_qa/task.json has one example with an empty question (line 29875).
    bigbench_dir, enwiki_path: source locations; default: the asset cache.
  """
  start_time = time.time()
  sizes = {**DEFAULT_SIZES, **(sizes or {})}
  unknown = set(sizes) - set(COMPONENTS)
  if unknown:
    raise ValueError(f"unknown components {sorted(unknown)}; known: {sorted(COMPONENTS)}")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  root = pathlib.Path(bigbench_dir or assets.asset_file("bigbench"))
  enwiki_path = enwiki_path or assets.asset_file("enwiki_slice")
  skipped, stats = {}, {}

  def rng(name):
    return random.Random(f"{seed}/{name}")

  def rows(source, parse):
    path = root / SOURCE_FILES[source]
    return sources.parse_rows(path, readers.read_bigbench_task(path, on_error), parse, on_error, skipped)

  # disfl_qa paragraphs, split by paragraph; the corpus adds the Wikipedia passages as distractors.
  questions = rows("disfl_qa", sources.parse_disfl_qa)
  paragraph_ids = {}
  for q in questions:
    q["gold_passage_id"] = paragraph_ids.setdefault(q["context"], f"disfl_qa/p{len(paragraph_ids):04d}")
  paragraphs = [{"id": pid, "title": "", "text": text} for text, pid in paragraph_ids.items()]
  shuffled = [p["id"] for p in paragraphs]
  rng("heldout").shuffle(shuffled)
  heldout_ids = set(shuffled[:math.ceil(heldout_fraction * len(shuffled))])
  wiki = wikipedia.read_wikipedia_dump(enwiki_path, on_error=on_error)
  wiki_passages = list(wiki)
  sources.count_skips(skipped, enwiki_path, wiki.errors, wiki.skipped)
  corpus = paragraphs + wiki_passages
  readers.write_jsonl(out_dir / "corpus.jsonl", corpus)

  # Only questions whose gold paragraph contains an answer string: "relevant" must hold for the gold passage.
  answerable = [q for q in questions if q["answers"] and has_answer(q["context"], q["answers"])]
  heldout = [{"id": q["id"], "question": q["question"], "answers": q["answers"],
              "gold_passage_id": q["gold_passage_id"]} for q in answerable if q["gold_passage_id"] in heldout_ids]
  readers.write_jsonl(out_dir / "heldout.jsonl", heldout)
  train = [q for q in answerable if q["gold_passage_id"] not in heldout_ids]
  train_unanswerable = [q for q in questions if not q["answers"] and q["gold_passage_id"] not in heldout_ids]
  # BM25 over the training corpus only: held-out paragraphs never appear as training contexts.
  index = negatives.Bm25Index([p for p in corpus if p["id"] not in heldout_ids])

  components = _disfl_qa_components(train, train_unanswerable, index, sizes, seed, rng, context_ranking_negatives,
                                    unanswerable_fraction, stats)
  for source in ("drop", "quoref", "ropes"):
    name = f"{source}_context_qa"
    components[name] = builders.build_context_rich_qa_examples(
        _sample(rows(source, sources.reading_parser(source)), sizes[name], rng(name)), component=name, dataset=source)
  coqa_path = root / SOURCE_FILES["coqa"]
  coqa = readers.read_coqa(coqa_path, on_error)
  dialogues = [{"id": f"coqa/{d['id']}", "document": d["story"], "turns": d["turns"]} for d in coqa]
  sources.count_skips(skipped, coqa_path, coqa.errors, coqa.skipped)
  components.update(_coqa_components(dialogues, sizes, seed, rng, stats))
  claims = _balanced_sample(rows("vitaminc", sources.parse_vitaminc), sizes["vitaminc_claim_ranking"],
                            rng("vitaminc_claim_ranking"), label_key="relevant")
  components["vitaminc_claim_ranking"] = builders.build_claim_ranking_examples(
      [sources.detokenize_vitaminc(c) for c in claims], component="vitaminc_claim_ranking")
  components["natural_instructions_sft"] = builders.build_sft_examples(
      _sft_records(root, sizes["natural_instructions_sft"], on_error, rng, skipped),
      component="natural_instructions_sft")

  manifest = {
      "seed": seed, "sizes_requested": sizes, "heldout_fraction": heldout_fraction,
      "components": {name: {"count": readers.write_jsonl(out_dir / f"{name}.jsonl", components[name]),
                            "task": COMPONENTS[name][0], "source": COMPONENTS[name][1],
                            "paper_blend_entry": COMPONENTS[name][2], **_label_stats(components[name])}
                     for name in COMPONENTS},
      "corpus": {"count": len(corpus), "disfl_qa_paragraphs": len(paragraphs), "enwiki_passages": len(wiki_passages),
                 "enwiki_filtered": dict(wiki.filtered)},
      "heldout": {"questions": len(heldout), "paragraphs": len(heldout_ids)},
      "disfl_qa": {"questions": len(questions), "unanswerable": sum(not q["answers"] for q in questions),
                   "answer_not_in_gold_paragraph": sum(bool(q["answers"]) for q in questions) - len(answerable),
                   "train_answerable": len(train)},
      **stats,
      "sft_subtasks": list(SFT_SUBTASKS),
      "skipped_malformed_rows": skipped,
      "sources": {**{source: {"file": f"benchmark_tasks/{rel}", "licence": LICENCES[source]}
                     for source, rel in SOURCE_FILES.items()},
                  "natural_instructions": {"file": "benchmark_tasks/natural_instructions/{sft_subtasks}/task.json",
                                           "licence": LICENCES["natural_instructions"]},
                  "enwiki": {"file": assets.ASSETS["enwiki_slice"].main, "licence": LICENCES["enwiki"]}},
      "packages": {name: f"{assets.ASSETS[name].package}=={assets.ASSETS[name].version} ({assets.ASSETS[name].licence})"
                   for name in ("bigbench", "enwiki_slice")},
  }
  (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
  logging.info("Built the default blend in %s (%.1fs): %s", out_dir, time.time() - start_time,
               {k: v["count"] for k, v in manifest["components"].items()})
  return manifest
