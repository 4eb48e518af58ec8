"""The paper's own blend (data/paper_blend.py, data/paper_sources.py, gin_configs/data/paper_blend.gin) on small
fixtures in each public format, written here, plus allennlp's real SQuAD / DROP / Quoref fixtures."""

import json
import pathlib
import random
import subprocess
import sys

import gin
import pytest

from rankrag_jax import assets, prompts
from rankrag_jax.data import build, negatives, paper_blend, paper_sources, readers, tasks
from rankrag_jax.data.answers import has_answer

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER_GIN = REPO / "gin_configs" / "data" / "paper_blend.gin"
# RankRAG App. B, before normalisation (they sum to 1.331).
APP_B = {"drop_context_qa": 0.069, "narrativeqa_context_qa": 0.09, "quoref_context_qa": 0.026,
         "ropes_context_qa": 0.026, "squad_ra_qa": 0.09, "squad_ra_ranking": 0.02, "webq_ra_qa": 0.09,
         "webq_ra_ranking": 0.02, "newsqa_context_qa": 0.09, "tatqa_arithmetic_context_qa": 0.15,
         "tatqa_others_context_qa": 0.08, "convqa": 0.2, "msmarco_context_ranking": 0.15, "convqa_ranking": 0.03,
         "sft": 0.2}
COUNTRIES = ["France", "Peru", "Kenya", "Norway", "Chile", "Japan", "Egypt", "Canada", "Ghana", "Nepal"]
CAPITALS = ["Paris", "Lima", "Nairobi", "Oslo", "Santiago", "Tokyo", "Cairo", "Ottawa", "Accra", "Kathmandu"]
FILLER = ("river valley mountain trade harbor festival railway museum cotton copper bridge market forest "
          "coast island desert glacier bank school village").split()


def _fixtures() -> pathlib.Path:
  return pathlib.Path(assets.asset_file("allennlp_fixtures"))


def _filler(rng, n):
  return " ".join(rng.choice(FILLER) for _ in range(n))


def _jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def _chatqa(question, answer, document, history=()):
  messages = [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
  return {"messages": messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
          "document": document}


def write_sources(root: pathlib.Path) -> dict:
  """Every source of the paper blend, in its public format (small), -> build_paper_blend's path arguments."""
  rng = random.Random(0)
  facts = [f"{cap} is the capital of {c}. {_filler(rng, 30)}" for c, cap in zip(COUNTRIES, CAPITALS)]
  noise = [f"{c} has a {_filler(rng, 3)} and {_filler(rng, 30)}" for c in COUNTRIES for _ in range(4)]
  passages = facts + noise
  (root / "collection.tsv").write_text("".join(f"{i}\t{p}\n" for i, p in enumerate(passages)))
  (root / "queries.train.tsv").write_text("".join(f"{100 + i}\twhat is the capital city of {c}\n"
                                                  for i, c in enumerate(COUNTRIES)))
  (root / "qrels.train.tsv").write_text("".join(f"{100 + i}\t0\t{i}\t1\n" for i in range(len(COUNTRIES))))
  (root / "psgs_w100.tsv").write_text("id\ttext\ttitle\n" + "".join(
      f"{i + 1}\t{p}\t{COUNTRIES[i % len(COUNTRIES)]}\n" for i, p in enumerate(passages + [
          f"The University of Notre Dame is in Indiana. {_filler(rng, 20)}",
          f"Father Julius Nieuwland worked at Notre Dame in 1882 on {_filler(rng, 20)}"])))
  (root / "webq.json").write_text(json.dumps(
      [{"url": "x", "utterance": f"what is the capital of {c}?", "targetValue": f'(list (description "{cap}"))'}
       for c, cap in zip(COUNTRIES[:6], CAPITALS[:6])], indent=1))
  reading = {name: _jsonl(root / f"{name}.jsonl", [
      _chatqa(f"Which city is the capital of {c}?", cap, facts[i]) for i, (c, cap) in enumerate(zip(COUNTRIES, CAPITALS))
  ][:4] + [_chatqa("And of Peru?", "Lima", facts[0] + " " + facts[1], history=[("Capital of France?", "Paris")])])
      for name in ("narrativeqa", "ropes", "newsqa", "tatqa_arithmetic", "tatqa_others")}
  story = " ".join(facts)  # ~350 words: three 150-word chunks.
  convqa = []
  for i, (c, cap) in enumerate(zip(COUNTRIES, CAPITALS)):
    convqa.append(_chatqa(f"What is the capital of {c}?", f"{cap} is the capital of {c}", story,
                          history=[(f"Tell me about {COUNTRIES[i - 1]}.", f"{CAPITALS[i - 1]} is the capital of "
                                    f"{COUNTRIES[i - 1]}")] if i else ()))
  sft = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"Say {w}."},
                       {"role": "assistant", "content": w}]} for w in FILLER[:5]]
  return {"drop_path": str(_fixtures() / "drop.json"), "quoref_path": str(_fixtures() / "quoref" / "quoref_sample.json"),
          "squad_path": str(_fixtures() / "squad.json"),
          **{f"{name}_path": path for name, path in reading.items()},
          "synthetic_convqa_path": _jsonl(root / "synthetic_convqa.jsonl", convqa),
          "sft_path": _jsonl(root / "sft.jsonl", sft),
          "msmarco_collection_path": str(root / "collection.tsv"),
          "msmarco_queries_path": str(root / "queries.train.tsv"), "msmarco_qrels_path": str(root / "qrels.train.tsv"),
          "webquestions_path": str(root / "webq.json"), "wikipedia_passages_path": str(root / "psgs_w100.tsv")}


