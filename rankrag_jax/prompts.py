"""RankRAG's prompt templates, word for word, and the renderer every other module uses.

Templates are Yu et al. 2024 (arXiv:2407.02485 v1), quoted exactly, including the paper's "access" (for
"assess"). The layout is ChatQA's plain-text format (Llama3-ChatQA-1.5 model card), which RankRAG extends:

    System: {system}\\n\\n{context}\\n\\nUser: {q1}\\n\\nAssistant: {a1}\\n\\nUser: {q2}\\n\\nAssistant: {a2}

Rendering decisions (the contract with packing.py, rerank.py and rag.py):
  * The context is `Passage: {p}` for one passage and `Passage 1: {p1}\\n\\nPassage 2: {p2}...` for several
    (paper Table 1); it is omitted with its blank line when there are no passages, as is `System:` when the
    system text is "" (SFT).
  * The prompt ends with "Assistant:" and the answer text begins with a space ("Assistant: True"), as ChatQA
    joins "Assistant: " + answer. So after a `chatqa` prompt the model emits " True"; under `chat_template` the
    answer follows the template's generation prompt directly ("True"). Either way `true_false_token_ids` finds
    the ids by encoding, it does not assume them.
  * Only the last assistant answer is kind "answer" (the loss target, RankRAG App. C: loss on the last turn);
    each passage body is its own "passage" segment so the packer can truncate passages, never the answer.
  * `chat_format="chat_template"` renders the same messages through the model's own template: the system text
    is the system message, the context opens the first user message ("{context}\\n\\n{question}"), and the
    template's end-of-turn text after the final answer (e.g. ChatML "<|im_end|>\\n") joins the answer segment
    so the model learns to stop. Under `chatqa` the answer ends at its text; the packer appends EOS.
"""

import re
from typing import Sequence

import gin

# ChatQA / RankRAG system turn (App. C, D), without its "System: " label.
CHATQA_SYSTEM = ("This is a chat between a user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions based on the context. The "
                 "assistant should also indicate when the answer cannot be found in the context.")

# Table 1: context-rich QA and retrieval-augmented QA instruction.
CONTEXT_QA_INSTRUCTION = "Answer the following question from context."
# App. C.2: reading-comprehension instructions per dataset.
SHORT_SPAN_INSTRUCTION = "Answer the following question with a short span."
FULL_ANSWER_INSTRUCTION = "Please give a full and complete answer for the question."
ARITHMETIC_INSTRUCTION = "Answer the following question with a number from the context or through math arithmetic."
SPAN_OR_FULL_INSTRUCTION = "Answer the following question with a short span, or a full and complete answer."
DATASET_INSTRUCTIONS = {
    **{name: SHORT_SPAN_INSTRUCTION for name in ("drop", "narrativeqa", "quoref", "ropes", "squad1.1", "squad2.0",
                                                 "newsqa")},
    "synthetic_convqa": FULL_ANSWER_INSTRUCTION,
    "tatqa_arithmetic": ARITHMETIC_INSTRUCTION,
    "tatqa_others": SPAN_OR_FULL_INSTRUCTION,
    # Not in the paper's list: CoQA's answers are short free-form spans, so it gets the short-span instruction.
    "coqa": SHORT_SPAN_INSTRUCTION,
}
# App. C.2 training prompts; App. D inference prompts.
CONTEXT_RANKING_TEMPLATE = ("For the question {question}, access whether the passage is relevant to the question. "
                            "Return True if relevant, otherwise False.")
RA_RANKING_TEMPLATE = ("For the question {question}, access whether the above passages are relevant to the "
                       "question. Return all the relevant passage id.")
CLAIM_RANKING_TEMPLATE = ("For the claim {claim}, access whether the passage is relevant to the claim. "
                          "Return True if relevant, otherwise False.")
OPEN_DOMAIN_QA_TEMPLATE = "{question}. Answer the above question with a short phrase."
FEVER_TEMPLATE = "Answer the following question with True or False. Is the claim '{claim}' correct?"
# ChatQA (Liu et al. 2024, §3.2.2) answer for unanswerable questions; the system turn asks for it.
UNANSWERABLE_ANSWER = "Sorry. I cannot find the answer based on the context."

