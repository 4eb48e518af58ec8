"""Readers for the QA / ranking / conversational formats users actually have; each yields plain dicts.
(Retrieval corpora, strict about duplicate ids, are read by `retrieval.corpus.read_corpus_jsonl`.)

Every reader returns a `Records` iterable. A malformed row (bad JSON, missing field, empty answer) raises
`DataError` naming `file:line` and the field; with `on_error="skip"` the row is skipped instead and counted
in `records.skipped` (first messages in `records.errors`), so nothing is ever dropped silently. Rows that are
not data but not errors either (Wikipedia redirects) are counted in `records.filtered`; SQuAD-2.0
unanswerable questions are kept and flagged (`is_impossible`).

The MediaWiki XML dump reader (`read_wikipedia_dump`) lives with the wikitext cleaner in `wikipedia.py`.

Whole-document JSON files (SQuAD, BIG-bench task.json, CoQA) are located row by row in the raw text so that
errors still carry a line number; a file that is not JSON at all always raises (there is no row to skip).
"""

import bz2
import collections
import json
import pathlib
from typing import Any, Callable, Iterator

from absl import logging

ON_ERROR_CHOICES = ("raise", "skip")
_MAX_KEPT_ERRORS = 20


class DataError(ValueError):
  """A malformed input row: `path:line: field 'name': what is wrong`."""

  def __init__(self, path, line: int, field: str, message: str):
    self.path, self.line, self.field = str(path), line, field
    super().__init__(f"{self.path}:{line if line else '?'}: field {field!r}: {message}")


