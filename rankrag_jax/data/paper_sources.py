"""The public formats of the paper's Stage-II sources, and BM25 over passage files too large for Python lists.

Readers (each returns `readers.Records`: a malformed row raises `readers.DataError` naming file:line and field,
or with `on_error="skip"` is counted, never silently dropped):
  read_chatqa_sft_jsonl   ChatQA `sft/*.jsonl`: {messages} with no document -> {id, turns}
  read_drop               DROP JSON ({passage_id: {passage, qa_pairs}}) -> reading records {id, question, passage, answer}
  read_webquestions       WebQuestions JSON list: Berant et al.'s {utterance, targetValue} or DPR's
                          {question, answers, positive_ctxs} -> {id, question, answers, gold_passage?}
(ChatQA's QA files, SQuAD/Quoref JSON and MS MARCO TSV are read by `readers`.)

`TsvBm25Index` indexes a passage TSV (MS MARCO `collection.tsv`: pid, passage; DPR `psgs_w100.tsv`: id, text,
title with a header row) in one streamed pass: passages are tokenised with bm25s' Tokenizer into one flat int32
array (4 bytes per kept token) and only each line's byte offset is kept, so no passage text stays in memory; a hit
is read back from the file by its offset. Scoring is the project's BM25 (`retrieval.bm25`: bm25s, lucene,
k1 0.9, b 0.4, English stop words, no stemmer; queries tokenised by `retrieval.bm25`), and the index duck-types
`negatives.Bm25Index` (`corpus[i]`, `search`), so `negatives.mine_bm25_negatives(..., index=...)` mines over it.
Saved with bm25s' own pickle-free files plus `offsets.npy`, so a re-run loads it instead of re-indexing.
"""

import array
import collections
import json
import pathlib
import re
import types
from typing import Sequence

import bm25s
import gin
import numpy as np
import tqdm

from rankrag_jax.data import readers
from rankrag_jax.retrieval import bm25 as bm25_lib
from rankrag_jax.retrieval.corpus import passage_text

DPR_HEADER = ("id", "text", "title")
INDEX_META = "tsv_bm25_meta.json"
INDEX_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------ ChatQA SFT
def read_chatqa_sft_jsonl(path, on_error: str = "raise") -> readers.Records:
  """ChatQA SFT JSONL ({messages: [{role, content}]}, a leading system message ignored) -> {id, turns}."""
  stem = pathlib.Path(path).stem

  def parse(obj, line):
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
      raise readers.RowError("messages", "missing or empty")
    messages = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
    turns = []
    for i, message in enumerate(messages):
      expected = "user" if i % 2 == 0 else "assistant"
      if not isinstance(message, dict) or message.get("role") != expected:
        raise readers.RowError(f"messages[{i}].role", f"expected {expected!r}")
      try:
        content = readers.text_field(message, "content")
      except readers.RowError as e:
        raise readers.RowError(f"messages[{i}].{e.field}", e.message) from None
      if expected == "user":
        turns.append({"user": content})
      else:
        turns[-1]["assistant"] = content
    if not turns or "assistant" not in turns[-1]:
      raise readers.RowError("messages", "no assistant answer")
    return {"id": readers.text_field(obj, "id", required=False) or f"{stem}/{line}", "turns": turns}
  return readers.read_jsonl(path, parse, on_error)


# ------------------------------------------------------------------------------------------------------ DROP
def drop_answer(answer) -> str:
  """A DROP answer object as text: its number, else its spans joined by ", ", else its date ("month day year")."""
  if not isinstance(answer, dict):
    raise readers.RowError("answer", "expected an object")
  number = str(answer.get("number") or "").strip()
  spans = [s.strip() for s in answer.get("spans") or [] if isinstance(s, str) and s.strip()]
  date = answer.get("date") if isinstance(answer.get("date"), dict) else {}
  date_text = " ".join(str(date.get(k) or "").strip() for k in ("month", "day", "year")).split()
  text = number or ", ".join(spans) or " ".join(date_text)
  if not text:
    raise readers.RowError("answer", "no number, spans or date")
  return text