CHAT_FORMATS = ("chatqa", "chat_template")
SEGMENT_KINDS = ("fixed", "passage", "answer")
Segment = tuple[str, str]  # (kind, text)


# ------------------------------------------------------------------------------------ user-turn templates
def context_rich_qa_question(question: str, dataset: str | None = None) -> str:
  """Context-rich QA (Table 1), or the dataset's App. C.2 instruction when it has one: "{instruction} {q}"."""
  return f"{DATASET_INSTRUCTIONS.get(dataset, CONTEXT_QA_INSTRUCTION)} {question}"


def ra_qa_question(question: str) -> str:
  """Retrieval-augmented QA over 5 numbered passages (Table 1)."""
  return f"{CONTEXT_QA_INSTRUCTION} {question}"


def context_ranking_question(question: str) -> str:
  """Context ranking, training and inference (App. C.2, App. D)."""
  return CONTEXT_RANKING_TEMPLATE.format(question=question)


def ra_ranking_question(question: str) -> str:
  """Retrieval-augmented ranking (App. C.2)."""
  return RA_RANKING_TEMPLATE.format(question=question)


def ra_ranking_answer(relevant_ids: Sequence[int]) -> str:
  """The RA-ranking target: 1-based ids of all relevant passages, named as the context names them.

  The paper gives the target only as "passage indexes" (Table 1); "Passage 2, Passage 4" repeats the context's
  own labels so the model copies a label it has just read rather than inventing a numbering.
  """
  if not relevant_ids:
    raise ValueError("an RA-ranking target needs at least one relevant passage")
  return ", ".join(f"Passage {i}" for i in sorted(relevant_ids))


def claim_ranking_question(claim: str) -> str:
  """FEVER claim-passage relevance (App. D)."""
  return CLAIM_RANKING_TEMPLATE.format(claim=claim)


def open_domain_qa_question(question: str) -> str:
  """Open-domain QA generation over the reranked top-5 (App. D)."""
  return OPEN_DOMAIN_QA_TEMPLATE.format(question=question)


def fever_question(claim: str) -> str:
  """FEVER generation (App. D)."""
  return FEVER_TEMPLATE.format(claim=claim)


def ranking_answer_texts() -> tuple[str, str]:
  """The two ranking answers, relevant first; the relevance score is P(first) (§4.3)."""
  return ("True", "False")


def ranking_answer(is_relevant: bool) -> str:
  return ranking_answer_texts()[0 if is_relevant else 1]


def sft_turns(conversation: Sequence[tuple[str, str]]) -> list[dict]:
  """Stage-I SFT (§4.1): a multi-turn conversation as turns, loss on the last answer; no system, no context."""
  return [{"user": user, "assistant": assistant} for user, assistant in conversation]


# ------------------------------------------------------------------------------------------------ Examples
def make_example(*, component: str, example_id: str, task: str, turns: Sequence[dict],
                 passages: Sequence[str] = (), passage_style: str | None = None, label=None,
                 system: str = CHATQA_SYSTEM) -> dict:
  """An Example dict (docs/DESIGN.md schema); passage_style defaults to single/numbered/none by count."""
  if passage_style is None:
    passage_style = "none" if not passages else "single" if len(passages) == 1 else "numbered"
  # Stripped so that templates which trim message content (Llama-3's) render exactly what the segments hold.
  example = {"component": component, "id": example_id, "task": task, "system": system.strip(),
             "passages": [p.strip() for p in passages], "passage_style": passage_style,
             "turns": [{"user": t["user"].strip(), "assistant": t.get("assistant", "").strip()} for t in turns],
             "label": label}
  _validate(example)
  return example


def ranking_prompt_example(question: str, passage: str, history: Sequence[dict] = ()) -> dict:
  """Inference: is `passage` relevant to `question`? Conversational ranking keeps earlier turns (App. D)."""
  return make_example(component="inference", example_id="", task="context_ranking", passages=[passage],
                      turns=[*history, {"user": context_ranking_question(question)}])