class RowError(Exception):
  """Raised by row parsers; the reader loop adds path and line and turns it into a DataError."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field, self.message = field, message


class Records:
  """A re-iterable stream of reader rows that counts what it skipped and filtered."""

  def __init__(self, path, rows: Callable[["Records"], Iterator[dict]], on_error: str):
    if on_error not in ON_ERROR_CHOICES:
      raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    self.path, self.on_error, self._rows = pathlib.Path(path), on_error, rows
    self.skipped, self.errors, self.filtered = 0, [], collections.Counter()

  def __iter__(self) -> Iterator[dict]:
    self.skipped, self.errors, self.filtered = 0, [], collections.Counter()
    yield from self._rows(self)
    if self.skipped:
      logging.warning("%s: skipped %d malformed rows, e.g. %s", self.path, self.skipped, self.errors[0])

  def report(self, error: DataError) -> None:
    """Raises `error`, or counts it when skipping (called by the row generators)."""
    if self.on_error == "raise":
      raise error
    self.skipped += 1
    if len(self.errors) < _MAX_KEPT_ERRORS:
      self.errors.append(str(error))


# ----------------------------------------------------------------------------------------------- fields
def text_field(row: dict, field: str, required: bool = True) -> str:
  value = row.get(field) if isinstance(row, dict) else None
  if value is None:
    if required:
      raise RowError(field, "missing")
    return ""
  if isinstance(value, (int, float)) and not isinstance(value, bool) and field in ("id", "_id"):
    value = str(value)
  if not isinstance(value, str):
    raise RowError(field, f"expected a string, got {type(value).__name__}")
  if required and not value.strip():
    raise RowError(field, "empty")
  return value.strip()


def _nested_text(row: Any, field: str, where: str, required: bool = True) -> str:
  try:
    if not isinstance(row, dict):
      raise RowError(field, "expected an object")
    return text_field(row, field, required)
  except RowError as e:
    raise RowError(f"{where}.{e.field}", e.message) from None


def _answer_list(value: Any, field: str) -> list[str]:
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, list) or not value:
    raise RowError(field, "empty answer list" if value == [] else "missing or not a list")
  answers = []
  for i, answer in enumerate(value):
    if isinstance(answer, dict):  # SQuAD-style {"text": ...}
      answer = answer.get("text")
    if not isinstance(answer, str) or not answer.strip():
      raise RowError(f"{field}[{i}]", "empty answer")
    answers.append(answer.strip())
  return answers


def open_text(path):
  path = pathlib.Path(path)
  return bz2.open(path, "rt", encoding="utf-8") if path.suffix == ".bz2" else open(path, encoding="utf-8")


def read_jsonl(path, parse: Callable[[dict, int], dict], on_error: str = "raise") -> Records:
  """Any JSONL file, one object per line, through `parse(obj, line)` (which raises RowError naming a field)."""
  return Records(path, _jsonl_rows(path, parse), on_error)


def _jsonl_rows(path, parse: Callable[[dict, int], dict]):
  """Row generator over a JSONL file; `parse(obj, line)` may raise RowError."""
  def rows(sink):
    with open_text(path) as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue  # blank lines (e.g. a trailing newline) are not rows.
        try:
          obj = json.loads(line)
          if not isinstance(obj, dict):
            raise RowError("<row>", f"expected a JSON object, got {type(obj).__name__}")
          record = parse(obj, line_no)
        except json.JSONDecodeError as e:
          sink.report(DataError(path, line_no, "<json>", f"bad JSON: {e.msg} at column {e.colno}"))
          continue
        except RowError as e:
          sink.report(DataError(path, line_no, e.field, e.message))
          continue
        yield record
  return rows


def load_json_document(path) -> tuple[Any, "_LineFinder"]:
  with open_text(path) as f:
    text = f.read()
  try:
    return json.loads(text), _LineFinder(text)
  except json.JSONDecodeError as e:
    raise DataError(path, e.lineno, "<json>", f"bad JSON: {e.msg} at column {e.colno}") from None


class _LineFinder:
  """Finds the line of successive rows of a JSON document by searching their first string value.

  Rows are visited in file order, so each search starts where the last one ended and looks a bounded window
  ahead; a row that cannot be found gets line 0 (printed as `?`) and the search position stays put.
  """
  _WINDOWS = (65_536, 4_000_000)  # rows are adjacent: look close first, far only when the close look fails.

  def __init__(self, text: str):
    self._text, self._pos, self._line = text, 0, 1

  def line_of(self, value: Any) -> int:
    if not isinstance(value, str) or not value:
      return 0
    # Escaping is per character, so the encoded prefix of the value is a prefix of its encoding in the file.
    prefix = value[:40]
    if prefix.isascii() and prefix.isprintable() and '"' not in prefix and "\\" not in prefix:
      snippets = ['"' + prefix]  # nothing to escape (the common case; json.dumps per row is slow).
    else:
      snippets = [json.dumps(prefix, ensure_ascii=ensure_ascii)[:-1] for ensure_ascii in (False, True)]
    for window in self._WINDOWS:
      for snippet in snippets:
        index = self._text.find(snippet, self._pos, self._pos + window)
        if index >= 0:
          self._line += self._text.count("\n", self._pos, index)
          self._pos = index
          return self._line
    return 0


# ----------------------------------------------------------------------------------------------- SQuAD
def read_squad(path, on_error: str = "raise") -> Records:
  """SQuAD v1.1 / v2.0 JSON -> {id, title, context, question, answers, is_impossible} per question.

  A v2.0 question with `is_impossible: true` may have no answers (kept, flagged); any other question
  without a non-empty answer is malformed.
  """
  def rows(sink):
    doc, finder = load_json_document(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
      raise DataError(path, 1, "data", "missing or not a list")
    for a, article in enumerate(doc["data"]):
      title = article.get("title", "") if isinstance(article, dict) else ""
      for p, paragraph in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
        for q, qa in enumerate(paragraph.get("qas", []) if isinstance(paragraph, dict) else []):
          where = f"data[{a}].paragraphs[{p}].qas[{q}]"
          line = finder.line_of(qa.get("id") if isinstance(qa, dict) else None)
          try:
            if not isinstance(qa, dict):
              raise RowError("<qa>", "expected an object")
            context = text_field(paragraph, "context")
            impossible = bool(qa.get("is_impossible", False))
            answers = [] if impossible and not qa.get("answers") else _answer_list(qa.get("answers"), "answers")
            record = {"id": text_field(qa, "id"), "title": title, "context": context, "question": text_field(qa, "question"),
                      "answers": answers, "is_impossible": impossible}
          except RowError as e:
            sink.report(DataError(path, line, f"{where}.{e.field}", e.message))
            continue
          yield record
  return Records(path, rows, on_error)


# ------------------------------------------------------------------------------------- DPR / FlashRAG
def read_qa_jsonl(path, on_error: str = "raise") -> Records:
  """DPR / FlashRAG / NQ-open QA JSONL -> {id, question, answers, ctxs}.

  Answers come from `answers` (DPR), `golden_answers` (FlashRAG) or `answer` (NQ-open, EfficientQA); optional `ctxs` are retrieved passages
  `{id, title, text}` as DPR's retriever writes them. A missing `id` becomes `{file stem}/{line}`.
  """
  stem = pathlib.Path(path).stem

  def parse(obj, line):
    field = next((f for f in ("answers", "golden_answers", "answer") if f in obj), "answers")
    ctxs = []
    for i, ctx in enumerate(obj.get("ctxs") or []):
      if not isinstance(ctx, dict):
        raise RowError(f"ctxs[{i}]", "expected an object")
      try:
        ctxs.append({"id": text_field(ctx, "id", required=False), "title": text_field(ctx, "title", required=False),
                     "text": text_field(ctx, "text")})
      except RowError as e:
        raise RowError(f"ctxs[{i}].{e.field}", e.message) from None
    return {"id": text_field(obj, "id", required=False) or f"{stem}/{line}", "question": text_field(obj, "question"),
            "answers": _answer_list(obj.get(field), field), "ctxs": ctxs}
  return Records(path, _jsonl_rows(path, parse), on_error)


# ---------------------------------------------------------------------------------------------- MS MARCO
def _tsv_rows(path, parse: Callable[[list[str]], dict], max_split: int = -1):
  """Tab-separated columns (whitespace-separated when a line has no tab), at most `max_split` splits."""
  def rows(sink):
    with open_text(path) as f:
      for line_no, line in enumerate(f, 1):
        line = line.rstrip("\n")
        if not line.strip():
          continue
        try:
          record = parse(line.split("\t", max_split) if "\t" in line else line.split(None, max_split))
        except RowError as e:
          sink.report(DataError(path, line_no, e.field, e.message))
          continue
        yield record
  return rows


def _column(columns: list[str], index: int, field: str) -> str:
  if len(columns) <= index or not columns[index].strip():
    raise RowError(field, "missing column" if len(columns) <= index else "empty")
  return columns[index].strip()


def read_msmarco_collection(path, on_error: str = "raise") -> Records:
  """MS MARCO `collection.tsv` (pid \\t passage) -> {id, title: "", text}."""
  return Records(path, _tsv_rows(path, lambda c: {"id": _column(c, 0, "pid"), "title": "",
                                                  "text": _column(c, 1, "passage")}, max_split=1), on_error)


def read_msmarco_queries(path, on_error: str = "raise") -> Records:
  """MS MARCO `queries.*.tsv` (qid \\t query) -> {id, question}."""
  return Records(path, _tsv_rows(path, lambda c: {"id": _column(c, 0, "qid"),
                                                  "question": _column(c, 1, "query")}, max_split=1), on_error)


def read_msmarco_qrels(path, on_error: str = "raise") -> Records:
  """MS MARCO qrels, TREC `qid 0 pid rel` (4 columns) or `qid pid` (2 columns) -> {query_id, passage_id, relevance}."""
  def parse(c):
    if len(c) >= 4:
      relevance = _column(c, 3, "relevance")
      if not relevance.lstrip("-").isdigit():
        raise RowError("relevance", f"not an integer: {relevance!r}")
      return {"query_id": _column(c, 0, "qid"), "passage_id": _column(c, 2, "pid"), "relevance": int(relevance)}
    return {"query_id": _column(c, 0, "qid"), "passage_id": _column(c, 1, "pid"), "relevance": 1}
  return Records(path, _tsv_rows(path, parse), on_error)


def join_msmarco(queries, qrels) -> list[dict]:
  """Queries + qrels -> [{id, question, gold_ids}] for the queries that have a relevant passage, in query order."""
  gold = collections.defaultdict(list)
  for qrel in qrels:
    if qrel["relevance"] > 0:
      gold[qrel["query_id"]].append(qrel["passage_id"])
  return [{"id": q["id"], "question": q["question"], "gold_ids": gold[q["id"]]} for q in queries if q["id"] in gold]


# ------------------------------------------------------------------------------------------------- ChatQA
def read_chatqa_jsonl(path, on_error: str = "raise") -> Records:
  """ChatQA-style conversational JSONL -> {id, turns: [{user, assistant}], passages}.

  `messages` alternate user / assistant (a leading system message is ignored). The target is the last
  assistant message, or `answers[0]` when the conversation ends on a user turn. Context is `document`
  (one string) or `ctxs` (a list of {title, text}) as in ChatRAG-Bench.
  """
  stem = pathlib.Path(path).stem

  def parse(obj, line):
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
      raise RowError("messages", "missing or empty")
    messages = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "user":
      messages = messages + [{"role": "assistant", "content": _answer_list(obj.get("answers"), "answers")[0]}]
    turns = []
    for i, message in enumerate(messages):
      expected = "user" if i % 2 == 0 else "assistant"
      if not isinstance(message, dict) or message.get("role") != expected:
        raise RowError(f"messages[{i}].role", f"expected {expected!r}")
      content = text_field(message, "content")
      if expected == "user":
        turns.append({"user": content})
      else:
        turns[-1]["assistant"] = content
    if not turns or "assistant" not in turns[-1]:
      raise RowError("messages", "no assistant answer")
    if obj.get("ctxs"):
      passages = [" ".join(filter(None, [text_field(c, "title", False), text_field(c, "text")])) for c in obj["ctxs"]]
    else:
      passages = [text_field(obj, "document")]
    return {"id": text_field(obj, "id", required=False) or f"{stem}/{line}", "turns": turns, "passages": passages}
  return Records(path, _jsonl_rows(path, parse), on_error)


# ----------------------------------------------------------------------------------------------- BIG-bench
def read_bigbench_task_info(path) -> dict:
  """A BIG-bench task.json's metadata (name, description, task_prefix, ...), without its examples."""
  doc, _ = load_json_document(path)
  return {k: v for k, v in doc.items() if k != "examples"}


