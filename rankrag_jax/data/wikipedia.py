"""MediaWiki XML dumps -> plain-text ~100-word passages, with the standard library only (no gensim).

The cleaner is deliberately "reasonable", not a full wikitext parser: it removes comments, references,
templates and tables (innermost first, so nesting unwinds), file/category/interlanguage links, HTML tags and
the reference sections at the end of an article, and keeps the visible text of ordinary links. Good enough
for a BM25 distractor corpus, which is what the project uses it for.
"""

import html
import re
import xml.etree.ElementTree as ElementTree

from rankrag_jax.data.readers import DataError, Records, RowError, open_text

_ARTICLE_NAMESPACE = "0"
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>]*?/>|<ref[^>]*?>.*?</ref>", re.S | re.I)
_DROPPED_ELEMENTS = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source|table|imagemap)\b.*?</\1\s*>",
                               re.S | re.I)
_INNERMOST_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_INNERMOST_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_INNERMOST_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_HTML_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_TAIL_SECTIONS = frozenset({"references", "external links", "see also", "further reading", "notes", "bibliography",
                            "sources", "citations", "footnotes", "notes and references"})
# Links whose target has one of these prefixes are media, categories or other wikis: no visible prose.
_NON_PROSE_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|wikipedia|wp|template|help|portal|wikt|"
                             r"wiktionary|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)


def _replace_link(match: re.Match) -> str:
  target = match.group(1)
  if _NON_PROSE_LINK.match(target):
    return ""
  return target.split("|")[-1]


def _remove_innermost(pattern: re.Pattern, text: str, replacement="") -> str:
  while True:
    text, count = pattern.subn(replacement, text)
    if not count:
      return text


def strip_markup(wikitext: str) -> str:
  """Wikitext -> plain prose paragraphs separated by blank lines."""
  text = html.unescape(_COMMENT.sub("", wikitext))  # the dump escapes once more: &amp;nbsp; -> &nbsp; -> " ".
  text = _COMMENT.sub("", text)
  text = _REF.sub("", text)
  text = _DROPPED_ELEMENTS.sub("", text)
  text = _remove_innermost(_INNERMOST_TEMPLATE, text)
  text = _remove_innermost(_INNERMOST_TABLE, text)
  text = _remove_innermost(_INNERMOST_LINK, text, _replace_link)
  text = _EXTERNAL_LINK.sub(r"\1", text)
  text = _HTML_TAG.sub("", text)
  text = text.replace("'''", "").replace("''", "")
  paragraphs = []
  for section_heading, body in _sections(text):
    if section_heading.lower() in _TAIL_SECTIONS:
      continue
    for line in body.split("\n"):
      line = line.strip()
      if not line or line[0] in "|!{}" or line.startswith("__"):  # table debris and magic words.
        continue
      line = re.sub(r"^[*#:;]+\s*", "", line)  # list markers: keep the item's text.
      line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # parentheses emptied by template removal.
      line = " ".join(line.split())
      if line:
        paragraphs.append(line)
  return "\n\n".join(paragraphs)


def _sections(text: str):
  """Yields (heading, body) pairs; the lead section has heading ""."""
  heading, start = "", 0
  for match in _HEADING.finditer(text):
    yield heading, text[start:match.start()]
    heading, start = match.group(2), match.end()
  yield heading, text[start:]


def split_into_passages(text: str, passage_words: int = 100, min_tail_words: int = 20) -> list[str]:
  """Consecutive `passage_words`-word windows (DPR); a tail shorter than `min_tail_words` joins the previous one."""
  words = text.split()
  passages = [words[i:i + passage_words] for i in range(0, len(words), passage_words)]
  if len(passages) > 1 and len(passages[-1]) < min_tail_words:
    passages[-2].extend(passages.pop())
  return [" ".join(p) for p in passages]


def read_wikipedia_dump(path, passage_words: int = 100, on_error: str = "raise") -> Records:
  """MediaWiki XML dump (.xml or .xml.bz2) -> ~`passage_words`-word passages {id, title, text}.

  Articles only: pages in other namespaces and redirects are counted in `records.filtered`. Each article is
  cleaned by `strip_markup` and cut by `split_into_passages`; ids are `enwiki/{page id}/{index}`. A page
  without id, title or text is malformed (reported with the line where the page starts); broken XML raises.
  """
  def rows(sink):
    parser = ElementTree.XMLPullParser(events=("start", "end"))
    page_line = 0
    with open_text(path) as f:
      for line_no, line in enumerate(f, 1):  # fed line by line so that each page knows where it starts.
        try:
          parser.feed(line)
          events = list(parser.read_events())
        except ElementTree.ParseError as e:
          raise DataError(path, line_no, "<xml>", f"bad XML: {e}") from None
        for event, element in events:
          if _local_name(element.tag) != "page":
            continue
          if event == "start":
            page_line = line_no
            continue
          try:
            page = _parse_page(element)
          except RowError as e:
            sink.report(DataError(path, page_line, f"page.{e.field}", e.message))
            continue
          finally:
            element.clear()  # keep memory flat on large dumps.
          if isinstance(page, str):
            sink.filtered[page] += 1
            continue
          passages = split_into_passages(strip_markup(page["text"]), passage_words)
          if not passages:
            sink.filtered["empty_after_markup_removal"] += 1
          for i, passage in enumerate(passages):
            yield {"id": f"enwiki/{page['id']}/{i}", "title": page["title"], "text": passage}
    try:
      parser.close()
    except ElementTree.ParseError as e:
      raise DataError(path, 0, "<xml>", f"bad XML at end of file: {e}") from None
  return Records(path, rows, on_error)


def _parse_page(element) -> dict | str:
  """A <page> element -> {id, title, text}, or the reason it is not an article."""
  page = {_local_name(child.tag): child for child in element}
  revision = {_local_name(child.tag): child for child in page["revision"]} if "revision" in page else {}
  page_id = _xml_text(page, "id")
  if _xml_text(page, "ns", required=False) not in ("", _ARTICLE_NAMESPACE):
    return "non_article_namespace"
  if "redirect" in page:
    return "redirect"
  return {"id": page_id, "title": _xml_text(page, "title"), "text": _xml_text(revision, "text")}


def _local_name(tag: str) -> str:
  return tag.rsplit("}", 1)[-1]


def _xml_text(children: dict, name: str, required: bool = True) -> str:
  element = children.get(name)
  text = (element.text or "").strip() if element is not None else ""
  if required and not text:
    raise RowError(name, "missing" if element is None else "empty")
  return text
