"""Readers, BM25 negatives, Example builders and the real default blend."""

import collections
import json

import pytest

from rankrag_jax import assets, prompts
from rankrag_jax.data import answers, blend, examples, negatives, readers, sources, wikipedia

ANSWERS = ["Bram Stoker"]
CORPUS = [
    {"id": "gold", "title": "Dracula", "text": "Dracula is an 1897 Gothic horror novel by Irish author Bram Stoker."},
    {"id": "c1", "title": "Dracula", "text": "The novel Dracula was written by Stoker, born in Dublin."},
    {"id": "c2", "title": "Dracula", "text": "Dracula the novel: author Bram Stoker wrote it in London."},
    {"id": "c3", "title": "Vampires", "text": "Vampire novels like Dracula shaped gothic horror fiction."},
    {"id": "c4", "title": "Frankenstein", "text": "Frankenstein is a novel written by the author Mary Shelley."},
    {"id": "c5", "title": "Films", "text": "Nosferatu adapted the novel Dracula without permission."},
    {"id": "c6", "title": "Irish writers", "text": "Irish authors of gothic novels include Sheridan Le Fanu."},
    {"id": "c7", "title": "Cooking", "text": "Bread is made from flour, water and yeast."},
]
QUESTION = "Who is the author of the novel Dracula?"


# ------------------------------------------------------------------------------------------------- answers
def test_squad_normalisation_and_whole_word_containment():
  assert answers.normalize_answer("The  Bram-Stoker!") == "bramstoker"
  assert answers.has_answer("written by Bram Stoker.", ["bram stoker"])
  assert not answers.has_answer("a network of roads", ["two"])  # whole words, not substrings.
  assert not answers.has_answer("the end", ["The"])  # an answer that normalises to nothing never matches.
  assert answers.exact_match("the Bram Stoker", ["Bram Stoker"])


def test_ngram_recall():
  assert answers.ngram_recall("he said one two three four five", "one two three four five") == 1.0
  assert answers.ngram_recall("one two three four", "one two three four five six") == pytest.approx(1 / 3)
  assert answers.ngram_recall("x y z", "no") == 0.0
  assert answers.ngram_recall("the yes, it was", "Yes") == 1.0  # shorter than 4 words: its own length.


# ---------------------------------------------------------------------------------------------- negatives
def test_bm25_negatives_never_contain_an_answer_and_exclude_the_gold():
  hits = negatives.retrieve_bm25_contexts([QUESTION], CORPUS, k=7, gold_ids=["gold"])[0]
  assert any(answers.has_answer(h["text"], ANSWERS) for h in hits)  # the filter below has something to remove.
  mined = negatives.mine_bm25_negatives([QUESTION], [ANSWERS], CORPUS, k=3, gold_ids=["gold"])[0]
  assert len(mined) == 3
  for passage in mined:
    assert passage["id"] != "gold"
    assert not answers.has_answer(f"{passage['title']} {passage['text']}", ANSWERS)
  assert [h["id"] for h in hits if h in mined] == [p["id"] for p in mined]  # kept in BM25 order.


def test_bm25_negatives_on_real_passages(small_blend):
  index = negatives.Bm25Index(small_blend["corpus"][:3000])
  questions = _nq_train_questions()[:40]
  mined = negatives.mine_bm25_negatives([q["question"] for q in questions], [q["answers"] for q in questions], None,
                                        k=4, index=index)
  assert sum(map(len, mined)) >= 150
  for question, passages in zip(questions, mined):
    for passage in passages:
      assert not answers.has_answer(passage["title"] + " " + passage["text"], question["answers"])


# ----------------------------------------------------------------------------------------------- builders
def _qa_records(n=6):
  hits = negatives.retrieve_bm25_contexts([QUESTION] * n, CORPUS, k=4, gold_ids=["gold"] * n)
  return [{"id": f"q{i}", "question": QUESTION, "answers": ANSWERS, "gold_passage": CORPUS[0]["text"],
           "retrieved": [h["text"] for h in hits[i]]} for i in range(n)]