def read_drop(path, on_error: str = "raise") -> readers.Records:
  """DROP JSON (`drop_dataset_train.json`) -> {id: query_id, question, passage, answer} per question."""
  def rows(sink):
    doc, finder = readers.load_json_document(path)
    if not isinstance(doc, dict):
      raise readers.DataError(path, 1, "<document>", "expected an object of passages")
    for passage_id, entry in doc.items():
      line = finder.line_of(passage_id)
      if not isinstance(entry, dict) or not isinstance(entry.get("qa_pairs"), list):
        sink.report(readers.DataError(path, line, f"{passage_id}.qa_pairs", "missing or not a list"))
        continue
      for q, qa in enumerate(entry["qa_pairs"]):
        qa_line = finder.line_of(qa.get("question") if isinstance(qa, dict) else None) or line
        try:
          if not isinstance(qa, dict):
            raise readers.RowError("<qa>", "expected an object")
          record = {"id": readers.text_field(qa, "query_id", required=False) or f"{passage_id}/{q}",
                    "question": readers.text_field(qa, "question"),
                    "passage": readers.text_field(entry, "passage"), "answer": drop_answer(qa.get("answer"))}
        except readers.RowError as e:
          sink.report(readers.DataError(path, qa_line, f"{passage_id}.qa_pairs[{q}].{e.field}", e.message))
          continue
        yield record
  return readers.Records(path, rows, on_error)


# ------------------------------------------------------------------------------------------------ WebQuestions
_TARGET_VALUE_RE = re.compile(r'\(description (?:"((?:[^"\\]|\\.)*)"|([^()"]+))\)')


def read_webquestions(path, on_error: str = "raise") -> readers.Records:
  """WebQuestions JSON list -> {id, question, answers, gold_passage (DPR's first positive_ctxs, else absent)}.

  Berant et al.'s release: {utterance, targetValue: '(list (description "Jazmine Sullivan") ...)'}; DPR's
  retriever file (`webq-train.json`): {question, answers, positive_ctxs: [{title, text}]}.
  """
  def rows(sink):
    doc, finder = readers.load_json_document(path)
    if not isinstance(doc, list):
      raise readers.DataError(path, 1, "<document>", "expected a JSON list of questions")
    for i, row in enumerate(doc):
      question_field = "question" if isinstance(row, dict) and "question" in row else "utterance"
      line = finder.line_of(row.get(question_field) if isinstance(row, dict) else None)
      try:
        if not isinstance(row, dict):
          raise readers.RowError("<row>", "expected an object")
        if question_field == "utterance":
          target = readers.text_field(row, "targetValue")
          answers = [a.replace('\\"', '"').strip() for m in _TARGET_VALUE_RE.finditer(target)
                     for a in [m.group(1) or m.group(2) or ""] if a.strip()]
          if not answers:
            raise readers.RowError("targetValue", f"no (description ...) answer in {target[:80]!r}")
        else:
          answers = readers._answer_list(row.get("answers"), "answers")
        record = {"id": f"webq/{i}", "question": readers.text_field(row, question_field), "answers": answers}
        positives = row.get("positive_ctxs") or []
        if positives:
          if not isinstance(positives[0], dict):
            raise readers.RowError("positive_ctxs[0]", "expected an object")
          record["gold_passage"] = passage_text(readers.text_field(positives[0], "title", False),
                                                readers.text_field(positives[0], "text"))
      except readers.RowError as e:
        sink.report(readers.DataError(path, line, f"[{i}].{e.field}", e.message))
        continue
      yield record
  return readers.Records(path, rows, on_error)


# -------------------------------------------------------------------------------------------- passage TSVs
def _tsv_passage(columns: list[str], fmt: str) -> dict:
  """One line's columns -> {id, title, text}; fmt "msmarco" (pid, passage) or "dpr" (id, text, title)."""
  names = ("pid", "passage") if fmt == "msmarco" else DPR_HEADER
  if len(columns) < len(names):
    raise readers.RowError(names[len(columns)], "missing column")
  values = [c.strip() for c in columns]
  for name, value in zip(names, values):
    if not value and name != "title":
      raise readers.RowError(name, "empty")
  if fmt == "msmarco":
    return {"id": values[0], "title": "", "text": values[1]}
  return {"id": values[0], "title": values[2], "text": values[1]}


class TsvPassages(collections.abc.Sequence):
  """Passages of a TSV file by row, read back from their byte offsets: `passages[i] -> {id, title, text}`."""

  def __init__(self, path, offsets: np.ndarray, fmt: str):
    self.path, self.offsets, self.fmt = pathlib.Path(path), offsets, fmt
    self._file = None

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, row: int) -> dict:
    if self._file is None:
      self._file = open(self.path, "rb")
    self._file.seek(int(self.offsets[row]))
    line = self._file.readline().decode("utf-8").rstrip("\n")
    return _tsv_passage(line.split("\t", 2 if self.fmt == "dpr" else 1), self.fmt)


