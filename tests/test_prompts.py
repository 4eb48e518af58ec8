"""Golden tests: every template equals the paper's text (arXiv:2407.02485 v1, App. C/D), and the renderer's layout."""

import jinja2
import pytest

from rankrag_jax import prompts

# Copied from the paper (via ../shared/rankrag_facts.md), independently of prompts.py. "access" is the paper's.
PAPER_SYSTEM = ("This is a chat between a user and an artificial intelligence assistant. The assistant gives helpful, "
                "detailed, and polite answers to the user's questions based on the context. The assistant should also "
                "indicate when the answer cannot be found in the context.")
QUESTION = "who wrote the novel dracula?"


def test_system_turn_is_the_papers():
  assert prompts.CHATQA_SYSTEM == PAPER_SYSTEM


def test_context_ranking_template_is_the_papers():
  assert prompts.context_ranking_question(QUESTION) == (
      "For the question who wrote the novel dracula?, access whether the passage is relevant to the question. "
      "Return True if relevant, otherwise False.")


def test_retrieval_augmented_ranking_template_is_the_papers():
  assert prompts.ra_ranking_question(QUESTION) == (
      "For the question who wrote the novel dracula?, access whether the above passages are relevant to the "
      "question. Return all the relevant passage id.")


def test_fever_claim_ranking_template_is_the_papers():
  assert prompts.claim_ranking_question("Bram Stoker wrote Dracula.") == (
      "For the claim Bram Stoker wrote Dracula., access whether the passage is relevant to the claim. "
      "Return True if relevant, otherwise False.")


def test_open_domain_qa_generation_template_is_the_papers():
  assert prompts.open_domain_qa_question("who wrote dracula") == (
      "who wrote dracula. Answer the above question with a short phrase.")


def test_fever_generation_template_is_the_papers():
  assert prompts.fever_question("Bram Stoker wrote Dracula.") == (
      "Answer the following question with True or False. Is the claim 'Bram Stoker wrote Dracula.' correct?")


def test_qa_instructions_are_the_papers():
  assert prompts.ra_qa_question(QUESTION) == f"Answer the following question from context. {QUESTION}"
  assert prompts.context_rich_qa_question(QUESTION) == f"Answer the following question from context. {QUESTION}"
  for dataset in ("drop", "narrativeqa", "quoref", "ropes", "squad1.1", "squad2.0", "newsqa"):
    assert prompts.context_rich_qa_question(QUESTION, dataset) == (
        f"Answer the following question with a short span. {QUESTION}")
  assert prompts.context_rich_qa_question(QUESTION, "synthetic_convqa") == (
      f"Please give a full and complete answer for the question. {QUESTION}")
  assert prompts.context_rich_qa_question(QUESTION, "tatqa_arithmetic") == (
      f"Answer the following question with a number from the context or through math arithmetic. {QUESTION}")
  assert prompts.context_rich_qa_question(QUESTION, "tatqa_others") == (
      f"Answer the following question with a short span, or a full and complete answer. {QUESTION}")


def test_ranking_answers():
  assert prompts.ranking_answer_texts() == ("True", "False")
  assert prompts.ra_ranking_answer([4, 2]) == "Passage 2, Passage 4"
  with pytest.raises(ValueError):
    prompts.ra_ranking_answer([])


# ----------------------------------------------------------------------------------------------- ChatQA layout
def _example(passages, turns, system=PAPER_SYSTEM, style=None):
  return prompts.make_example(component="t", example_id="t/0", task="ra_qa", passages=passages, passage_style=style,
                              turns=turns, system=system)


def test_single_passage_renders_chatqa_layout_exactly():
  example = _example(["Dracula is an 1897 novel by Bram Stoker."],
                     [{"user": prompts.context_ranking_question(QUESTION), "assistant": "True"}])
  text = "".join(t for _, t in prompts.render_segments(example))
  assert text == (f"System: {PAPER_SYSTEM}\n\nPassage: Dracula is an 1897 novel by Bram Stoker.\n\n"
                  f"User: For the question {QUESTION}, access whether the passage is relevant to the question. "
                  "Return True if relevant, otherwise False.\n\nAssistant: True")


def test_numbered_multi_turn_renders_chatqa_layout_exactly():
  example = _example(["p one", "p two"], [{"user": "q1", "assistant": "a1"}, {"user": "q2", "assistant": "a2"}])
  segments = prompts.render_segments(example)
  assert "".join(t for _, t in segments) == (
      f"System: {PAPER_SYSTEM}\n\nPassage 1: p one\n\nPassage 2: p two\n\n"
      "User: q1\n\nAssistant: a1\n\nUser: q2\n\nAssistant: a2")
  assert [t for k, t in segments if k == "passage"] == ["p one", "p two"]
  assert [(k, t) for k, t in segments if k == "answer"] == [("answer", " a2")]  # only the last answer is a target.
  assert segments[-1] == ("answer", " a2")


def test_sft_has_no_system_and_no_context():
  example = _example([], [{"user": "Say hi.", "assistant": "Hi!"}], system="")
  assert "".join(t for _, t in prompts.render_segments(example)) == "User: Say hi.\n\nAssistant: Hi!"


def test_prompt_ends_at_assistant_and_answer_starts_with_a_space():
  example = prompts.generation_prompt_example(QUESTION, ["a", "b", "c"])
  example["turns"][-1]["assistant"] = "Bram Stoker"
  prompt = prompts.render_prompt(example)
  assert prompt.endswith(f"User: {QUESTION}. Answer the above question with a short phrase.\n\nAssistant:")
  assert prompt.startswith(f"System: {PAPER_SYSTEM}\n\nPassage 1: a\n\nPassage 2: b\n\nPassage 3: c\n\n")
  assert prompts.render_example(example) == (prompt, " Bram Stoker")


