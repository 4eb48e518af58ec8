"""The paper's own Stage-II blend (RankRAG App. B), built from the public files a researcher downloads.

    python -m rankrag_jax.data.build --gin_file=gin_configs/data/paper_blend.gin --gin_bindings="DROP_PATH = '...'" ...

Sources (paths: gin_configs/data/paper_blend.gin, every one required):
  ChatQA training data (huggingface.co/datasets/nvidia/ChatQA-Training-Data), JSONL one conversation per line
    {messages, document, answers}: DROP, NarrativeQA, Quoref, ROPES, NewsQA, TAT-QA (arithmetic / others) ->
    context-rich QA with the App. C.2 instruction per dataset; synthetic_convqa -> conversational QA and (its
    documents in 150-word chunks, 4-gram recall) conversational ranking; sft -> SFT. DROP and Quoref may also be
    their original releases (DROP JSON, Quoref's SQuAD-format JSON: a `.json` path).
  MS MARCO passage ranking (collection.tsv, queries.train.tsv, qrels.train.tsv) -> context ranking: (q, gold) True,
    (q, BM25 top hit that is no gold passage) False, over the whole collection (`paper_sources.TsvBm25Index`).
  SQuAD v1.1 JSON and WebQuestions JSON + DPR's Wikipedia `psgs_w100.tsv` -> RA-QA and RA-ranking: gold context +
    4 BM25 contexts from Wikipedia, shuffled; relevant = the gold and every context containing an answer.

Resumable: each component is written to `{component}.jsonl` (or `{component}.shard-NNNNN.jsonl` when larger than
`shard_size`, read by `tasks.component_files`) and then `{component}.done`; a re-run skips components that have
both, and loads the BM25 indexes saved under `{out_dir}/bm25_*`. `manifest.json` is written last.
"""

import collections
import json
import os
import pathlib
import random
import time

import gin
from absl import logging

from rankrag_jax import prompts
from rankrag_jax.data import blend
from rankrag_jax.data import examples as builders
from rankrag_jax.data import negatives, paper_sources, readers, sources, tasks
from rankrag_jax.retrieval.corpus import passage_text

# component -> (task, the paper's App. B entry). The App. B ratios live in gin_configs/data/paper_blend.gin.
COMPONENTS = {
    "drop_context_qa": ("context_rich_qa", "DROP"),
    "narrativeqa_context_qa": ("context_rich_qa", "NarrativeQA"),
    "quoref_context_qa": ("context_rich_qa", "Quoref"),
    "ropes_context_qa": ("context_rich_qa", "ROPES"),
    "squad_ra_qa": ("ra_qa", "SQuAD RA-QA"),
    "squad_ra_ranking": ("ra_ranking", "SQuAD RA-ranking"),
    "webq_ra_qa": ("ra_qa", "WebQuestions RA-QA"),
    "webq_ra_ranking": ("ra_ranking", "WebQuestions RA-ranking"),
    "newsqa_context_qa": ("context_rich_qa", "NewsQA"),
    "tatqa_arithmetic_context_qa": ("context_rich_qa", "TAT-QA arithmetic"),
    "tatqa_others_context_qa": ("context_rich_qa", "TAT-QA others"),
    "convqa": ("conv_qa", "ConvQA"),
    "msmarco_context_ranking": ("context_ranking", "MS MARCO ranking"),
    "convqa_ranking": ("conv_ranking", "ConvQA ranking"),
    "sft": ("sft", "SFT"),
}
# ChatQA file -> App. C.2 instruction key (prompts.DATASET_INSTRUCTIONS).
CONTEXT_QA_DATASETS = {"drop_context_qa": "drop", "narrativeqa_context_qa": "narrativeqa",
                       "quoref_context_qa": "quoref", "ropes_context_qa": "ropes", "newsqa_context_qa": "newsqa",
                       "tatqa_arithmetic_context_qa": "tatqa_arithmetic", "tatqa_others_context_qa": "tatqa_others"}