class _FlatDocs:
  """Token ids of every passage as one flat int32 array + row starts; iterated by bm25s as lists, one at a time."""

  def __init__(self, tokens: np.ndarray, starts: np.ndarray):
    self.tokens, self.starts = tokens, starts

  def __len__(self) -> int:
    return len(self.starts) - 1

  def __iter__(self):
    for i in range(len(self)):
      yield self.tokens[self.starts[i]:self.starts[i + 1]].tolist()


def _stream_tsv(path, fmt: str, on_error: str, skipped: dict, limit: int | None):
  """Yields (byte offset, passage text as indexed) per data line; malformed lines raise or are counted."""
  path = pathlib.Path(path)
  total = path.stat().st_size
  with open(path, "rb") as f, tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=f"indexing {path.name}") as bar:
    offset, line_no, rows = 0, 0, 0
    for raw in f:
      line_no += 1
      start, offset = offset, offset + len(raw)
      bar.update(len(raw))
      line = raw.decode("utf-8", errors="strict").rstrip("\n")
      if not line.strip():
        continue
      columns = line.split("\t", 2 if fmt == "dpr" else 1)
      if fmt == "dpr" and line_no == 1:
        if tuple(c.strip() for c in line.split("\t")) != DPR_HEADER:
          raise readers.DataError(path, 1, "<header>", f"expected the DPR header {DPR_HEADER}, got {columns}")
        continue
      try:
        passage = _tsv_passage(columns, fmt)
        if not passage["id"].lstrip("-").isdigit():  # both formats number their passages; 8 bytes each in memory.
          raise readers.RowError(DPR_HEADER[0] if fmt == "dpr" else "pid", f"not an integer: {passage['id']!r}")
      except readers.RowError as e:
        error = readers.DataError(path, line_no, e.field, e.message)
        if on_error == "raise":
          raise error from None
        entry = skipped.setdefault(str(path), {"count": 0, "errors": []})
        entry["count"] += 1
        entry["errors"] = (entry["errors"] + [str(error)])[:10]
        continue
      yield start, int(passage["id"]), passage_text(passage["title"], passage["text"])
      rows += 1
      if limit is not None and rows >= limit:
        return


class TsvBm25Index:
  """BM25 over a passage TSV; `corpus[i]` reads passage i back from the file (see the module docstring)."""

  def __init__(self, retriever: bm25s.BM25, corpus: TsvPassages, ids: np.ndarray, stopwords: str | None = "en"):
    self.retriever, self.corpus, self.ids, self.stopwords = retriever, corpus, ids, stopwords
    self._order = np.argsort(ids, kind="stable")

  def rows_of(self, passage_ids: Sequence[str]) -> list[int | None]:
    """The row of each passage id (None when the file has no such id), without reading the file."""
    wanted = np.asarray([int(i) if str(i).lstrip("-").isdigit() else -2**62 for i in passage_ids], np.int64)
    positions = np.clip(np.searchsorted(self.ids, wanted, sorter=self._order), 0, len(self.ids) - 1)
    rows = self._order[positions]
    return [int(r) if self.ids[r] == w else None for r, w in zip(rows, wanted)]

  def search(self, queries: Sequence[str], k: int, batch_size: int = 1024) -> list[list[tuple[int, float]]]:
    """Top-k (row, score) per query, best first; hits with score 0 (no shared term) are dropped."""
    results = []
    k = min(k, len(self.corpus))
    for start in tqdm.trange(0, len(queries), batch_size, desc="BM25 search", disable=len(queries) <= batch_size):
      batch = list(queries[start:start + batch_size])
      # Queries tokenised exactly as retrieval.bm25 does (the project's one BM25).
      rows, scores = self.retriever.retrieve(bm25_lib.tokenize(batch, self.stopwords),
                                             k=k, sorted=True, show_progress=False, backend_selection="numpy")
      results += [[(int(r), float(s)) for r, s in zip(row, score) if s > 0] for row, score in zip(rows, scores)]
    return results

  def save(self, directory) -> None:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.retriever.save(str(directory), corpus=None, allow_pickle=False, show_progress=False)
    np.save(directory / "offsets.npy", self.corpus.offsets, allow_pickle=False)
    np.save(directory / "ids.npy", self.ids, allow_pickle=False)
    meta = {"format_version": INDEX_FORMAT_VERSION, "path": str(self.corpus.path), "format": self.corpus.fmt,
            "file_bytes": self.corpus.path.stat().st_size, "rows": len(self.corpus), "stopwords": self.stopwords}
    (directory / INDEX_META).write_text(json.dumps(meta, indent=1) + "\n")


