r"""From a self-edit (the policy's completion) to the text sequences the inner loop fine-tunes on.

`build_train_sequences` reproduces the reference's `utils.build_train_sequences`
(knowledge-incorporation/src/utils.py at commit 4cb1e7d) exactly, including its quirks; the test
tests/test_reference_fidelity.py checks it against an independent oracle on every recorded self-edit
in ../shared/data/squad/ and on generated edge cases. The rules:

1. Segments: split the completion on the literal "---", strip each piece, keep the non-empty ones; if
   none is left, the one segment is the whole stripped completion.
2. With `split_newlines`:
   * self-QA, decided on the *whole* completion (not per segment): it contains a match of
     `Question\s+\d+:` and one of `Answer\s*:`. Then the "---" segments are ignored: the stripped
     completion is split before every newline followed by `Question\s+\d+:`, and the pieces are kept
     as they are (not stripped: a blank line before the next question leaves a trailing "\n"). When
     the first piece does not start with "Question" (after leading whitespace) it becomes
     "Question 1: " + the stripped piece (the self-QA prompt ends inside question 1). Any "Question"
     prefix counts, so "Question: ..." is left alone.
   * otherwise: every segment is cut with `str.splitlines()` (which also breaks at \r, \x0b, \x0c,
     \x1c-\x1e, \x85, \u2028, \u2029), lines are stripped and the empty ones dropped, all segments
     together in one list. If that list has at least two lines and the second starts with "1.", the
     first is dropped as a preamble ("Here are the implications:") -- once, for the whole list.
3. Each piece becomes "{title}\n{piece}" (title as given), and "{title}\n{stripped context}" is
   always appended last.

So an empty completion gives just the passage with `split_newlines` (the "train on passage" baseline)
and `["{title}\n", "{title}\n{context}"]` without it.

`clean_self_edit` runs before that and finds the outputs the domain must record rather than crash on:
empty, junk without words, chat special tokens leaking from the model, and over-long edits.
`first_usable_self_edit` is the reference's evaluation-table fallback (the first non-empty of the k
sampled edits).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Protocol, Sequence

# Reference regexes (self-QA detection and split points); Python `re` on str: \s and \d are Unicode.
_QUESTION_NUMBER = re.compile(r"Question\s+\d+:")
_ANSWER = re.compile(r"Answer\s*:")
_SPLIT_BEFORE_QUESTION = re.compile(r"\n(?=Question\s+\d+:)")
_FIRST_QUESTION = "Question 1: "


def is_self_qa(completion: str) -> bool:
    return bool(_QUESTION_NUMBER.search(completion)) and bool(_ANSWER.search(completion))


def _segments(completion: str) -> list[str]:
    segments = [s.strip() for s in completion.split("---")]
    return [s for s in segments if s] or [completion.strip()]


def _split_self_qa(completion: str) -> list[str]:
    pieces = _SPLIT_BEFORE_QUESTION.split(completion.strip())
    if not pieces[0].lstrip().startswith("Question"):
        pieces[0] = _FIRST_QUESTION + pieces[0].strip()
    return pieces


def _split_lines(segments: Sequence[str]) -> list[str]:
    lines = [line.strip() for segment in segments for line in segment.splitlines()]
    lines = [line for line in lines if line]
    if len(lines) > 1 and lines[1].startswith("1."):
        return lines[1:]
    return lines


def build_train_sequences(completion: str, title: str, context: str,
                          split_newlines: bool = True) -> list[str]:
    pieces = _segments(completion)
    if split_newlines:
        pieces = _split_self_qa(completion) if is_self_qa(completion) else _split_lines(pieces)
    return [f"{title}\n{p}" for p in pieces] + [f"{title}\n{context.strip()}"]


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


# ---------------------------------------------------------------------------------------------------
# Evaluation-table fallback

FALLBACK_RULES = ("nonempty", "usable")


def first_usable_self_edit(edits: Sequence[str], rule: str = "usable",
                           special_tokens: Sequence[str] = ()) -> int | None:
    """Index of the self-edit the single-passage table uses for a passage, or None if there is none.

    The reference's evaluation driver drops empty completions before taking the first one
    (`[c for c in completions if c.strip()][:1]`), so a passage whose first sample is empty is
    scored on its next sample. "nonempty" is exactly that rule; "usable" also skips what
    `clean_self_edit` rejects (no alphabetic word, nothing left before a leaked special token),
    which the reference would have trained on.
    """
    if rule not in FALLBACK_RULES:
        raise ValueError(f"unknown fallback rule {rule!r} (table.fallback_rule); choose from {FALLBACK_RULES}")
    for i, edit in enumerate(edits):
        if not isinstance(edit, str) or not edit.strip():
            continue
        if rule == "usable" and is_rejected(clean_self_edit(edit, special_tokens=special_tokens)[1]):
            continue
        return i
    return None