def read_bigbench_task(path, on_error: str = "raise") -> Records:
  """BIG-bench task.json -> {id, line, input, targets: [str], target_scores: {str: float} | None} per example.

  An example needs a non-empty `input` and either a non-empty `target` (string or list) or `target_scores`.
  """
  def rows(sink):
    doc, finder = load_json_document(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("examples"), list):
      raise DataError(path, 1, "examples", "missing or not a list")
    name = doc.get("name") or pathlib.Path(path).parent.name
    for i, example in enumerate(doc["examples"]):
      line = finder.line_of(example.get("input") if isinstance(example, dict) else None)
      try:
        if not isinstance(example, dict):
          raise RowError("<example>", "expected an object")
        scores = example.get("target_scores")
        if scores is not None and (not isinstance(scores, dict) or not scores):
          raise RowError("target_scores", "expected a non-empty object")
        if "target" in example or scores is None:
          targets = _answer_list(example.get("target"), "target")
        else:
          targets = []
        record = {"id": f"{name}/{i}", "line": line, "input": text_field(example, "input"), "targets": targets,
                  "target_scores": scores}
      except RowError as e:
        sink.report(DataError(path, line, f"examples[{i}].{e.field}", e.message))
        continue
      yield record
  return Records(path, rows, on_error)


# --------------------------------------------------------------------------------------------------- CoQA
def read_coqa(path, on_error: str = "raise") -> Records:
  """CoQA JSON -> {id, story, turns: [{user, assistant, rationale}]} per dialogue."""
  def rows(sink):
    doc, finder = load_json_document(path)
    for d, dialogue in enumerate(doc.get("data", []) if isinstance(doc, dict) else []):
      line = finder.line_of(dialogue.get("story") if isinstance(dialogue, dict) else None)
      try:
        questions, answers = dialogue.get("questions"), dialogue.get("answers")
        if not isinstance(questions, list) or not questions:
          raise RowError("questions", "missing or empty")
        if not isinstance(answers, list) or len(answers) != len(questions):
          raise RowError("answers", "missing or not one per question")
        turns = []
        for t, (question, answer) in enumerate(zip(questions, answers)):
          turns.append({"user": _nested_text(question, "input_text", f"questions[{t}]"),
                        "assistant": _nested_text(answer, "input_text", f"answers[{t}]"),
                        "rationale": _nested_text(answer, "span_text", f"answers[{t}]", required=False)})
        record = {"id": text_field(dialogue, "id"), "story": text_field(dialogue, "story"), "turns": turns}
      except RowError as e:
        sink.report(DataError(path, line, f"data[{d}].{e.field}", e.message))
        continue
      yield record
  return Records(path, rows, on_error)


# ------------------------------------------------------------------------------------------------- output
def write_jsonl(path, records) -> int:
  """Writes dicts one per line (UTF-8, no ASCII escaping); returns the count."""
  count = 0
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      count += 1
  return count