def test_ra_examples_have_five_passages_with_the_gold_among_them():
  records = _qa_records()
  for example in examples.build_ra_qa_examples(records, component="ra_qa", seed=0):
    assert len(example["passages"]) == 5 and example["passage_style"] == "numbered"
    assert example["passages"].count(CORPUS[0]["text"]) == 1
    assert example["turns"][-1]["assistant"] == "Bram Stoker"
  with pytest.raises(ValueError):
    examples.build_ra_qa_examples([dict(records[0], retrieved=records[0]["retrieved"][:3])], component="x", seed=0)


def test_shuffling_is_seeded_and_shared_by_ra_qa_and_ra_ranking():
  records = _qa_records(12)
  first = examples.build_ra_qa_examples(records, component="ra_qa", seed=0)
  again = examples.build_ra_qa_examples(list(reversed(records)), component="ra_qa", seed=0)[::-1]
  other_seed = examples.build_ra_qa_examples(records, component="ra_qa", seed=1)
  ranking = examples.build_ra_ranking_examples(records, component="ra_ranking", seed=0)
  assert [e["passages"] for e in first] == [e["passages"] for e in again]  # independent of record order.
  assert [e["passages"] for e in first] == [e["passages"] for e in ranking]
  assert [e["passages"] for e in first] != [e["passages"] for e in other_seed]
  assert len({e["passages"].index(CORPUS[0]["text"]) for e in first}) > 1  # the gold moves around.


def test_ra_ranking_labels_every_passage_with_an_answer():
  for example in examples.build_ra_ranking_examples(_qa_records(), component="ra_ranking", seed=0):
    relevant = [i for i, p in enumerate(example["passages"], 1) if answers.has_answer(p, ANSWERS)]
    gold = example["passages"].index(CORPUS[0]["text"]) + 1
    assert gold in relevant and example["label"] == relevant and len(relevant) >= 2
    assert example["turns"][-1]["assistant"] == ", ".join(f"Passage {i}" for i in relevant)
    assert example["turns"][-1]["user"] == prompts.ra_ranking_question(QUESTION)


def test_context_ranking_pairs():
  record = {"id": "q", "question": QUESTION, "gold_passage": "gold text", "negatives": ["n0", "n1", "n2"]}
  pairs = examples.build_context_ranking_examples([record], component="cr", negatives_per_question=2)
  assert [(e["passages"], e["label"], e["turns"][-1]["assistant"]) for e in pairs] == [
      (["gold text"], True, "True"), (["n0"], False, "False"), (["n1"], False, "False")]
  assert pairs[0]["turns"][-1]["user"] == prompts.context_ranking_question(QUESTION)


def test_conversational_ranking_thresholds():
  reference = " ".join(f"r{i}" for i in range(13))  # 10 distinct 4-grams.
  relevant_chunk = (reference + " ") + " ".join(f"x{i}" for i in range(137))
  # r0..r5 share 3 of the 10 reference 4-grams: recall 0.3, between the thresholds -> dropped.
  ambiguous_chunk = " ".join(f"r{i}" for i in range(6)) + " " + " ".join(f"y{i}" for i in range(144))
  irrelevant_chunk = " ".join(f"z{i}" for i in range(150))
  dialogue = {"id": "d", "document": " ".join([relevant_chunk, ambiguous_chunk, irrelevant_chunk]),
              "turns": [{"user": "first?", "assistant": "unknown"},
                        {"user": "what?", "assistant": "short", "rationale": reference}]}
  assert examples.chunk_words(dialogue["document"]) == [relevant_chunk, ambiguous_chunk, irrelevant_chunk]
  dropped = collections.Counter()
  pairs = examples.build_conversational_ranking_examples([dialogue], component="conv", dropped=dropped)
  second_turn = [e for e in pairs if "/turn1/" in e["id"]]
  assert [(e["id"].rsplit("/", 1)[-1], e["label"]) for e in second_turn] == [("chunk0", True), ("chunk2", False)]
  assert dropped["ambiguous"] == 1
  assert second_turn[0]["turns"][:-1] == [{"user": "first?", "assistant": prompts.UNANSWERABLE_ANSWER}]
  assert second_turn[0]["turns"][-1]["user"] == prompts.context_ranking_question("what?")
  words = reference.split()
  assert examples.chunk_relevance(" ".join(words[:9]), reference) is True  # recall 6/10 > 0.5
  assert examples.chunk_relevance(" ".join(words[:8]), reference) is None  # exactly 0.5: not > 0.5, dropped.
  assert examples.chunk_relevance(" ".join(words[:4]), reference) is None  # exactly 0.1: not < 0.1, dropped.
  assert examples.chunk_relevance(" ".join(words[:3]), reference) is False  # 0 < 0.1