def app_b_mismatches(rates: dict) -> dict:
  """Components whose rate differs from App. B (or is missing / extra): {component: (got, App. B)}."""
  return {c: (rates.get(c), APP_B.get(c)) for c in set(rates) | set(APP_B) if rates.get(c) != APP_B.get(c)}


def ranking_violations(examples: list[dict], answers_by_question: dict) -> list[str]:
  """A False context-ranking example whose passage contains an answer, or a True one that contains none."""
  bad = []
  for e in examples:
    answers = answers_by_question[tasks.question_key(e["id"])]
    if e["label"] is not has_answer(e["passages"][0], answers):
      bad.append(e["id"])
  return bad


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("paper_sources")
  paths = write_sources(root)
  out = root / "blend"
  manifest = paper_blend.build_paper_blend(out, **paths, sizes={"msmarco_context_ranking": 16}, on_error="raise")
  return paths, out, manifest


# ----------------------------------------------------------------------------------------------- the gin file
def _parse_paper_gin(text: str) -> dict:
  gin.clear_config()
  try:
    gin.parse_config(text)
    return dict(gin.get_bindings("rankrag_jax.data.tasks.register_stage2_mixture")["rates"])
  finally:
    gin.clear_config()


def test_paper_gin_has_app_b_fifteen_ratios_exactly_and_a_broken_copy_fails():
  text = PAPER_GIN.read_text()
  rates = _parse_paper_gin(text)
  assert app_b_mismatches(rates) == {} and len(rates) == 15
  assert round(sum(rates.values()), 6) == 1.331 and set(rates) == set(paper_blend.COMPONENTS)
  broken = text.replace("'convqa_ranking': 0.03,", "'convqa_ranking': 0.3,")
  assert app_b_mismatches(_parse_paper_gin(broken)) == {"convqa_ranking": (0.3, 0.03)}


def test_every_path_is_a_required_macro_and_unset_ones_are_named():
  text = PAPER_GIN.read_text()
  for param in ("drop", "narrativeqa", "quoref", "ropes", "newsqa", "tatqa_arithmetic", "tatqa_others",
                "synthetic_convqa", "sft", "msmarco_collection", "msmarco_queries", "msmarco_qrels", "squad",
                "webquestions", "wikipedia_passages"):
    assert f"{param.upper()}_PATH = %gin.REQUIRED" in text
    assert f"build_paper_blend.{param}_path = %{param.upper()}_PATH" in text
  assert "PAPER_BLEND_DIR = %gin.REQUIRED" in text
  gin.clear_config()
  try:
    gin.parse_config(text)
    with pytest.raises(ValueError, match="DROP_PATH.*WIKIPEDIA_PASSAGES_PATH"):
      paper_blend.build_paper_blend("/nonexistent")
  finally:
    gin.clear_config()


