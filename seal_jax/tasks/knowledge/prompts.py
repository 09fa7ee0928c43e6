"""Prompt text for knowledge incorporation: the self-edit prompts the policy reads and the answer prompts
the adapted model reads.

The variants follow the structure of the reference (SEAL `make_squad_data` / `TTT_server`), worded in our
own words: an instruction, a blank line, `Passage:\\n{title}\\n{context}`, a blank line and a cue header
that the base model continues ("Implications:", "Rewritten passages:", or "Question 1: " for self-QA,
which makes the model continue inside the first question). The answer prompt keeps the reference's
exact frame ("Let's answer a question directly and concisely." / "Question: Topic: {title}\\n{question}"
/ "Answer:" and a newline) because the adapted model's answers, and so the rewards, depend on it.

Passage, question and self-edit text is untrusted. Where it enters a chat template it goes through
`tokenizer.escape` so a passage containing e.g. "<|im_end|>" cannot close the turn; the plain-text
builders escape too when given a tokenizer.
"""
from __future__ import annotations

from typing import Protocol, Sequence


class ChatTokenizer(Protocol):
    """The part of `seal_jax.model.tokenizer.Tokenizer` these builders use."""

    def escape(self, text: str) -> str: ...

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str: ...


DEFAULT_PROMPT_KEY = "implications"

# Instruction and cue header per variant; "implications" is the paper's main setting.
_SELF_EDIT_VARIANTS: dict[str, tuple[str, str]] = {
    "implications": (
        "Read the passage below and write out the implications that follow from it, whether they "
        "are stated directly or only follow indirectly.",
        "Implications:\n",
    ),
    "implications-long": (
        "Read the passage below and write out a long list of the implications that follow from it, "
        "whether they are stated directly or only follow indirectly.",
        "Implications:\n",
    ),
    "implications-very-long": (
        "Read the passage below and write out a very long list of the implications that follow from "
        "it, whether they are stated directly or only follow indirectly.",
        "Implications:\n",
    ),
    "rewrite": (
        "Read the passage below and rewrite it several times, each time in a different way. Put each "
        "rewritten version on its own line.",
        "Rewritten passages:\n",
    ),
    "self-qa": (
        "Read the passage below and restate everything it says as question-answer pairs. Write each "
        "pair as a line \"Question <n>: ...\" followed by a line \"Answer: ...\".",
        "Question 1: ",
    ),
}
PROMPT_KEYS = tuple(_SELF_EDIT_VARIANTS)

# The instruct (chat) variant: one system instruction, the passage as the user turn. Like the
# reference it has a single wording and ignores the prompt key.
CHAT_SELF_EDIT_SYSTEM = (
    "You are given a passage. Produce a list of the implications that follow from it, directly or "
    "indirectly, one per line."
)

ANSWER_INSTRUCTION = "Let's answer a question directly and concisely."
CHAT_ANSWER_SYSTEM = "Answer the question directly and concisely."


def _escaped(text: str, tokenizer: ChatTokenizer | None) -> str:
    return tokenizer.escape(text) if tokenizer is not None else text


def passage_block(title: str, context: str, tokenizer: ChatTokenizer | None = None) -> str:
    return f"Passage:\n{_escaped(title, tokenizer)}\n{_escaped(context, tokenizer)}"


def self_edit_prompt(title: str, context: str, prompt_key: str = DEFAULT_PROMPT_KEY,
                     tokenizer: ChatTokenizer | None = None) -> str:
    """Plain continuation prompt for a base model; the completion is the self-edit."""
    try:
        instruction, cue = _SELF_EDIT_VARIANTS[prompt_key]
    except KeyError:
        raise ValueError(f"unknown self-edit prompt {prompt_key!r}; choose from {PROMPT_KEYS}") from None
    return f"{instruction}\n\n{passage_block(title, context, tokenizer)}\n\n{cue}"


def self_edit_chat_prompt(title: str, context: str, tokenizer: ChatTokenizer) -> str:
    """Chat-template prompt for an instruct model (the reference's `--instruct_model` path)."""
    messages = [
        {"role": "system", "content": CHAT_SELF_EDIT_SYSTEM},
        {"role": "user", "content": f"{tokenizer.escape(title)}\n{tokenizer.escape(context)}"},
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def question_with_topic(title: str, question: str) -> str:
    """The question as both the answering model and the grader see it (reference: `Topic:` prefix)."""
    return f"Topic: {title}\n{question}"


def answer_prompt(title: str, question: str, tokenizer: ChatTokenizer | None = None) -> str:
    """Base-model answer prompt; the model answers on the line after "Answer:"."""
    q = question_with_topic(_escaped(title, tokenizer), _escaped(question, tokenizer))
    return f"{ANSWER_INSTRUCTION}\nQuestion: {q}\nAnswer:\n"


def answer_chat_prompt(title: str, question: str, tokenizer: ChatTokenizer) -> str:
    """Instruct-model answer prompt (the reference keeps an unused ChatML variant of the same frame)."""
    q = question_with_topic(tokenizer.escape(title), tokenizer.escape(question))
    messages = [
        {"role": "system", "content": CHAT_ANSWER_SYSTEM},
        {"role": "user", "content": q},
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