def test_other_builders():
  claim = examples.build_claim_ranking_examples(
      [{"id": "v", "claim": "c.", "evidence": "e", "relevant": False}], component="claims")[0]
  assert claim["turns"][-1] == {"user": prompts.claim_ranking_question("c."), "assistant": "False"}
  sft = examples.build_sft_examples([{"id": "s", "turns": [{"user": "u", "assistant": "a"}]}], component="sft")[0]
  assert sft["system"] == "" and sft["passages"] == [] and sft["passage_style"] == "none"
  dialogue = {"id": "d", "document": "doc", "turns": [{"user": f"q{i}", "assistant": f"a{i}"} for i in range(6)]}
  conv = examples.build_conversational_qa_examples([dialogue], component="conv", seed=3, cuts_per_dialogue=2)
  assert len(conv) == 2
  for example in conv:
    assert example["turns"][0]["user"] == "Answer the following question with a short span. q0"
    assert example["turns"][-1]["assistant"] == f"a{len(example['turns']) - 1}"
  qa = examples.build_context_rich_qa_examples([{"id": "r", "question": "q", "passage": "p", "answer": "a"}],
                                               component="drop", dataset="drop")[0]
  assert qa["turns"][0]["user"] == "Answer the following question with a short span. q"


# ------------------------------------------------------------------------------------------------- readers
def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return path


def _lines(*rows):
  return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


@pytest.mark.parametrize("reader, rows, line, field", [
    (readers.read_qa_jsonl, [{"question": "q", "answers": ["a"]}, "{bad json", {"question": "q", "answers": ["a"]}],
     2, "<json>"),
    (readers.read_qa_jsonl, [{"question": "q", "answers": ["a"]}, {"answers": ["a"]}], 2, "question"),
    (readers.read_qa_jsonl, [{"question": "q", "golden_answers": [""]}], 1, "golden_answers[0]"),
    (readers.read_qa_jsonl, [{"question": "q", "answers": []}], 1, "answers"),
    (readers.read_chatqa_jsonl, [{"messages": [{"role": "assistant", "content": "a"}], "document": "d"}], 1,
     "messages[0].role"),
    (readers.read_chatqa_jsonl, [{"messages": [{"role": "user", "content": "q"}], "document": "d"}], 1, "answers"),
])
def test_malformed_jsonl_rows_name_file_line_and_field(tmp_path, reader, rows, line, field):
  path = _write(tmp_path / "data.jsonl", _lines(*rows))
  with pytest.raises(readers.DataError) as error:
    list(reader(path))
  assert f"{path}:{line}:" in str(error.value) and f"field {field!r}" in str(error.value)
  records = reader(path, on_error="skip")
  assert len(list(records)) == len(rows) - 1 and records.skipped == 1
  assert f"{path}:{line}:" in records.errors[0]


def test_good_jsonl_rows_read(tmp_path):
  qa = list(readers.read_qa_jsonl(_write(tmp_path / "nq.jsonl", _lines(
      {"id": "7", "question": "q", "golden_answers": ["a", "b"], "ctxs": [{"id": "1", "title": "t", "text": "x"}]}))))
  assert qa == [{"id": "7", "question": "q", "answers": ["a", "b"], "ctxs": [{"id": "1", "title": "t", "text": "x"}]}]
  chat = list(readers.read_chatqa_jsonl(_write(tmp_path / "chat.jsonl", _lines(
      {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "q2"}], "answers": ["a2"], "document": "doc"}))))
  assert chat[0]["turns"] == [{"user": "q1", "assistant": "a1"}, {"user": "q2", "assistant": "a2"}]


