"""A retrieval corpus: passages read from JSONL into columns of ids, titles and texts.

The corpus file has one JSON object per line with string fields `id`, `title` and `text` (DPR-style wikipedia
dumps). Also read: BEIR's `_id` for `id`, and FlashRAG's `contents` ("title\ntext", the title in quotes) for
`title` + `text`. `title` may be empty or absent (SQuAD paragraphs have none); `text` may not. Blank lines are
skipped. Every other defect stops the read with a `CorpusError` that names `file:line` and the
field, because a silently dropped passage shifts retrieval results without any visible symptom.

    >>> corpus = read_corpus_jsonl("wiki.jsonl")
    >>> corpus.ids[0], passage_text(corpus.titles[0], corpus.texts[0])
"""

import dataclasses
import json
import os
import pathlib
from typing import Iterable, Sequence

# Order matters only for error messages: we report the first field that is wrong.
CORPUS_FIELDS = ("id", "title", "text")


class CorpusError(ValueError):
  """A corpus file (or in-memory corpus) that cannot be used for retrieval."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Passages in columns: row `i` is (`ids[i]`, `titles[i]`, `texts[i]`).

  Retrieval indexes return row positions; `ids` turns them into the corpus' own passage ids.
  """
  ids: tuple[str, ...]
  titles: tuple[str, ...]
  texts: tuple[str, ...]

  def __post_init__(self):
    if not len(self.ids) == len(self.titles) == len(self.texts):
      raise CorpusError(f"corpus columns differ in length: {len(self.ids)} ids, {len(self.titles)} titles, "
                        f"{len(self.texts)} texts")
    if not self.ids:
      raise CorpusError("the corpus is empty: retrieval needs at least one passage")
    if len(set(self.ids)) != len(self.ids):
      seen = set()
      duplicate = next(i for i in self.ids if i in seen or seen.add(i))
      raise CorpusError(f"duplicate passage id {duplicate!r}: ids must be unique")

  def __len__(self) -> int:
    return len(self.ids)

  def passages(self) -> list[str]:
    """All passages as models see them (`passage_text` of each row), in row order."""
    return [passage_text(title, text) for title, text in zip(self.titles, self.texts)]

  def passages_by_id(self, ids: Iterable[str]) -> list[str]:
    """The passages (as models see them) of the given passage ids, e.g. a row of retrieval results."""
    row_of = self._row_of_id()
    missing = [i for i in ids if i not in row_of]
    if missing:
      raise KeyError(f"passage ids not in the corpus: {missing[:5]}")
    return [passage_text(self.titles[row_of[i]], self.texts[row_of[i]]) for i in ids]

  def _row_of_id(self) -> dict[str, int]:
    # Built on demand and cached on the (frozen) instance; a corpus is read once and searched many times.
    cached = self.__dict__.get("_row_of_id_cache")
    if cached is None:
      cached = {passage_id: row for row, passage_id in enumerate(self.ids)}
      object.__setattr__(self, "_row_of_id_cache", cached)
    return cached


def passage_text(title: str, text: str) -> str:
  """How a passage is shown to every model (BM25, the dense encoder, the ranker/generator prompts).

  `"{title}\\n{text}"`, or just `text` when the title is empty. One spelling everywhere, so a passage scores the
  same whichever stage looks at it.
  """
  title = title.strip()
  return f"{title}\n{text}" if title else text


def corpus_from_rows(rows: Sequence[dict], source: str = "<rows>") -> Corpus:
  """Builds a `Corpus` from dicts with `id`, `title`, `text`, validating each as `read_corpus_jsonl` does.

  `source` names the rows in error messages (row numbers count from 1).
  """
  ids, titles, texts = [], [], []
  for number, row in enumerate(rows, start=1):
    passage_id, title, text = _validated_row(row, f"{source}:{number}")
    ids.append(passage_id)
    titles.append(title)
    texts.append(text)
  if not ids:
    raise CorpusError(f"{source}: the corpus is empty (no passages)")
  return Corpus(tuple(ids), tuple(titles), tuple(texts))


