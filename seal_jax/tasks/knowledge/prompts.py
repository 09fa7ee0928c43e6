"""Prompt text for knowledge incorporation: the self-edit prompts the policy reads and the answer prompts
the adapted model reads.

The default texts are the reference's, verbatim (SEAL, commit 4cb1e7d):
`knowledge-incorporation/src/data_generation/make_squad_data.py` for the self-edit prompts (one plain
continuation template per prompt key, and the instruct-model system message) and
`knowledge-incorporation/src/utils.py` for the answer prompts. The policy's reward depends on exactly
what it is asked, so a reproduction has to ask the same thing; tests/test_reference_fidelity.py checks
these texts against the reference's and against the prompts recorded in its data files.

Our earlier rewording stays available under the keys "ours-<key>" (e.g. `self_edit.prompt=
"ours-implications"`; for a chat policy the "ours-" prefix also selects our system message). It was
written when reference prose could not be copied, and it adds format rules the reference does not
have: the chat system message asks for "one per line" and the self-QA instruction spells out
"Question <n>: ... / Answer: ..." lines. Both push a small instruct model toward output that newline
splitting turns into many training sequences, which helps the 135M demo model but changes what the
policy is rewarded for, so it is not the paper setting.

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
OURS_PREFIX = "ours-"

# The reference's base-model templates, verbatim (make_squad_data.py, MAKE_SQUAD_DATA_TEMPLATES_BASE);
# filled with str.format(title=..., context=...) as there. "implications" is the paper's main setting.
REFERENCE_SELF_EDIT_TEMPLATES: dict[str, str] = {
    "implications": (
        "Let's read the following passage and produce a list of implications "
        "derived directly or indirectly from the content.\n\n"
        "Passage:\n{title}\n{context}\n\n"
        "Implications:\n"
    ),
    "implications-long": (
        "Let's read the following passage and produce a long list of implications "
        "derived directly or indirectly from the content.\n\n"
        "Passage:\n{title}\n{context}\n\n"
        "Implications:\n"
    ),
    "implications-very-long": (
        "Let's read the following passage and produce a very long list of implications "
        "derived directly or indirectly from the content.\n\n"
        "Passage:\n{title}\n{context}\n\n"
        "Implications:\n"
    ),
    "rewrite": (
        "Let's read the following passage and rewrite it in a few different ways, each one separated by a newline.\n\n"
        "Passage:\n{title}\n{context}\n\n"
        "Rewritten passages:\n"
    ),
    "self-qa": (
        "Let's read the following passage and rewrite it in a question-answer format.\n\n"
        "Passage:\n{title}\n{context}\n\n"
        "Question 1: "
    ),
}

# The reference's instruct-model variant (make_squad_data.py, MAKE_SQUAD_DATA_TEMPLATE_INSTRUCT): this
# system message (its trailing space included) and "{title}\n{context}" as the user turn. It has one
# wording and ignores the prompt key. We render it with the model's own chat template, which for
# Qwen-instruct is the reference's hard-coded ChatML.
REFERENCE_CHAT_SELF_EDIT_SYSTEM = (
    "You are an assistant tasked with analyzing the provided passage and producing a list of "
    "implications derived directly or indirectly from the content. "
)

# Our wording (see the module docstring for why it is not the default): instruction and cue header.
_OUR_SELF_EDIT_VARIANTS: dict[str, tuple[str, str]] = {
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
OUR_CHAT_SELF_EDIT_SYSTEM = (
    "You are given a passage. Produce a list of the implications that follow from it, directly or "
    "indirectly, one per line."
)
CHAT_SELF_EDIT_SYSTEM = REFERENCE_CHAT_SELF_EDIT_SYSTEM

PROMPT_KEYS = tuple(REFERENCE_SELF_EDIT_TEMPLATES) + tuple(OURS_PREFIX + k for k in _OUR_SELF_EDIT_VARIANTS)

# Answer prompts (utils.py): SQUAD_ANSWER_TEMPLATE_BASE is ANSWER_INSTRUCTION, "Question: {question}",
# "Answer:" and a newline; the (unused) instruct template's system message is CHAT_ANSWER_SYSTEM.
ANSWER_INSTRUCTION = "Let's answer a question directly and concisely."
CHAT_ANSWER_SYSTEM = "You are an assistant to answer a question directly and concisely."


def _escaped(text: str, tokenizer: ChatTokenizer | None) -> str:
    return tokenizer.escape(text) if tokenizer is not None else text


def _parse_key(prompt_key: str) -> tuple[bool, str]:
    """(ours?, variant) for a prompt key; unknown keys raise."""
    if prompt_key not in PROMPT_KEYS:
        raise ValueError(f"unknown self-edit prompt {prompt_key!r}; choose from {PROMPT_KEYS}")
    if prompt_key.startswith(OURS_PREFIX):
        return True, prompt_key[len(OURS_PREFIX):]
    return False, prompt_key


def passage_block(title: str, context: str, tokenizer: ChatTokenizer | None = None) -> str:
    return f"Passage:\n{_escaped(title, tokenizer)}\n{_escaped(context, tokenizer)}"


def self_edit_prompt(title: str, context: str, prompt_key: str = DEFAULT_PROMPT_KEY,
                     tokenizer: ChatTokenizer | None = None) -> str:
    """Plain continuation prompt for a base model; the completion is the self-edit."""
    ours, variant = _parse_key(prompt_key)
    if ours:
        instruction, cue = _OUR_SELF_EDIT_VARIANTS[variant]
        return f"{instruction}\n\n{passage_block(title, context, tokenizer)}\n\n{cue}"
    return REFERENCE_SELF_EDIT_TEMPLATES[variant].format(title=_escaped(title, tokenizer),
                                                         context=_escaped(context, tokenizer))


def self_edit_chat_prompt(title: str, context: str, tokenizer: ChatTokenizer,
                          prompt_key: str = DEFAULT_PROMPT_KEY) -> str:
    """Chat-template prompt for an instruct model (the reference's `--instruct_model` path).

    As in the reference the variant of the key is ignored; only the "ours-" prefix matters.
    """
    ours, _ = _parse_key(prompt_key)
    messages = [
        {"role": "system", "content": OUR_CHAT_SELF_EDIT_SYSTEM if ours else REFERENCE_CHAT_SELF_EDIT_SYSTEM},
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