def test_msmarco_tsvs(tmp_path):
  collection = _write(tmp_path / "collection.tsv", "0\tfirst passage\n1\t\n2\tthird\n")
  queries = _write(tmp_path / "queries.tsv", "10\twhat is first?\n11\tthird?\n")
  qrels = _write(tmp_path / "qrels.tsv", "10\t0\t0\t1\n11 0 2 1\n12\t0\t5\tx\n")
  with pytest.raises(readers.DataError, match=r"collection.tsv:2: field 'passage'"):
    list(readers.read_msmarco_collection(collection))
  with pytest.raises(readers.DataError, match=r"qrels.tsv:3: field 'relevance'"):
    list(readers.read_msmarco_qrels(qrels))
  qrel_rows = readers.read_msmarco_qrels(qrels, on_error="skip")
  joined = readers.join_msmarco(list(readers.read_msmarco_queries(queries)), list(qrel_rows))
  assert joined == [{"id": "10", "question": "what is first?", "gold_ids": ["0"]},
                    {"id": "11", "question": "third?", "gold_ids": ["2"]}]
  assert qrel_rows.skipped == 1


def test_json_documents_report_the_rows_line(tmp_path):
  squad = {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "ctx", "qas": [
      {"id": "a1", "question": "q", "answers": [{"text": "x", "answer_start": 0}]},
      {"id": "a2", "question": "q", "answers": [{"text": "", "answer_start": 0}]},
      {"id": "a3", "question": "q", "answers": [], "is_impossible": True}]}]}]}
  path = _write(tmp_path / "squad.json", json.dumps(squad, indent=2))
  line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if '"a2"' in text)
  with pytest.raises(readers.DataError, match=rf"squad.json:{line}: field 'data\[0\].paragraphs\[0\].qas\[1\]"):
    list(readers.read_squad(path))
  rows = readers.read_squad(path, on_error="skip")
  assert [(r["id"], r["is_impossible"]) for r in rows] == [("a1", False), ("a3", True)] and rows.skipped == 1
  task = {"name": "t", "examples": [{"input": "in1", "target": "x"}, {"input": "in2", "target": [""]},
                                    {"input": "in3", "target_scores": {"True": 1, "False": 0}}]}
  path = _write(tmp_path / "task.json", json.dumps(task, indent=4))
  line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if '"in2"' in text)
  with pytest.raises(readers.DataError, match=rf"task.json:{line}: field 'examples\[1\].target\[0\]'"):
    list(readers.read_bigbench_task(path))
  assert [r["input"] for r in readers.read_bigbench_task(path, on_error="skip")] == ["in1", "in3"]
  _write(tmp_path / "broken.json", '{"data": [\n  {"x": }\n]}')
  with pytest.raises(readers.DataError, match=r"broken.json:2: field '<json>'"):
    list(readers.read_squad(tmp_path / "broken.json"))


def test_coqa_reader(tmp_path):
  coqa = {"data": [{"id": "d1", "story": "s", "questions": [{"input_text": "q"}],
                    "answers": [{"input_text": "a", "span_text": "r"}]},
                   {"id": "d2", "story": "s", "questions": [{"input_text": "q"}], "answers": [{"input_text": ""}]}]}
  path = _write(tmp_path / "coqa.json", json.dumps(coqa, indent=2))
  with pytest.raises(readers.DataError, match=r"field 'data\[1\].answers\[0\].input_text': empty"):
    list(readers.read_coqa(path))
  rows = list(readers.read_coqa(path, on_error="skip"))
  assert rows == [{"id": "d1", "story": "s", "turns": [{"user": "q", "assistant": "a", "rationale": "r"}]}]


def _chat_row(user, ideal, system="Instructions."):
  return {"input": [{"role": "system", "content": system}, {"role": "user", "content": user}], "ideal": ideal}


