"""Self-edit -> training sequences (reference §1.3) and self-edit screening."""
import json

import pytest

from seal_jax.tasks.knowledge import sequences as S
from seal_jax.tasks.knowledge.sequences import build_train_sequences, clean_self_edit, is_rejected

T, C = "Title", "The passage context."
PASSAGE = f"{T}\n{C}"


def test_empty_completion_with_split_is_train_on_passage():
    assert build_train_sequences("", T, C) == [PASSAGE]
    assert build_train_sequences("  \n ", T, C) == [PASSAGE]
    # Only separators: no segment survives, so the whole stripped completion is used (reference quirk).
    assert build_train_sequences("---\n---", T, C) == [f"{T}\n---", f"{T}\n---", PASSAGE]


def test_empty_completion_without_split_keeps_near_empty_sequence():
    assert build_train_sequences("", T, C, split_newlines=False) == [f"{T}\n", PASSAGE]


def test_lines_become_title_prefixed_sequences_and_passage_is_last():
    completion = "  First fact.\n\n Second fact.  \n"
    assert build_train_sequences(completion, T, C) == [f"{T}\nFirst fact.", f"{T}\nSecond fact.", PASSAGE]
    assert build_train_sequences(completion, T, C, split_newlines=False) == [
        f"{T}\nFirst fact.\n\n Second fact.", PASSAGE]


def test_preamble_dropped_only_when_second_line_starts_with_1():
    numbered = "Here are the implications:\n1. A.\n2. B."
    assert build_train_sequences(numbered, T, C) == [f"{T}\n1. A.", f"{T}\n2. B.", PASSAGE]
    # Blank lines do not count: the second *non-empty* line decides.
    assert build_train_sequences("Intro\n\n1. A.", T, C) == [f"{T}\n1. A.", PASSAGE]
    # First line numbered itself, or second line not "1.": nothing dropped.
    assert build_train_sequences("1. A.\n2. B.", T, C) == [f"{T}\n1. A.", f"{T}\n2. B.", PASSAGE]
    assert build_train_sequences("Intro\n2. B.\n1. A.", T, C)[0] == f"{T}\nIntro"
    assert build_train_sequences("Intro\n 10. B.", T, C)[0] == f"{T}\nIntro"
    # A single line is never dropped.
    assert build_train_sequences("1. Only.", T, C) == [f"{T}\n1. Only.", PASSAGE]
    # Without split there is no preamble rule.
    assert build_train_sequences(numbered, T, C, split_newlines=False) == [f"{T}\n{numbered}", PASSAGE]


def test_triple_dash_segments():
    completion = "Rewrite one.\n---\n\nRewrite two,\nline two.\n---\n   \n---"
    assert build_train_sequences(completion, T, C, split_newlines=False) == [
        f"{T}\nRewrite one.", f"{T}\nRewrite two,\nline two.", PASSAGE]
    assert build_train_sequences(completion, T, C) == [
        f"{T}\nRewrite one.", f"{T}\nRewrite two,", f"{T}\nline two.", PASSAGE]
    # The preamble rule looks at the lines of all segments together, once (reference), not per segment.
    assert build_train_sequences("A\nB\n---\nIntro:\n1. x", T, C) == [
        f"{T}\nA", f"{T}\nB", f"{T}\nIntro:", f"{T}\n1. x", PASSAGE]
    assert build_train_sequences("Intro:\n---\n1. x\n2. y", T, C) == [f"{T}\n1. x", f"{T}\n2. y", PASSAGE]


def test_self_qa_split_per_pair_with_question_1_prefix():
    # The self-QA prompt ends with "Question 1: ", so the completion starts inside the first question.
    completion = ("Who wrote it?\nAnswer: Ann.\nQuestion 2: When?\nAnswer: 1990.\n\n"
                  "Question 3: Where?\nAnswer: Rome.")
    # Pieces are not stripped: the blank line before question 3 leaves a trailing newline (reference).
    assert build_train_sequences(completion, T, C) == [
        f"{T}\nQuestion 1: Who wrote it?\nAnswer: Ann.",
        f"{T}\nQuestion 2: When?\nAnswer: 1990.\n",
        f"{T}\nQuestion 3: Where?\nAnswer: Rome.",
        PASSAGE]
    already = "Question 1: Who?\nAnswer: Ann.\nQuestion 2: When?\nAnswer: 1990."
    assert build_train_sequences(already, T, C)[:2] == [
        f"{T}\nQuestion 1: Who?\nAnswer: Ann.", f"{T}\nQuestion 2: When?\nAnswer: 1990."]
    # A "Question n:" that does not start a line is not a split point.
    inline = "Who? Answer: Ann. See Question 2: nothing\nQuestion 2: Why?\nAnswer: Because."
    assert len(build_train_sequences(inline, T, C)) == 3
    # Without "Answer:" it is not self-QA: plain line split.
    assert build_train_sequences("Question 2: a\nQuestion 3: b", T, C) == [
        f"{T}\nQuestion 2: a", f"{T}\nQuestion 3: b", PASSAGE]
    # Any "Question" start counts as already prefixed: no "Question 1: Question: ..." (reference).
    assert build_train_sequences("Question: Who?\nAnswer: Ann.\nQuestion 2: When?\nAnswer: 1990.",
                                 T, C)[0] == f"{T}\nQuestion: Who?\nAnswer: Ann."
    # Self-QA is decided on the whole completion and ignores "---" segments; "Answer :" counts too.
    assert build_train_sequences("Who?\nAnswer : Ann.\n---\nQuestion 2: When?\nAnswer: 1990.", T, C) == [
        f"{T}\nQuestion 1: Who?\nAnswer : Ann.\n---", f"{T}\nQuestion 2: When?\nAnswer: 1990.", PASSAGE]
    # A single QA pair has no "Question <n>:" header in the completion: line split, as the reference.
    assert build_train_sequences("Who?\nAnswer: Ann.", T, C) == [f"{T}\nWho?", f"{T}\nAnswer: Ann.", PASSAGE]