def read_corpus_jsonl(path: str | os.PathLike) -> Corpus:
  """Reads a corpus JSONL file (`{"id", "title", "text"}` per line) into a `Corpus`.

  Raises:
    CorpusError: on bad JSON, a missing or non-string field, an empty text or id, a duplicate id, or a file
      with no passages; the message names `path:line` and the field.
  """
  path = os.fspath(path)
  ids, titles, texts = [], [], []
  first_line_of_id = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise CorpusError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
      passage_id, title, text = _validated_row(row, where)
      if passage_id in first_line_of_id:
        raise CorpusError(f"{where}: field 'id': duplicate id {passage_id!r} (first on line "
                          f"{first_line_of_id[passage_id]})")
      first_line_of_id[passage_id] = number
      ids.append(passage_id)
      titles.append(title)
      texts.append(text)
  if not ids:
    raise CorpusError(f"{path}: the corpus is empty (no passages); expected one JSON object per line with "
                      f"fields {list(CORPUS_FIELDS)}")
  return Corpus(tuple(ids), tuple(titles), tuple(texts))


def write_corpus_jsonl(corpus: Corpus, path: str | os.PathLike) -> None:
  """Writes `corpus` in the format `read_corpus_jsonl` reads."""
  with open(path, "w", encoding="utf-8") as f:
    for passage_id, title, text in zip(corpus.ids, corpus.titles, corpus.texts):
      f.write(json.dumps({"id": passage_id, "title": title, "text": text}, ensure_ascii=False) + "\n")


def write_index_meta(directory: pathlib.Path, meta_file: str, meta: dict) -> None:
  """Writes a saved index's meta file (JSON: its format_version, passage ids, ...) into `directory`."""
  (directory / meta_file).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


def read_index_meta(directory: str | os.PathLike, meta_file: str, kind: str, format_version: int,
                    fields: Sequence[str]) -> dict:
  """A saved index's meta file, checked: a directory without it, bad JSON, another format_version or a missing
  field fails naming the file (not a KeyError from the loader)."""
  path = pathlib.Path(directory) / meta_file
  if not path.exists():
    raise FileNotFoundError(f"{directory} is not a {kind} index directory (no {meta_file})")
  try:
    meta = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e}); rebuild the index") from None
  if not isinstance(meta, dict) or meta.get("format_version") != format_version:
    found = meta.get("format_version") if isinstance(meta, dict) else None
    raise ValueError(f"{path}: unsupported format_version {found!r} (expected {format_version})")
  missing = [field for field in fields if field not in meta]
  if missing:
    raise ValueError(f"{path}: missing field(s) {', '.join(map(repr, missing))}; rebuild the index")
  return meta


def _validated_row(row, where: str) -> tuple[str, str, str]:
  """Returns (id, title, text) of one row, or raises a `CorpusError` naming `where` and the field."""
  if not isinstance(row, dict):
    raise CorpusError(f"{where}: expected a JSON object with fields {list(CORPUS_FIELDS)}, "
                      f"got {type(row).__name__}")
  id_field = "id" if "id" in row or "_id" not in row else "_id"  # BEIR spells it `_id`.
  if id_field not in row:
    raise CorpusError(f"{where}: missing field 'id'")
  passage_id = row[id_field]
  # Integer ids are common in DPR dumps; they are kept as their decimal string so ids have one type.
  if isinstance(passage_id, int) and not isinstance(passage_id, bool):
    passage_id = str(passage_id)
  if not isinstance(passage_id, str) or not passage_id:
    raise CorpusError(f"{where}: field {id_field!r} must be a non-empty string or integer, got {row[id_field]!r}")
  if "text" not in row and "contents" in row:  # FlashRAG: "\"Title\"\ntext" in one field.
    if not isinstance(row["contents"], str):
      raise CorpusError(f"{where}: field 'contents' must be a string, got {type(row['contents']).__name__}")
    title, _, text = row["contents"].partition("\n")
    title, text = (title.strip().strip('"'), text) if text.strip() else ("", title)
  else:
    if "text" not in row:
      raise CorpusError(f"{where}: missing field 'text' (or FlashRAG's 'contents')")
    title, text = row.get("title", ""), row["text"]
    for field, value in (("title", title), ("text", text)):
      if not isinstance(value, str):
        raise CorpusError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
  if not text.strip():
    raise CorpusError(f"{where}: field 'text' is empty")
  return passage_id, title, text