# None = every row. Caps where BM25 work grows with the count: §4.2 uses ~50k ranking pairs in all.
DEFAULT_SIZES = {"msmarco_context_ranking": 50_000, "convqa_ranking": 10_000, "squad_ra_qa": 20_000,
                 "squad_ra_ranking": 5_000, "webq_ra_qa": None, "webq_ra_ranking": None}


def _sample(items: list, size: int | None, rng: random.Random) -> list:
  return list(items) if size is None or size >= len(items) else rng.sample(items, size)


# ------------------------------------------------------------------------------------------ ChatQA sources
def _with_instruction(turns: list[dict], dataset: str) -> list[dict]:
  """App. C.2's dataset instruction on the first user turn (unless the file already carries it)."""
  instruction = prompts.DATASET_INSTRUCTIONS[dataset]
  first = turns[0]["user"]
  return [{**turns[0], "user": first if first.startswith(instruction) else f"{instruction} {first}"}, *turns[1:]]


def chatqa_examples(records: list[dict], *, component: str, dataset: str, task: str) -> list[dict]:
  """ChatQA rows (the last assistant turn is the target) -> one Example each, over the row's document."""
  return [prompts.make_example(component=component, example_id=r["id"], task=task, passages=r["passages"][:1],
                               passage_style="single", turns=_with_instruction(r["turns"], dataset))
          for r in records]


def context_qa_examples(path, *, component: str, dataset: str, on_error: str, skipped: dict) -> list[dict]:
  """Context-rich QA from a ChatQA JSONL (`.jsonl`), or DROP's / Quoref's original JSON (`.json`)."""
  path = pathlib.Path(path)
  if path.suffix == ".jsonl":
    records = sources.read_all(readers.read_chatqa_jsonl(path, on_error), skipped)
    single = [r for r in records if len(r["turns"]) == 1]
    multi = [r for r in records if len(r["turns"]) > 1]
    reading = [{"id": r["id"], "question": r["turns"][0]["user"], "passage": r["passages"][0],
                "answer": r["turns"][0]["assistant"]} for r in single]
    return (builders.build_context_rich_qa_examples(reading, component=component, dataset=dataset)
            + chatqa_examples(multi, component=component, dataset=dataset, task="context_rich_qa"))
  if dataset == "drop":
    reading = sources.read_all(paper_sources.read_drop(path, on_error), skipped)
  elif dataset == "quoref":
    reading = [{"id": r["id"], "question": r["question"], "passage": r["context"], "answer": r["answers"][0]}
               for r in sources.read_all(readers.read_squad(path, on_error), skipped)]
  else:
    raise ValueError(f"{path}: {dataset} is read from ChatQA's JSONL only (a .jsonl file)")
  return builders.build_context_rich_qa_examples(reading, component=component, dataset=dataset)


def conversational_dialogues(records: list[dict]) -> list[dict]:
  """ChatQA conversation rows -> one dialogue per document (its longest row holds every turn of the others)."""
  longest = {}
  for r in records:
    document = "\n".join(r["passages"])
    if document not in longest or len(r["turns"]) > len(longest[document]["turns"]):
      longest[document] = {"id": r["id"], "document": document, "turns": r["turns"]}
  return list(longest.values())