def test_evals_and_nq_source_readers(tmp_path):
  """The blend's source layouts (evals' chat records, NQ-open's `answer`), with malformed rows named by line."""
  nq = _write(tmp_path / "nq.jsonl", _lines({"question": "who wrote dracula", "answer": ["Bram Stoker"]},
                                            {"question": "q", "answer": []}))
  with pytest.raises(readers.DataError, match=r"nq.jsonl:2: field 'answer'"):
    list(readers.read_qa_jsonl(nq))
  assert [r["answers"] for r in readers.read_qa_jsonl(nq, on_error="skip")] == [["Bram Stoker"]]

  squad2 = _write(tmp_path / "squad2.jsonl", _lines(
      _chat_row("Question: Who?\n Context: Stoker wrote it.", "Solveable"),
      _chat_row("Question: When?\n Context: Stoker wrote it.", "Unsolveable"),
      _chat_row("no layout here", "Solveable"), _chat_row("Question: a\n Context: b", "Maybe")))
  records = sources.read_unsolvable(squad2, on_error="skip")
  assert [(r["id"], r["question"], r["passage"], r["answerable"]) for r in records] == [
      ("squad2/001", "Who?", "Stoker wrote it.", True), ("squad2/002", "When?", "Stoker wrote it.", False)]
  assert records.skipped == 2 and "squad2.jsonl:3: field 'input'" in records.errors[0]
  assert "squad2.jsonl:4: field 'ideal'" in records.errors[1]

  choice = _write(tmp_path / "logiqa.jsonl", _lines(
      _chat_row("\nPassage: P one.Question: Which?\nA. A.x\nB. B.y\nC. z\nD. w\nAnswer:", "B"),
      _chat_row("\nPassage: P.Question: Which?\nA. x\nB. y\nC. z\nD. w\nAnswer:", "E")))
  with pytest.raises(readers.DataError, match=r"logiqa.jsonl:2: field 'ideal'"):
    list(sources.read_multiple_choice(choice, "logiqa"))
  assert list(sources.read_multiple_choice(choice, "logiqa", on_error="skip")) == [
      {"id": "logiqa/0001", "question": "Which?\nA. x\nB. y\nC. z\nD. w", "passage": "P one.", "answer": "B. y"}]

  few_shot = {"input": [{"role": "system", "content": "Sort."}, {"role": "user", "content": "2,1"},
                        {"role": "assistant", "content": "1,2"}, {"role": "user", "content": "3,1"}], "ideal": ["1,3"]}
  chat = _write(tmp_path / "chat.jsonl", _lines(few_shot, {"input": [{"role": "robot", "content": "x"}], "ideal": "y"}))
  with pytest.raises(readers.DataError, match=r"chat.jsonl:2: field 'input\[0\]'"):
    list(sources.read_chat_samples(chat, "sort"))
  assert list(sources.read_chat_samples(chat, "sort", on_error="skip")) == [
      {"id": "evals/sort/0001", "turns": [{"user": "Sort.\n\n2,1", "assistant": "1,2"},
                                          {"user": "3,1", "assistant": "1,3"}]}]

  wiki = _write(tmp_path / "summaries.json", json.dumps(
      {"Alpha": {"title": "Alpha", "extract": " ".join(["w"] * 115)}, "Beta": {"title": "Beta"}}, indent=1))
  with pytest.raises(readers.DataError, match=r"summaries.json:\d+: field 'Beta.extract'"):
    list(sources.read_wiki_summaries(wiki))
  assert [(p["id"], p["title"], len(p["text"].split())) for p in sources.read_wiki_summaries(wiki, on_error="skip")
          ] == [("wiki_summaries/00000/0", "Alpha", 115)]  # a <20-word tail joins its passage.


WIKI_DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page>
    <title>Alpha</title>
    <ns>0</ns>
    <id>1</id>
    <revision><text>'''Alpha''' is a [[Greek alphabet|letter]].{{Infobox|x={{y}}}}&lt;ref&gt;c&lt;/ref&gt; It is first.