@gin.configurable(denylist=["path", "fmt"])
def build_tsv_bm25_index(path, fmt: str, *, k1: float = 0.9, b: float = 0.4, method: str = "lucene",
                         stopwords: str | None = "en", on_error: str = "raise", skipped: dict | None = None,
                         limit: int | None = None) -> TsvBm25Index:
  """Indexes a passage TSV in one streamed pass (k1, b, method, stopwords: `retrieval.bm25.build_bm25_index`'s).

  Memory: 4 bytes per kept token (flat int32 ids) + 24 per passage (offset, row start, integer id) + the vocabulary dict,
  then bm25s' scoring arrays (~12 bytes per distinct (passage, token) pair, sorted once); bench/README.md has
  the measured numbers for MS MARCO. `limit` indexes only the first rows (tests, benchmarks).
  """
  if fmt not in ("msmarco", "dpr"):
    raise ValueError(f"fmt must be 'msmarco' or 'dpr', got {fmt!r}")
  tokenizer = bm25s.tokenization.Tokenizer(lower=True, stopwords=stopwords, stemmer=None)
  tokens, starts, offsets, passage_ids = array.array("i"), array.array("q", [0]), array.array("q"), array.array("q")
  stream = _stream_tsv(path, fmt, on_error, {} if skipped is None else skipped, limit)
  batch_offsets, batch_ids, batch_texts = [], [], []

  def flush():
    for token_ids in tokenizer.streaming_tokenize(batch_texts, update_vocab=True):
      tokens.extend(token_ids)
      starts.append(len(tokens))
    offsets.extend(batch_offsets)
    passage_ids.extend(batch_ids)
    batch_offsets.clear()
    batch_ids.clear()
    batch_texts.clear()

  for offset, passage_id, text in stream:
    batch_offsets.append(offset)
    batch_ids.append(passage_id)
    batch_texts.append(text)
    if len(batch_texts) == 10_000:
      flush()
  flush()
  if not offsets:
    raise readers.DataError(path, 0, "<file>", "no passages")
  docs = _FlatDocs(np.frombuffer(tokens, dtype=np.int32), np.frombuffer(starts, dtype=np.int64))
  retriever = bm25s.BM25(k1=k1, b=b, method=method, backend="numpy")
  retriever.index(types.SimpleNamespace(ids=docs, vocab=tokenizer.get_vocab_dict()), show_progress=True)
  return TsvBm25Index(retriever, TsvPassages(path, np.frombuffer(offsets, dtype=np.int64).copy(), fmt),
                      np.frombuffer(passage_ids, dtype=np.int64).copy(), stopwords)


def load_tsv_bm25_index(directory, path) -> TsvBm25Index | None:
  """A saved index of `path` (same size as when indexed), memory-mapped; None when absent or stale."""
  directory = pathlib.Path(directory)
  meta_path = directory / INDEX_META
  if not meta_path.is_file():
    return None
  meta = json.loads(meta_path.read_text())
  if (meta.get("format_version") != INDEX_FORMAT_VERSION
      or meta.get("file_bytes") != pathlib.Path(path).stat().st_size):
    return None
  retriever = bm25s.BM25.load(str(directory), load_corpus=False, mmap=True, allow_pickle=False, show_progress=False)
  offsets = np.load(directory / "offsets.npy", allow_pickle=False)
  return TsvBm25Index(retriever, TsvPassages(path, offsets, meta["format"]),
                      np.load(directory / "ids.npy", allow_pickle=False), meta["stopwords"])


def tsv_bm25_index(path, fmt: str, cache_dir, on_error: str = "raise", skipped: dict | None = None
                   ) -> TsvBm25Index:
  """The index of `path`: loaded from `cache_dir` when saved there, else built and saved (resumable builds)."""
  index = load_tsv_bm25_index(cache_dir, path)
  if index is None:
    index = build_tsv_bm25_index(path, fmt, on_error=on_error, skipped=skipped)
    index.save(cache_dir)
  return index