# ------------------------------------------------------------------------------------------------- building
def test_builds_all_fifteen_components_with_the_papers_prompts(built):
  _, out, manifest = built
  counts = {c: e["count"] for c, e in manifest["components"].items()}
  assert set(counts) == set(APP_B) and all(counts.values()), counts
  examples = {c: tasks.read_component(out, c) for c in counts}
  drop = examples["drop_context_qa"][0]  # allennlp's real DROP fixture, short-span instruction (App. C.2)
  assert drop["turns"][0]["user"].startswith(prompts.DATASET_INSTRUCTIONS["drop"])
  assert counts["drop_context_qa"] == 19 and counts["quoref_context_qa"] == 4
  # allennlp's SQuAD fixture: 5 questions; those with < 4 BM25 hits in our tiny Wikipedia are counted, not lost.
  assert counts["squad_ra_qa"] + manifest["squad_ra_qa_too_few_bm25_contexts"] == 5
  arithmetic = examples["tatqa_arithmetic_context_qa"]
  assert all(e["turns"][0]["user"].startswith(prompts.DATASET_INSTRUCTIONS["tatqa_arithmetic"]) for e in arithmetic)
  assert examples["convqa"][1]["turns"][0]["user"].startswith(prompts.DATASET_INSTRUCTIONS["synthetic_convqa"])
  assert all(e["system"] == "" and not e["passages"] for e in examples["sft"])
  for c in ("squad_ra_qa", "squad_ra_ranking", "webq_ra_qa", "webq_ra_ranking"):
    assert all(len(e["passages"]) == 5 and e["passage_style"] == "numbered" for e in examples[c])
  labels = [e["label"] for e in examples["convqa_ranking"]]
  assert True in labels and False in labels


def test_msmarco_pairs_gold_true_bm25_negative_false_and_a_bad_negative_is_caught(built):
  paths, out, _ = built
  ranking = tasks.read_component(out, "msmarco_context_ranking")
  assert len(ranking) == 16 and sum(e["label"] for e in ranking) == 8
  answers = {str(100 + i): [cap] for i, cap in enumerate(CAPITALS)}
  assert ranking_violations(ranking, answers) == []
  gold = {e["id"].split("/")[0]: e["passages"][0] for e in ranking if e["label"]}
  assert all(e["passages"][0] != gold[e["id"].split("/")[0]] for e in ranking if not e["label"])
  broken = [dict(ranking[1], passages=[gold[ranking[1]["id"].split("/")[0]]], label=False)]
  assert ranking_violations(broken, answers) == [ranking[1]["id"]]


def test_ra_ranking_relevant_ids_are_exactly_the_answer_bearing_passages(built):
  _, out, _ = built
  answers = {f"webq/{i}": [cap] for i, cap in enumerate(CAPITALS[:6])}
  for e in tasks.read_component(out, "webq_ra_ranking"):
    relevant = [i for i, p in enumerate(e["passages"], 1) if has_answer(p, answers[e["id"]])]
    assert e["label"] == relevant and e["turns"][-1]["assistant"] == prompts.ra_ranking_answer(relevant)


def test_rebuild_skips_finished_components_and_redoes_an_unfinished_one(built, monkeypatch):
  paths, out, manifest = built
  (out / "sft.done").unlink()
  index_calls = []
  monkeypatch.setattr(paper_sources, "build_tsv_bm25_index", lambda *a, **k: index_calls.append(a))
  before = (out / "drop_context_qa.jsonl").stat().st_mtime_ns
  again = paper_blend.build_paper_blend(out, **paths, sizes={"msmarco_context_ranking": 16}, on_error="raise")
  assert again["components"] == manifest["components"] and index_calls == []  # the saved indexes were loaded
  assert (out / "drop_context_qa.jsonl").stat().st_mtime_ns == before and (out / "sft.done").is_file()


def test_large_components_are_sharded_and_tasks_read_every_shard(tmp_path):
  examples = [prompts.make_example(component="sft", example_id=f"s/{i}", task="sft", system="",
                                   turns=[{"user": f"q{i}", "assistant": "a"}]) for i in range(5)]
  entry = paper_blend.write_component(tmp_path, "sft", examples, shard_size=2)
  assert entry["shards"] == 3 and sorted(p.name for p in tmp_path.glob("sft*.jsonl")) == [
      "sft.shard-00000.jsonl", "sft.shard-00001.jsonl", "sft.shard-00002.jsonl"]
  assert tasks.blend_components(str(tmp_path)) == ["sft"]
  assert [e["id"] for e in tasks.read_component(tmp_path, "sft")] == [e["id"] for e in examples]


