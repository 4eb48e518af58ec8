"""BIG-bench source rows -> the plain records the Example builders take (used by blend.py).

Each `parse_*` takes a `readers.read_bigbench_task` row and returns a record, or raises `readers.RowError` naming
the field; `parse_rows` turns that into `DataError(file:line)` or a counted skip, as the readers do.
"""

import functools
import re

from rankrag_jax.data import readers

_PTB_TOKENS = {"-LRB-": "(", "-RRB-": ")", "-LSB-": "[", "-RSB-": "]", "-LCB-": "{", "-RCB-": "}", "``": '"',
               "''": '"'}
_PTB_RULES = [(re.compile(pattern), replacement) for pattern, replacement in (
    (r"(?<=\d) , (?=\d{3}(?!\d))", ","),                      # 40 , 000 -> 40,000
    (r"(?<=\d) \. (?=\d)", "."),                               # 0 . 5 -> 0.5
    (r"(?<=\w) ' (?=(?:s|S|re|ve|ll|d|m|t)\b)", "'"),          # Earth ' s -> Earth's
    (r"(?<=\w) n't\b", "n't"),
    (r"(?<=s) ' ", "' "),                                      # Years ' War -> Years' War
    (r"(?<=\w) ([-–−/]) (?=\w)", r"\1"),                       # 1623 – 25 -> 1623–25
)]
_SPACE_BEFORE = re.compile(r" ([,.;:?!%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{$£]) ")


@functools.lru_cache(maxsize=8192)  # disfl_qa repeats each of its 1,204 paragraphs ~7 times.
def detokenize_ptb(text: str) -> str:
  """Undoes PTB-style tokenisation ("Earth ' s", "40 , 000", "-LRB- see -RRB-") in disfl_qa and VitaminC text.

  disfl_qa's answers are untokenised SQuAD answers, so without this ~19% are not verbatim in their own
  paragraph; with it ~1.5%. Questions, claims and passages all get the same treatment.
  """
  t = f" {text.strip()} "
  for token, char in _PTB_TOKENS.items():
    if token in t:
      t = t.replace(f" {token} ", f" {char} ")
  for pattern, replacement in _PTB_RULES:
    t = pattern.sub(replacement, t)
  parts = t.split(' " ')  # straight double quotes alternate: the opening one attaches right, the closing one left.
  if len(parts) > 1 and len(parts) % 2 == 1:
    t = parts[0] + "".join((' "' if i % 2 == 0 else '" ') + p for i, p in enumerate(parts[1:]))
  t = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", t))
  return " ".join(t.split())


def parse_rows(path, records: readers.Records, parse, on_error: str, skipped: dict) -> list[dict]:
  """Applies `parse` to reader rows; a row it rejects raises DataError(file:line) or is counted as skipped.

  `skipped` maps a source file to {"count", "errors"} (reader and parser rejections together).
  """
  out, errors = [], []
  for row in records:
    try:
      out.append(parse(row))
    except readers.RowError as e:
      error = readers.DataError(path, row.get("line", 0), f"{row['id']}.{e.field}", e.message)
      if on_error == "raise":
        raise error from None
      errors.append(str(error))
  count_skips(skipped, path, errors + records.errors, len(errors) + records.skipped)
  return out


def count_skips(skipped: dict, path, errors, count: int) -> None:
  if count:
    entry = skipped.setdefault(relative_source(path), {"count": 0, "errors": []})
    entry["count"] += count
    entry["errors"] = (entry["errors"] + [relative_source(e) for e in errors])[:10]


def relative_source(text) -> str:
  """A source path without the machine's cache prefix, so that manifests compare across machines."""
  return re.sub(r"^.*/(benchmark_tasks/|gensim/)", r"\1", str(text))


def parse_disfl_qa(row: dict) -> dict:
  """"{disfluent question}  \\ncontext: {SQuAD-2.0 paragraph}" -> {id, question, context, answers ([] if unknown)}."""
  question, sep, context = row["input"].partition("\ncontext:")
  if not sep or not question.strip() or not context.strip():
    raise readers.RowError("input", "expected '{question}\\ncontext: {paragraph}' with both parts non-empty")
  answer = row["targets"][0].strip()
  return {"id": row["id"], "question": detokenize_ptb(question), "context": detokenize_ptb(context),
          "answers": [] if answer.lower() == "unknown" else [answer]}


_READING_LAYOUTS = {
    "quoref": re.compile(r"^Passage:\s*(?P<passage>.*?)\s*\nQuestion:\s*(?P<question>.*?)\s*$", re.S),
    "drop": re.compile(r"^Passage:\s*(?P<passage>.*?)\s*\nQuestion:\s*(?P<question>.*?)\s*\nAnswer type:.*$", re.S),
    "ropes": re.compile(r"^Background Paragraph:\s*(?P<background>.*?)\s*\nStory:\s*(?P<story>.*?)\s*"
                        r"\nQuestion:\s*(?P<question>.*?)\s*$", re.S),
}


def _strip_ni_period(answer: str, passage: str) -> str:
  """Natural Instructions appends "." to every target; drop it unless the passage has the answer with it."""
  answer = answer.strip()
  if answer.endswith(".") and answer not in passage:
    answer = answer[:-1].rstrip()
  return answer


def reading_parser(source: str):
  """A parser for a Natural Instructions answer-generation subtask -> {id, question, passage, answer}.

  ROPES' background paragraph and story become one passage, separated by a blank line.
  """
  layout = _READING_LAYOUTS[source]

  def parse(row):
    match = layout.match(row["input"])
    if not match:
      raise readers.RowError("input", f"not in the {source} Natural Instructions layout")
    fields = match.groupdict()
    passage = fields.get("passage") or f"{fields['background']}\n\n{fields['story']}"
    answer = _strip_ni_period(row["targets"][0], passage)
    if not answer or not fields["question"]:
      raise readers.RowError("target" if not answer else "input", "empty answer or question")
    return {"id": row["id"], "question": fields["question"], "passage": passage, "answer": answer}
  return parse


def parse_vitaminc(row: dict) -> dict:
  """"{title}: {evidence}\\nClaim: {claim}" with True/False/Neither -> {id, claim, evidence, relevant} (raw text).

  Relevant = the evidence settles the claim (supports or refutes it); "Neither" evidence is about the same
  subject but does not decide the claim: a hard negative. Call `detokenize_vitaminc` on the rows you keep.
  """
  evidence, sep, claim = row["input"].partition("\nClaim: ")
  scores = row["target_scores"] or {}
  if not sep or not claim.strip() or set(scores) != {"True", "False", "Neither"}:
    raise readers.RowError("input", "expected '{title}: {evidence}\\nClaim: {claim}' with True/False/Neither scores")
  return {"id": row["id"], "claim": claim, "evidence": evidence, "relevant": max(scores, key=scores.get) != "Neither"}


def detokenize_vitaminc(record: dict) -> dict:
  return dict(record, claim=detokenize_ptb(record["claim"]), evidence=detokenize_ptb(record["evidence"]))