def test_lines_split_like_str_splitlines_and_context_is_stripped():
    # str.splitlines() also breaks at \r, \u2028, \x0c ...; split("\n") would keep these lines whole.
    assert build_train_sequences("A.\rB.\u2028C.\x0cD.", T, C) == [
        f"{T}\nA.", f"{T}\nB.", f"{T}\nC.", f"{T}\nD.", PASSAGE]
    # The appended passage is "{title}\n{context.strip()}"; the title is used as given.
    assert build_train_sequences("A.", " T ", "  ctx \n") == [" T \nA.", " T \nctx"]


def test_first_usable_self_edit():
    edits = ["", "  \n", "!!! 42", "Paris is in France.", "Later."]
    assert S.first_usable_self_edit(edits, "nonempty") == 2  # the reference: first non-empty
    assert S.first_usable_self_edit(edits, "usable") == 3  # also skips word-less junk
    assert S.first_usable_self_edit(["<|im_end|>junk", "A fact."]) == 1
    assert S.first_usable_self_edit(["", " "]) is None and S.first_usable_self_edit([]) is None
    with pytest.raises(ValueError, match="fallback rule"):
        S.first_usable_self_edit(edits, "first")


def test_reference_counts_on_shared_self_edits(shared_dir):
    """Spec §1.3: train iter0 (rank_iter0: first 50 passages x first 5 edits) has 8.7 / 7 / 67
    sequences per request (mean / median / max), the appended passage included."""
    records = json.load((shared_dir / "data/squad/self_edits_qwen7b_train_iter0.json").open())
    counts = sorted(len(build_train_sequences(c, r["title"], r["context"]))
                    for r in records[:50] for c in r["completions"][:5])
    assert len(counts) == 250
    assert round(sum(counts) / len(counts), 1) == 8.7 and counts[125] == 7 and counts[-1] == 67
    for r in records[:5]:
        for c in r["completions"]:
            seqs = build_train_sequences(c, r["title"], r["context"])
            assert seqs[-1] == f"{r['title']}\n{r['context']}"
            assert all(s.startswith(r["title"] + "\n") and s.strip() != r["title"] for s in seqs)


# ---------------------------------------------------------------------------------------------------
# clean_self_edit


class ByteTokenizer:
    def encode(self, text, add_special=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special=True):
        return bytes(ids).decode("utf-8", errors="ignore")


def codes(issues):
    return [i.code for i in issues]


def test_clean_text_passes_unchanged():
    text, issues = clean_self_edit("  1. Paris is in France.\n2. It is big.\n")
    assert text == "1. Paris is in France.\n2. It is big." and issues == []


@pytest.mark.parametrize("raw, code", [
    ("", S.EMPTY), ("   \n\t ", S.EMPTY), ("1. 2. 3. --- !!! 42", S.NO_WORDS), ("... ??? ***", S.NO_WORDS),
])
def test_empty_and_junk_are_fatal(raw, code):
    text, issues = clean_self_edit(raw)
    assert codes(issues) == [code] and is_rejected(issues)


def test_special_tokens_cut_the_text():
    text, issues = clean_self_edit("Fact one.\nFact two.<|im_end|>\n<|im_start|>user\nNew passage")
    assert text == "Fact one.\nFact two."
    assert codes(issues) == [S.SPECIAL_TOKENS] and not is_rejected(issues)
    assert "'<|im_end|>'" in issues[0].detail
    text, issues = clean_self_edit("Fact.<|eot_id|>")
    assert text == "Fact." and codes(issues) == [S.SPECIAL_TOKENS]
    # Listed tokenizer-specific spellings count too; the earliest hit wins.
    text, issues = clean_self_edit("A fact.</s> more <|endoftext|>", special_tokens=["</s>"])
    assert text == "A fact." and "'</s>'" in issues[0].detail
    # A tokenizer's own special-token list is used when it has one (seal_jax Tokenizer does).
    tok = ByteTokenizer()
    tok.special_tokens = ("<file_sep>",)
    text, issues = clean_self_edit("Fact one.<file_sep>junk", tokenizer=tok)
    assert text == "Fact one." and codes(issues) == [S.SPECIAL_TOKENS]
    # Nothing left after the cut: also fatal.
    text, issues = clean_self_edit("<|im_start|>assistant\nhello")
    assert text == "" and codes(issues) == [S.SPECIAL_TOKENS, S.EMPTY] and is_rejected(issues)
    # Ordinary angle brackets and pipes are text.
    assert clean_self_edit("Is <b> | so |> on")[1] == []


def test_too_long_truncated_or_rejected():
    tok = ByteTokenizer()
    text, issues = clean_self_edit("abcdefghij klmnop", tokenizer=tok, max_tokens=10)
    assert text == "abcdefghij" and codes(issues) == [S.TOO_LONG] and not is_rejected(issues)
    assert "17 tokens > max_tokens=10; truncated" in issues[0].detail
    text, issues = clean_self_edit("abcdefghij klmnop", tokenizer=tok, max_tokens=10, on_overflow="reject")
    assert codes(issues) == [S.TOO_LONG] and is_rejected(issues)
    assert clean_self_edit("short text", tokenizer=tok, max_tokens=10)[1] == []
    with pytest.raises(ValueError, match="needs a tokenizer"):
        clean_self_edit("x", max_tokens=3)
    with pytest.raises(ValueError, match="on_overflow"):
        clean_self_edit("x", on_overflow="drop")
    with pytest.raises(TypeError, match="must be a string"):
        clean_self_edit(None)
