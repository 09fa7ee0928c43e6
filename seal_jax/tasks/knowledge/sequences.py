"""From a self-edit (the policy's completion) to the text sequences the inner loop fine-tunes on.

`build_train_sequences` is the reference's `utils.build_train_sequences` (spec §1.3), rule for rule:

1. split the completion on the literal "---" into stripped, non-empty segments (none: the whole
   stripped completion is the one segment);
2. with `split_newlines`, each segment is split further:
   * self-QA (the segment contains "Question <n>:" and "Answer:"): split before every newline that
     starts "Question <n>:", one sequence per QA pair; the first chunk gets a "Question 1: " prefix if
     it lacks one (the self-QA prompt ends inside question 1, so the completion starts without it);
   * otherwise every stripped non-empty line is a sequence, and when there are at least two lines and
     the second starts with "1.", the first is dropped as a preamble ("Here are the implications:");
3. each sequence becomes "{title}\\n{segment}" and "{title}\\n{context}" is always appended last.

So an empty completion gives just the passage with `split_newlines` (the "train on passage" baseline)
and `["{title}\\n", "{title}\\n{context}"]` without it.

`clean_self_edit` runs before that and finds the outputs the domain must record rather than crash on:
empty, junk without words, chat special tokens leaking from the model, and over-long edits.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Protocol, Sequence

_QUESTION_HEADER = re.compile(r"Question \d+:")
_SPLIT_BEFORE_QUESTION = re.compile(r"\n(?=Question \d+:)")
_FIRST_QUESTION = "Question 1: "


def _is_self_qa(segment: str) -> bool:
    return bool(_QUESTION_HEADER.search(segment)) and "Answer:" in segment


def _split_self_qa(segment: str) -> list[str]:
    chunks = [c.strip() for c in _SPLIT_BEFORE_QUESTION.split(segment)]
    chunks = [c for c in chunks if c]
    if chunks and not chunks[0].startswith("Question 1:"):
        chunks[0] = _FIRST_QUESTION + chunks[0]
    return chunks


def _split_lines(segment: str) -> list[str]:
    lines = [line.strip() for line in segment.split("\n")]
    lines = [line for line in lines if line]
    if len(lines) >= 2 and lines[1].startswith("1."):
        lines = lines[1:]
    return lines


def build_train_sequences(completion: str, title: str, context: str,
                          split_newlines: bool = True) -> list[str]:
    segments = [s.strip() for s in completion.split("---")]
    segments = [s for s in segments if s] or [completion.strip()]
    if split_newlines:
        pieces = []
        for segment in segments:
            pieces.extend(_split_self_qa(segment) if _is_self_qa(segment) else _split_lines(segment))
        segments = pieces
    return [f"{title}\n{s}" for s in segments] + [f"{title}\n{context}"]


# ---------------------------------------------------------------------------------------------------
# Self-edit screening

EMPTY = "empty"  # nothing but whitespace
NO_WORDS = "no_words"  # no alphabetic word: punctuation, digits, symbols
SPECIAL_TOKENS = "special_tokens"  # a chat/special token string in model output; cut there
TOO_LONG = "too_long"  # more than max_tokens tokens; truncated or rejected per `on_overflow`

# Special-token spellings of the Llama-3 / ChatML / SmolLM families all look like <|name|>.
_SPECIAL_PATTERN = re.compile(r"<\|[A-Za-z0-9_\-.:]{1,64}\|>")
_WORD = re.compile(r"[^\W\d_]{2,}")  # two letters in a row, any script


class TokenCounter(Protocol):
    def encode(self, text: str, add_special: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...


@dataclasses.dataclass(frozen=True)
class Issue:
    code: str  # EMPTY | NO_WORDS | SPECIAL_TOKENS | TOO_LONG
    detail: str
    fatal: bool  # True: the self-edit must not be trained on; record a failure for the candidate


def is_rejected(issues: Sequence[Issue]) -> bool:
    return any(i.fatal for i in issues)


def clean_self_edit(text: str, *, tokenizer: TokenCounter | None = None, max_tokens: int | None = None,
                    on_overflow: str = "truncate",
                    special_tokens: Sequence[str] = ()) -> tuple[str, list[Issue]]:
    """Screen a self-edit; returns the text to build sequences from and the issues found.

    * special tokens (`<|...|>` spellings, the tokenizer's `special_tokens` if it has that attribute,
      and any listed in `special_tokens`): the text is cut at the first one, since whatever follows an end-of-turn marker is the model talking past its turn;
    * `max_tokens` (needs `tokenizer`): an edit longer than that is cut to its first `max_tokens`
      tokens (`on_overflow="truncate"`, recorded, not fatal) or rejected (`"reject"`, fatal);
    * empty or word-less text (after the cuts) is fatal: there is nothing to learn from.
    """
    if on_overflow not in ("truncate", "reject"):
        raise ValueError(f"on_overflow must be 'truncate' or 'reject', got {on_overflow!r}")
    if max_tokens is not None and tokenizer is None:
        raise ValueError("clean_self_edit: max_tokens needs a tokenizer to count tokens")
    if not isinstance(text, str):
        raise TypeError(f"self-edit must be a string, got {type(text).__name__}")
    issues: list[Issue] = []

    cut = _first_special(text, tuple(special_tokens) + tuple(getattr(tokenizer, "special_tokens", ())))
    if cut is not None:
        pos, token = cut
        issues.append(Issue(SPECIAL_TOKENS, f"special token {token!r} at character {pos}; text cut there",
                            fatal=False))
        text = text[:pos]
    text = text.strip()

    if max_tokens is not None and text:
        ids = tokenizer.encode(text, add_special=False)
        if len(ids) > max_tokens:
            if on_overflow == "reject":
                issues.append(Issue(TOO_LONG, f"{len(ids)} tokens > max_tokens={max_tokens}; rejected",
                                    fatal=True))
            else:
                text = tokenizer.decode(ids[:max_tokens], skip_special=True).strip()
                issues.append(Issue(TOO_LONG, f"{len(ids)} tokens > max_tokens={max_tokens}; truncated",
                                    fatal=False))

    if not text:
        issues.append(Issue(EMPTY, "self-edit is empty", fatal=True))
    elif not _WORD.search(text):
        issues.append(Issue(NO_WORDS, f"self-edit has no words: {text[:40]!r}", fatal=True))
    return text, issues


def _first_special(text: str, extra: Sequence[str]) -> tuple[int, str] | None:
    hits = []
    m = _SPECIAL_PATTERN.search(text)
    if m:
        hits.append((m.start(), m.group()))
    for token in extra:
        pos = text.find(token) if token else -1
        if pos >= 0:
            hits.append((pos, token))
    return min(hits) if hits else None