[[File:A.png|thumb|An [[image]]]]
== History ==
* It came from [[Phoenicia]] [http://example.com the source].
== References ==
{{Reflist}} Smith 2001.</text></revision>
  </page>
  <page>
    <title>Redirected</title>
    <ns>0</ns>
    <id>2</id>
    <redirect title="Alpha" />
    <revision><text>#REDIRECT [[Alpha]]</text></revision>
  </page>
  <page>
    <title>Broken</title>
    <ns>0</ns>
    <id>3</id>
    <revision><text></text></revision>
  </page>
</mediawiki>
"""


def test_wikipedia_dump_reader(tmp_path):
  path = _write(tmp_path / "dump.xml", WIKI_DUMP)
  with pytest.raises(readers.DataError, match=r"dump.xml:20: field 'page.text'"):
    list(wikipedia.read_wikipedia_dump(path))
  records = wikipedia.read_wikipedia_dump(path, on_error="skip")
  assert list(records) == [{"id": "enwiki/1/0", "title": "Alpha",
                            "text": "Alpha is a letter. It is first. It came from Phoenicia the source."}]
  assert records.skipped == 1 and records.filtered == {"redirect": 1}
  assert [len(p.split()) for p in wikipedia.split_into_passages(" ".join(["w"] * 215), 100)] == [100, 115]
  assert [len(p.split()) for p in wikipedia.split_into_passages(" ".join(["w"] * 230), 100)] == [100, 100, 30]


# --------------------------------------------------------------------------------------------- real blend
SMALL_SIZES = {name: 24 for name in blend.COMPONENTS}


def _read_blend(out_dir, name):
  return [json.loads(line) for line in (out_dir / name).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small_blend(tmp_path_factory):
  """The real blend from the real (empty-cache-fetched) assets, small sizes; ~20 s (BM25 over 16.6k passages)."""
  out_dir = tmp_path_factory.mktemp("blend")
  manifest = blend.build_default_blend(out_dir, seed=0, sizes=SMALL_SIZES)
  return {"dir": out_dir, "manifest": manifest, "corpus": _read_blend(out_dir, "corpus.jsonl"),
          "heldout": _read_blend(out_dir, "heldout.jsonl"),
          "components": {name: _read_blend(out_dir, f"{name}.jsonl") for name in blend.COMPONENTS}}


def test_real_build_produces_every_component(small_blend):
  manifest = small_blend["manifest"]
  assert json.loads((small_blend["dir"] / "manifest.json").read_text()) == manifest
  for name, component in small_blend["components"].items():
    assert len(component) == manifest["components"][name]["count"] == 24, name
    for example in component:
      assert example["component"] == name and example["task"] == blend.COMPONENTS[name][0]
      prompts.render_segments(example)  # every example renders.
  for example in small_blend["components"]["nq_ra_qa"] + small_blend["components"]["nq_ra_ranking"]:
    assert len(example["passages"]) == 5
  assert manifest["corpus"] == {"count": 16622, "wiki_summaries": 11193, "enwiki": 4429, "evals_wikipedia": 1000}
  assert manifest["nq_open"]["train_questions"] == 3610 + 1800 and manifest["nq_open"]["heldout_questions"] == 1769
  assert len(small_blend["heldout"]) == 1769
  # evals' irrelevant-negative-diversion has one row without an answer (line 136): counted, not silent.
  assert sum(v["count"] for v in manifest["skipped_malformed_rows"].values()) == 1
  for name in ("nq_context_ranking", "squad2_context_ranking"):
    assert manifest["components"][name]["true_fraction"] == pytest.approx(0.5, abs=0.13), name
  refusals = [e for e in small_blend["components"]["nq_squad2_context_qa"]
              if e["turns"][-1]["assistant"] == prompts.UNANSWERABLE_ANSWER]
  assert len(refusals) == 6  # unanswerable_fraction 0.25 of 24.
  sft_sets = {e["id"].split("/")[1] for e in small_blend["components"]["evals_sft"]}
  assert sft_sets == set(blend.SFT_SETS)  # round robin: 24 records cover all 18 sets.
  coverage = manifest["bm25_answer_recall"]
  for split in ("train", "heldout"):
    recalls = [coverage[split][f"recall@{k}"] for k in blend.COVERAGE_DEPTHS]
    assert recalls == sorted(recalls) and 0.03 < recalls[0] and recalls[-1] < 0.5, (split, recalls)


def test_nq_positives_contain_an_answer_and_negatives_do_not(small_blend):
  train = {q["id"]: q for q in _nq_train_questions()}
  for example in small_blend["components"]["nq_context_ranking"]:
    question = train[example["id"].rsplit("/", 1)[0]]
    assert answers.has_answer(example["passages"][0], question["answers"]) == example["label"], example["id"]
  for example in small_blend["components"]["nq_ra_ranking"]:
    question = train[example["id"]]
    assert example["label"] == [i for i, p in enumerate(example["passages"], 1)
                                if answers.has_answer(p, question["answers"])], example["id"]


class _FixedOrderIndex:
  """A stand-in for `negatives.Bm25Index` whose every query returns the corpus in order."""

  def __init__(self, corpus):
    self.corpus = corpus

  def search(self, queries, k):
    return [[(i, 1.0) for i in range(min(k, len(self.corpus)))] for _ in queries]


def test_title_rule_skips_passages_that_hold_the_answer_by_coincidence():
  question = {"id": "q", "question": "how many hoops are used in a game of croquet", "answers": ["six"]}
  corpus = [{"id": "0", "title": "Chess", "text": "Each player starts with six kinds of pieces."},
            {"id": "1", "title": "Heavy metal", "text": "Heavy metal bands play loud music."},
            {"id": "2", "title": "Croquet", "text": "Croquet is played with six hoops on a lawn."}]
  index = _FixedOrderIndex(corpus)
  [by_answer] = blend.with_positives([question], index, 20)
  [by_title] = blend.with_positives([question], index, 20, "answer_and_title")
  assert (by_answer["gold_passage_id"], by_title["gold_passage_id"]) == ("0", "2")
  assert blend.with_positives([question], index, 2, "answer_and_title") == []  # "Croquet" is below depth 2.
  # A word of the question, matched as a prefix of at least 4 letters either way; or a title naming the answer.
  assert blend.title_on_topic("what causes the ocean tides", {"title": "Tide"}, ["the Moon"])
  assert blend.title_on_topic("two atoms that are covalently bonded", {"title": "Covalent bond"}, ["pairs"])
  assert blend.title_on_topic("who invented the printing press", {"title": "Johannes Gutenberg"}, ["Gutenberg"])
  assert not blend.title_on_topic("when did the rams go back to la", {"title": "Homeland"}, ["2016"])
  assert not blend.title_on_topic("what is the sun made of", {"title": "Sunday"}, ["gas"])  # "sun": 3 letters
  assert not blend.title_on_topic("who sang it", {"title": ""}, ["it"])
  with pytest.raises(ValueError, match="positive rule 'title'"):
    blend.with_positives([question], index, 20, "title")


def _nq_train_questions():
  root = assets.asset_file("nq_open")
  return [q for name in blend.NQ_TRAIN_FILES for q in readers.read_qa_jsonl(root / name)]


def test_real_build_is_deterministic_and_never_queries_heldout(small_blend, tmp_path, monkeypatch):
  queries = []
  search = negatives.Bm25Index.search

  def recording_search(self, questions, k):
    queries.extend(questions)
    return search(self, questions, k)

  monkeypatch.setattr(negatives.Bm25Index, "search", recording_search)
  blend.build_default_blend(tmp_path, seed=0, sizes=SMALL_SIZES, coverage=False)
  heldout_questions = {q["question"] for q in small_blend["heldout"]}
  assert len(queries) > 5000 and not heldout_questions & set(queries)  # not even as a BM25 query for negatives.
  for name in [*blend.COMPONENTS, "heldout", "corpus"]:
    assert (tmp_path / f"{name}.jsonl").read_bytes() == (small_blend["dir"] / f"{name}.jsonl").read_bytes(), name
  heldout_ids = {q["id"] for q in small_blend["heldout"]}
  for name, component in small_blend["components"].items():
    for example in component:
      assert not example["id"].startswith(blend.NQ_HELDOUT_FILE.removesuffix(".jsonl")), name
      assert example["id"].rsplit("/", 1)[0] not in heldout_ids and example["id"] not in heldout_ids, name


def test_ranking_eval_slice_labels_answers_and_on_topic_answers(small_blend):
  from rankrag_jax.training import ranking_eval  # pylint: disable=g-import-not-at-top
  questions = ranking_eval.ranking_questions(num_questions=6, blend_dir=str(small_blend["dir"]),
                                             validation_fraction=0.02)
  title_of = {p["id"]: p["title"] for p in small_blend["corpus"]}
  text_to_id = {blend.passage_text(p["title"], p["text"]): p["id"] for p in small_blend["corpus"]}
  assert len(questions) == 6
  for q in questions:
    assert list(q["labels"]) == [answers.has_answer(p, q["answers"]) for p in q["passages"]]
    assert 0 < q["labels"].sum() < len(q["labels"])
    titles = [{"title": title_of[text_to_id[p]]} for p in q["passages"]]
    assert list(q["on_topic"]) == [bool(label) and blend.title_on_topic(q["question"], title, q["answers"])
                                   for title, label in zip(titles, q["labels"])]
  assert any(q["on_topic"].any() for q in questions) and any((q["labels"] & ~q["on_topic"]).any() for q in questions)