def test_inference_examples_use_the_inference_templates():
  fever = prompts.fever_generation_prompt_example("Stoker wrote Dracula.", ["p"])
  assert prompts.render_prompt(fever).endswith(
      "Passage 1: p\n\nUser: Answer the following question with True or False. Is the claim 'Stoker wrote "
      "Dracula.' correct?\n\nAssistant:")
  history = [{"user": "who wrote dracula?", "assistant": "Bram Stoker"}]
  conversational = prompts.ranking_prompt_example("when was he born?", "Stoker was born in 1847.", history)
  assert prompts.render_prompt(conversational).endswith(
      "Passage: Stoker was born in 1847.\n\nUser: who wrote dracula?\n\nAssistant: Bram Stoker\n\n"
      "User: For the question when was he born?, access whether the passage is relevant to the question. "
      "Return True if relevant, otherwise False.\n\nAssistant:")
  claim = prompts.claim_ranking_prompt_example("Stoker wrote Dracula.", "p")
  assert "User: For the claim Stoker wrote Dracula., access whether" in prompts.render_prompt(claim)


def test_malformed_examples_are_rejected():
  with pytest.raises(ValueError):
    _example(["a", "b"], [{"user": "q", "assistant": "a"}], style="single")
  with pytest.raises(ValueError):
    _example(["  "], [{"user": "q", "assistant": "a"}])
  with pytest.raises(ValueError):
    prompts.render_segments(_example(["p"], [{"user": "q"}]))  # nothing to train on.
  with pytest.raises(ValueError):
    prompts.render_segments(_example(["p"], [{"user": "q", "assistant": "a"}]), chat_format="chat_template")


# -------------------------------------------------------------------------------------------- chat templates
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
DROPS_SYSTEM = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'] + ': ' + "
                "message['content'] + '\\n' }}{% endif %}{% endfor %}")


class TemplateTokenizer:
  """Just enough of the Tokenizer interface for rendering: apply_chat_template over a jinja template."""

  def __init__(self, template):
    self._template = jinja2.Environment().from_string(template)

  def apply_chat_template(self, messages, add_generation_prompt=True):
    return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                 bos_token="<|begin_of_text|>")


@pytest.mark.parametrize("template, end_of_turn", [(CHATML, "<|im_end|>\n"), (LLAMA3, "<|eot_id|>")])
def test_chat_template_segments_match_the_template_and_the_inference_prompt(template, end_of_turn):
  tok = TemplateTokenizer(template)
  example = _example(["first passage", "second passage"],
                     [{"user": "q1", "assistant": "a1"}, {"user": "q2", "assistant": "a2"}])
  segments = prompts.render_segments(example, chat_format="chat_template", tokenizer=tok)
  messages = [{"role": "system", "content": PAPER_SYSTEM},
              {"role": "user", "content": "Passage 1: first passage\n\nPassage 2: second passage\n\nq1"},
              {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
              {"role": "assistant", "content": "a2"}]
  assert "".join(t for _, t in segments) == tok.apply_chat_template(messages, add_generation_prompt=False)
  assert [t for k, t in segments if k == "passage"] == ["first passage", "second passage"]
  assert segments[-1] == ("answer", "a2" + end_of_turn)  # the end-of-turn is learned, so the model stops.
  assert [k for k, _ in segments].count("answer") == 1
  prompt = prompts.render_prompt(example, chat_format="chat_template", tokenizer=tok)
  assert prompt == "".join(t for _, t in segments[:-1])


def test_chat_template_that_drops_content_is_an_error():
  example = _example(["p"], [{"user": "q", "assistant": "a"}])
  with pytest.raises(ValueError, match="dropped"):
    prompts.render_segments(example, chat_format="chat_template", tokenizer=TemplateTokenizer(DROPS_SYSTEM))


# ------------------------------------------------------------------------------------------ True/False token ids
@pytest.fixture(scope="module")
def smollm2_tokenizer():
  from rankrag_jax import tokenizer
  from rankrag_jax import assets  # pylint: disable=g-import-not-at-top
  return tokenizer.load_tokenizer(assets.asset_file("smollm2_135m_instruct"))


def test_true_false_ids_are_what_follows_the_chatqa_prompt(smollm2_tokenizer):
  true_id, false_id = prompts.true_false_token_ids(smollm2_tokenizer, "chatqa")
  # After "Assistant:" the byte-level BPE emits the space-prefixed word.
  assert smollm2_tokenizer.decode([true_id]) == " True"
  assert smollm2_tokenizer.decode([false_id]) == " False"
  probe = prompts.ranking_prompt_example("q?", "p.")
  prompt_ids = smollm2_tokenizer.encode(prompts.render_prompt(probe))
  assert smollm2_tokenizer.encode(prompts.render_prompt(probe) + " True")[len(prompt_ids)] == true_id


def test_true_false_ids_under_the_models_chat_template(smollm2_tokenizer):
  true_id, false_id = prompts.true_false_token_ids(smollm2_tokenizer, "chat_template")
  assert smollm2_tokenizer.decode([true_id]) == "True"  # ChatML: the answer follows "assistant\n" directly.
  assert smollm2_tokenizer.decode([false_id]) == "False"