def claim_ranking_prompt_example(claim: str, passage: str) -> dict:
  return make_example(component="inference", example_id="", task="claim_ranking", passages=[passage],
                      turns=[{"user": claim_ranking_question(claim)}])


def generation_prompt_example(question: str, passages: Sequence[str], history: Sequence[dict] = ()) -> dict:
  """Inference: open-domain QA over the reranked passages, always numbered as in App. D."""
  return make_example(component="inference", example_id="", task="ra_qa", passages=passages,
                      passage_style="numbered", turns=[*history, {"user": open_domain_qa_question(question)}])


def fever_generation_prompt_example(claim: str, passages: Sequence[str]) -> dict:
  return make_example(component="inference", example_id="", task="ra_qa", passages=passages,
                      passage_style="numbered", turns=[{"user": fever_question(claim)}])


def _validate(example: dict) -> None:
  style, passages = example["passage_style"], example["passages"]
  if style not in ("single", "numbered", "none"):
    raise ValueError(f"{example['id']}: unknown passage_style {style!r}")
  if (style == "none") != (not passages) or (style == "single" and len(passages) != 1):
    raise ValueError(f"{example['id']}: passage_style {style!r} does not fit {len(passages)} passages")
  if not example["turns"]:
    raise ValueError(f"{example['id']}: an example needs at least one turn")
  texts = [example["system"], *passages] + [t[k] for t in example["turns"] for k in ("user", "assistant")]
  if any(not isinstance(t, str) for t in texts) or any(_SENTINEL_RE.search(t) for t in texts):
    raise ValueError(f"{example['id']}: texts must be strings without private-use sentinel characters")
  if any(not p.strip() for p in passages) or any(not t["user"].strip() for t in example["turns"]):
    raise ValueError(f"{example['id']}: empty passage or user turn")


# ----------------------------------------------------------------------------------------------- rendering
def _context_segments(passages: Sequence[str], style: str) -> list[Segment]:
  if style == "single":
    return [("fixed", "Passage: "), ("passage", passages[0])]
  segments = []
  for i, passage in enumerate(passages, 1):
    separator = "" if i == 1 else "\n\n"
    segments += [("fixed", f"{separator}Passage {i}: "), ("passage", passage)]
  return segments


def _merge_fixed(segments: list[Segment]) -> list[Segment]:
  merged = []
  for kind, text in segments:
    if not text:
      continue
    if merged and kind == "fixed" and merged[-1][0] == "fixed":
      merged[-1] = ("fixed", merged[-1][1] + text)
    else:
      merged.append((kind, text))
  return merged


def _chatqa_segments(example: dict, with_answer: bool) -> list[Segment]:
  segments = [("fixed", f"System: {example['system']}\n\n")] if example["system"] else []
  if example["passages"]:
    segments += _context_segments(example["passages"], example["passage_style"]) + [("fixed", "\n\n")]
  turns = example["turns"]
  for i, turn in enumerate(turns):
    segments.append(("fixed", f"User: {turn['user']}\n\nAssistant:"))
    if i < len(turns) - 1:
      segments.append(("fixed", f" {turn['assistant']}\n\n"))
    elif with_answer:
      segments.append(("answer", f" {turn['assistant']}"))
  return _merge_fixed(segments)


_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


def _messages(example: dict, with_answer: bool, placeholder=None) -> list[dict]:
  """Chat messages for `example`; `placeholder(segments) -> str` stands in for content when splitting."""
  place = placeholder or (lambda segments: "".join(text for _, text in segments))
  messages = [{"role": "system", "content": place([("fixed", example["system"])])}] if example["system"] else []
  context = _context_segments(example["passages"], example["passage_style"]) if example["passages"] else []
  turns = example["turns"]
  for i, turn in enumerate(turns):
    user = (context + [("fixed", "\n\n")] if i == 0 and context else []) + [("fixed", turn["user"])]
    messages.append({"role": "user", "content": place(user)})
    if i < len(turns) - 1 or with_answer:
      kind = "answer" if i == len(turns) - 1 else "fixed"
      messages.append({"role": "assistant", "content": place([(kind, turn["assistant"])])})
  return messages