def test_build_command_builds_through_gin_and_prints_the_stats_table(built, tmp_path):
  """The documented command itself, in its own process (`python -m` runs build.py as __main__: a Gin file that
  imported build.py again would define its flags twice; an in-process call cannot see that)."""
  paths, _, _ = built
  out = tmp_path / "via_command"
  bindings = [f"{name.upper()} = '{value}'" for name, value in paths.items()]
  bindings += [f"PAPER_BLEND_DIR = '{out}'", "build_paper_blend.sizes = {'msmarco_context_ranking': 4}",
               "build_paper_blend.on_error = 'raise'"]
  result = subprocess.run([sys.executable, "-m", "rankrag_jax.data.build", f"--gin_file={PAPER_GIN}"] +
                          [f"--gin_bindings={b}" for b in bindings], cwd=REPO, capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  stats = json.loads((out / build.STATS_FILE).read_text())
  assert set(stats["components"]) == set(APP_B) and "msmarco_context_ranking" in result.stdout
  assert "packed rows/epoch" in result.stdout and "msmarco_collection 50" in result.stdout
  print(result.stdout)  # visible with -s: the table the issue asks for


# ------------------------------------------------------------------------------------------ streamed BM25 index
def test_streamed_tsv_index_ranks_exactly_as_the_projects_bm25(built, tmp_path):
  paths, _, _ = built
  index = paper_sources.build_tsv_bm25_index(paths["wikipedia_passages_path"], "dpr")
  rows = list(readers.Records(paths["wikipedia_passages_path"], lambda sink: (index.corpus[i] for i in range(len(index.corpus))), "raise"))
  reference = negatives.Bm25Index(rows)
  queries = [f"capital of {c}" for c in COUNTRIES] + ["Notre Dame 1882"]
  got, want = index.search(queries, 5), reference.search(queries, 5)
  assert [[r for r, _ in hits] for hits in got] == [[r for r, _ in hits] for hits in want]
  assert [[round(s, 4) for _, s in hits] for hits in got] == [[round(s, 4) for _, s in hits] for hits in want]
  index.save(tmp_path / "idx")
  loaded = paper_sources.load_tsv_bm25_index(tmp_path / "idx", paths["wikipedia_passages_path"])
  assert loaded.search(queries, 5) == got and loaded.rows_of(["1", "999999"]) == [0, None]


# ------------------------------------------------------------------------------------------- malformed rows
def test_malformed_rows_fail_with_file_line_and_field_or_are_counted(tmp_path):
  bad_chatqa = _jsonl(tmp_path / "ropes.jsonl", [_chatqa("q?", "a", "doc"), "{not json",
                                                  {"messages": [{"role": "user", "content": "q"}]}])
  with pytest.raises(readers.DataError, match=r"ropes\.jsonl:2: field '<json>'"):
    list(readers.read_chatqa_jsonl(bad_chatqa))
  skipped = {}
  kept = paper_blend.context_qa_examples(bad_chatqa, component="ropes_context_qa", dataset="ropes",
                                         on_error="skip", skipped=skipped)
  assert len(kept) == 1 and next(iter(skipped.values()))["count"] == 2
  sft = _jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "  "}]}])
  with pytest.raises(readers.DataError, match=r"sft\.jsonl:1: field 'messages\[1\]\.content'"):
    list(paper_sources.read_chatqa_sft_jsonl(sft))
  drop = json.loads((_fixtures() / "drop.json").read_text())
  first = next(iter(drop))
  drop[first]["qa_pairs"][0]["answer"] = {"number": "", "spans": [], "date": {}}
  (tmp_path / "drop.json").write_text(json.dumps(drop, indent=2))
  with pytest.raises(readers.DataError, match=rf"drop\.json:\d+: field '{first}\.qa_pairs\[0\]\.answer'"):
    list(paper_sources.read_drop(tmp_path / "drop.json"))
  records = paper_sources.read_drop(tmp_path / "drop.json", on_error="skip")
  assert len(list(records)) == 18 and records.skipped == 1
  webq = tmp_path / "webq.json"
  webq.write_text(json.dumps([{"utterance": "who?", "targetValue": "(list)"}], indent=1))
  with pytest.raises(readers.DataError, match=r"webq\.json:3: field '\[0\]\.targetValue'"):
    list(paper_sources.read_webquestions(webq))
  tsv = tmp_path / "psgs_w100.tsv"
  tsv.write_text("id\ttext\ttitle\n1\tgood passage\tT\nx7\tbad id\tT\n3\t\tT\n")
  with pytest.raises(readers.DataError, match=r"psgs_w100\.tsv:3: field 'id': not an integer"):
    paper_sources.build_tsv_bm25_index(tsv, "dpr")
  skipped = {}
  index = paper_sources.build_tsv_bm25_index(tsv, "dpr", on_error="skip", skipped=skipped)
  assert len(index.corpus) == 1 and skipped[str(tsv)]["count"] == 2
  assert ":4: field 'text': empty" in skipped[str(tsv)]["errors"][1]
  tsv.write_text("1\tno header\tT\n")
  with pytest.raises(readers.DataError, match=r"psgs_w100\.tsv:1: field '<header>'"):
    paper_sources.build_tsv_bm25_index(tsv, "dpr")