# -------------------------------------------------------------------------------------------- BM25 sources
def msmarco_ranking_examples(collection_path, queries_path, qrels_path, *, index, size, negatives_per_question,
                             rng, on_error, skipped, stats) -> list[dict]:
  """(q, qrels gold) -> True, (q, top BM25 hit that is no gold passage of q) -> False, over the whole collection."""
  questions = readers.join_msmarco(sources.read_all(readers.read_msmarco_queries(queries_path, on_error), skipped),
                                   sources.read_all(readers.read_msmarco_qrels(qrels_path, on_error), skipped))
  chosen = _sample(questions, None if size is None else -(-size // (1 + negatives_per_question)), rng)
  gold_rows = index.rows_of([q["gold_ids"][0] for q in chosen])
  missing = [q["id"] for q, row in zip(chosen, gold_rows) if row is None]
  stats["msmarco_gold_not_in_collection"] = len(missing)
  chosen = [dict(q, gold_passage=index.corpus[row]["text"]) for q, row in zip(chosen, gold_rows) if row is not None]
  mined = negatives.retrieve_bm25_contexts([q["question"] for q in chosen], None, negatives_per_question,
                                           index=index, gold_ids=[q["gold_ids"] for q in chosen])
  records = [dict(q, negatives=[h["text"] for h in hits]) for q, hits in zip(chosen, mined)]
  stats["msmarco_questions_short_of_negatives"] = sum(len(r["negatives"]) < negatives_per_question for r in records)
  examples = builders.build_context_ranking_examples(records, component="msmarco_context_ranking",
                                                     negatives_per_question=negatives_per_question)
  return examples[:size] if size is not None else examples


def ra_examples(records: list[dict], *, prefix: str, index, sizes, seed, rng, stats) -> dict[str, list[dict]]:
  """`{prefix}_ra_qa` and `{prefix}_ra_ranking`: gold + 4 BM25 Wikipedia contexts (other than the gold), shuffled."""
  components = {}
  for name, build in ((f"{prefix}_ra_qa", builders.build_ra_qa_examples),
                      (f"{prefix}_ra_ranking", builders.build_ra_ranking_examples)):
    chosen = _sample(records, sizes.get(name), rng(name))
    retrieved = negatives.retrieve_bm25_contexts(
        [r["question"] for r in chosen], None, builders.RA_NUM_PASSAGES - 1, index=index,
        gold_ids=[[r["gold_passage_id"]] if r.get("gold_passage_id") else [] for r in chosen])
    chosen = [dict(r, retrieved=[passage_text(h["title"], h["text"]) for h in hits])
              for r, hits in zip(chosen, retrieved)]
    enough = [r for r in chosen if len(r["retrieved"]) == builders.RA_NUM_PASSAGES - 1]
    stats[f"{name}_too_few_bm25_contexts"] = len(chosen) - len(enough)
    components[name] = build(enough, component=name, seed=seed)
  return components


def squad_records(path, on_error, skipped) -> list[dict]:
  """SQuAD JSON answerable questions -> qa records whose gold passage is their SQuAD paragraph."""
  return [{"id": f"squad/{r['id']}", "question": r["question"], "answers": r["answers"],
           "gold_passage": passage_text(r["title"].replace("_", " "), r["context"])}
          for r in sources.read_all(readers.read_squad(path, on_error), skipped) if not r["is_impossible"]]


def webquestions_records(path, index, positive_depth, on_error, skipped, stats) -> list[dict]:
  """WebQuestions with a gold passage: DPR's positive when given, else the best answer-bearing BM25 hit."""
  records = sources.read_all(paper_sources.read_webquestions(path, on_error), skipped)
  with_gold = [r for r in records if "gold_passage" in r]
  found = blend.with_positives([r for r in records if "gold_passage" not in r], index,
                                positive_depth)
  stats["webq_without_gold_passage"] = len(records) - len(with_gold) - len(found)
  return with_gold + found


# ------------------------------------------------------------------------------------------------ writing
def _component_done(out_dir: pathlib.Path, name: str) -> dict | None:
  marker = out_dir / f"{name}.done"
  if marker.is_file() and tasks.component_files(out_dir, name, missing_ok=True):
    return json.loads(marker.read_text())
  return None


def write_component(out_dir: pathlib.Path, name: str, component_examples: list[dict], shard_size: int) -> dict:
  """Writes the component (sharded above `shard_size`) through temporary names, then its done-marker."""
  for stale in tasks.component_files(out_dir, name, missing_ok=True):
    stale.unlink()
  chunks = [component_examples[i:i + shard_size] for i in range(0, len(component_examples), shard_size)] or [[]]
  for i, chunk in enumerate(chunks):
    final = out_dir / (f"{name}.jsonl" if len(chunks) == 1 else tasks.SHARD_NAME.format(component=name, index=i))
    readers.write_jsonl(final.with_suffix(".tmp"), chunk)
    final.with_suffix(".tmp").rename(final)
  entry = {"count": len(component_examples), "shards": len(chunks), "task": COMPONENTS[name][0],
           "paper_blend_entry": COMPONENTS[name][1], **blend.label_stats(component_examples)}
  (out_dir / f"{name}.done").write_text(json.dumps(entry) + "\n")
  return entry


@gin.configurable
def build_paper_blend(out_dir, *, drop_path=gin.REQUIRED, narrativeqa_path=gin.REQUIRED, quoref_path=gin.REQUIRED,
                      ropes_path=gin.REQUIRED, newsqa_path=gin.REQUIRED, tatqa_arithmetic_path=gin.REQUIRED,
                      tatqa_others_path=gin.REQUIRED, synthetic_convqa_path=gin.REQUIRED, sft_path=gin.REQUIRED,
                      msmarco_collection_path=gin.REQUIRED, msmarco_queries_path=gin.REQUIRED,
                      msmarco_qrels_path=gin.REQUIRED, squad_path=gin.REQUIRED, webquestions_path=gin.REQUIRED,
                      wikipedia_passages_path=gin.REQUIRED, seed: int = 0, sizes: dict | None = None,
                      context_ranking_negatives: int = 1, positive_depth: int = 20, shard_size: int = 100_000,
                      on_error: str = "skip") -> dict:
  """Builds the 15 App. B components into `out_dir` (resumably); returns (and writes) the manifest.

  Args:
    out_dir: output directory (created); also holds the BM25 indexes (`bm25_msmarco/`, `bm25_wikipedia/`).
    *_path: the public files (gin_configs/data/paper_blend.gin names each one's source).
    seed: every sample and shuffle derives from it.
    sizes: per-component example caps overriding DEFAULT_SIZES (None = every row).
    context_ranking_negatives: BM25 negatives per MS MARCO question (each its own example).
    positive_depth: a WebQuestions question without DPR's positive gets the best answer-bearing hit in this top.
    shard_size: examples per JSONL shard.
    on_error: "skip" a malformed source row and count it (file:line messages) in the manifest, or "raise".
  """
  start_time = time.time()
  paths = {name: value for name, value in locals().items() if name.endswith("_path")}
  unset = [name.upper() for name, value in paths.items() if not isinstance(value, (str, os.PathLike))]
  if unset:  # a `NAME = %gin.REQUIRED` macro that nobody set reaches us as Gin's sentinel.
    raise ValueError(f"build_paper_blend: required paths not set: {', '.join(unset)} "
                     "(--gin_bindings=\"NAME = '/path'\"; gin_configs/data/paper_blend.gin names each source)")
  sizes = blend.requested_sizes(sizes, DEFAULT_SIZES, COMPONENTS)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  skipped, stats, entries, corpus = {}, {}, {}, {}

  def rng(name):
    return random.Random(f"{seed}/{name}")

  def pending(*names):
    for name in names:
      entry = _component_done(out_dir, name)
      if entry is not None:
        entries[name] = entry
        logging.info("%s: done already (%d examples), skipped", name, entry["count"])
    return [n for n in names if n not in entries]

  def write(name, component_examples):
    component_examples = _sample(component_examples, sizes.get(name), rng(f"{name}/cap"))
    entries[name] = write_component(out_dir, name, component_examples, shard_size)

  context_qa_paths = {"drop_context_qa": drop_path, "narrativeqa_context_qa": narrativeqa_path,
                      "quoref_context_qa": quoref_path, "ropes_context_qa": ropes_path,
                      "newsqa_context_qa": newsqa_path, "tatqa_arithmetic_context_qa": tatqa_arithmetic_path,
                      "tatqa_others_context_qa": tatqa_others_path}
  for name, dataset in CONTEXT_QA_DATASETS.items():
    if pending(name):
      write(name, context_qa_examples(context_qa_paths[name], component=name, dataset=dataset, on_error=on_error,
                                      skipped=skipped))
  if pending("convqa", "convqa_ranking"):
    records = sources.read_all(readers.read_chatqa_jsonl(synthetic_convqa_path, on_error), skipped)
    if pending("convqa"):
      write("convqa", chatqa_examples(records, component="convqa", dataset="synthetic_convqa", task="conv_qa"))
    if pending("convqa_ranking"):
      dropped = collections.Counter()
      write("convqa_ranking", builders.build_conversational_ranking_examples(
          conversational_dialogues(records), component="convqa_ranking", dropped=dropped))
      stats["convqa_ranking_ambiguous_chunks_dropped"] = dropped["ambiguous"]
  if pending("sft"):
    write("sft", builders.build_sft_examples(
        sources.read_all(paper_sources.read_chatqa_sft_jsonl(sft_path, on_error), skipped), component="sft"))
  if pending("msmarco_context_ranking"):
    index = paper_sources.tsv_bm25_index(msmarco_collection_path, "msmarco", out_dir / "bm25_msmarco", on_error,
                                         skipped)
    corpus["msmarco_collection"] = len(index.corpus)
    write("msmarco_context_ranking", msmarco_ranking_examples(
        msmarco_collection_path, msmarco_queries_path, msmarco_qrels_path, index=index,
        size=sizes["msmarco_context_ranking"], negatives_per_question=context_ranking_negatives,
        rng=rng("msmarco_context_ranking"), on_error=on_error, skipped=skipped, stats=stats))
  ra_names = ("squad_ra_qa", "squad_ra_ranking", "webq_ra_qa", "webq_ra_ranking")
  if pending(*ra_names):
    index = paper_sources.tsv_bm25_index(wikipedia_passages_path, "dpr", out_dir / "bm25_wikipedia", on_error,
                                         skipped)
    corpus["wikipedia_passages"] = len(index.corpus)
    qa_sets = {"squad": lambda: squad_records(squad_path, on_error, skipped),
               "webq": lambda: webquestions_records(webquestions_path, index, positive_depth, on_error, skipped,
                                                    stats)}
    for prefix, read in qa_sets.items():
      if pending(f"{prefix}_ra_qa", f"{prefix}_ra_ranking"):
        built = ra_examples(read(), prefix=prefix, index=index, sizes=sizes, seed=seed, rng=rng, stats=stats)
        for name in pending(*built):
          write(name, built[name])

  manifest = {"seed": seed, "sizes_requested": sizes, "components": {n: entries[n] for n in COMPONENTS},
              **stats, "skipped_malformed_rows": skipped,
              # No corpus.jsonl: the BM25 corpora stay in their TSV files (counted when indexed in this run).
              "corpus": {**corpus, "count": sum(corpus.values())},
              "sources": {"chatqa": "huggingface.co/datasets/nvidia/ChatQA-Training-Data",
                          "msmarco": "microsoft.github.io/msmarco (passage ranking)",
                          "squad": "rajpurkar.github.io/SQuAD-explorer (v1.1 train)",
                          "webquestions": "nlp.stanford.edu/software/sempre (or DPR's webq-train.json)",
                          "wikipedia": "DPR psgs_w100.tsv (github.com/facebookresearch/DPR)"}}
  (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
  logging.info("Built the paper blend in %s (%.1fs): %s", out_dir, time.time() - start_time,
               {k: v["count"] for k, v in manifest["components"].items()})
  return manifest