def _chat_template_segments(example: dict, tokenizer) -> list[Segment]:
  """Renders with a unique sentinel per segment, then splits the template's output on the sentinels."""
  pieces: list[Segment] = []

  def placeholder(segments):
    start = len(pieces)
    pieces.extend(segments)
    return "".join(f"\ue000{i}\ue001" for i in range(start, len(pieces)))

  rendered = tokenizer.apply_chat_template(_messages(example, True, placeholder), add_generation_prompt=False)
  parts = _SENTINEL_RE.split(rendered)
  order = [int(index) for index in parts[1::2]]
  if order != list(range(len(pieces))):
    raise ValueError(f"{example['id']}: the chat template dropped, repeated or reordered message content")
  segments = []
  for j, part in enumerate(parts):
    segments.append(pieces[int(part)] if j % 2 else ("fixed", part))
  # The template's end-of-turn text after the final answer is part of the target (the model must learn to stop).
  tail = parts[-1]
  segments = _merge_fixed(segments[:-1])
  if tail:
    segments[-1] = ("answer", segments[-1][1] + tail)
  return segments


def _check_format(chat_format: str, tokenizer) -> None:
  if chat_format not in CHAT_FORMATS:
    raise ValueError(f"chat_format must be one of {CHAT_FORMATS}, got {chat_format!r}")
  if chat_format == "chat_template" and tokenizer is None:
    raise ValueError("chat_format='chat_template' needs the model's tokenizer")


@gin.configurable
def render_segments(example: dict, chat_format: str = "chatqa", tokenizer=None) -> list[Segment]:
  """Full training text as [(kind, text)], kind in {fixed, passage, answer}; the last segment is the answer."""
  _check_format(chat_format, tokenizer)
  _validate(example)
  if not example["turns"][-1]["assistant"].strip():
    raise ValueError(f"{example['id']}: the last turn has no answer to train on")
  if chat_format == "chatqa":
    return _chatqa_segments(example, with_answer=True)
  return _chat_template_segments(example, tokenizer)


@gin.configurable
def render_prompt(example: dict, chat_format: str = "chatqa", tokenizer=None) -> str:
  """Everything before the last answer, ending where the model must generate ("...\\n\\nAssistant:")."""
  _check_format(chat_format, tokenizer)
  _validate(example)
  if chat_format == "chatqa":
    return "".join(text for _, text in _chatqa_segments(example, with_answer=False))
  return tokenizer.apply_chat_template(_messages(example, False), add_generation_prompt=True)


@gin.configurable
def render_example(example: dict, chat_format: str = "chatqa", tokenizer=None) -> tuple[str, str]:
  """(prompt_text, answer_text): the split DESIGN.md names; prompt_text + answer_text is the training text."""
  segments = render_segments(example, chat_format, tokenizer)
  return "".join(text for _, text in segments[:-1]), segments[-1][1]


@gin.configurable
def true_false_token_ids(tokenizer, chat_format: str = "chatqa") -> tuple[int, int]:
  """Ids of the first token of "True" / "False" as the model emits them right after a ranking prompt.

  Found by encoding the rendered prompt with and without the rendered answer and taking the first id after
  the prompt's ids, so a leading space (" True" after "Assistant:") or its absence is discovered, not assumed.
  """
  ids = []
  for answer in ranking_answer_texts():
    example = make_example(component="probe", example_id="probe", task="context_ranking",
                           passages=["Paris is the capital and largest city of France."],
                           turns=[{"user": context_ranking_question("what is the capital of france?"),
                                   "assistant": answer}])
    segments = render_segments(example, chat_format, tokenizer)
    prompt = "".join(text for _, text in segments[:-1])
    prompt_ids, full_ids = tokenizer.encode(prompt), tokenizer.encode(prompt + segments[-1][1])
    if full_ids[:len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
      raise ValueError(f"the tokenizer merges the prompt's last token with {answer!r}; the answer's first id is "
                       "not well defined at this boundary")
    ids.append(full_ids[len(prompt_ids)])
  if ids[0] == ids[1]:
    raise ValueError(f"'True' and 'False' start with the same token id {ids[0]}")
  return ids[0], ids[1]
