"""Checks on the embedded knowledge corpus (seal_jax/data/knowledge_corpus.json).

The corpus is hand-written data, so these tests are its only guard: a broken record would surface as
a silent zero reward in the knowledge demo rather than as an error. Each check collects every
offending record and reports them together, so one run names all the problems.
"""
import fnmatch
import importlib.resources
import json
import pathlib
import re
import tomllib

import pytest


REPO = pathlib.Path(__file__).resolve().parents[1]
CORPUS_NAME = "knowledge_corpus.json"
PASSAGE_KEYS = {"id", "title", "context", "questions"}
QUESTION_KEYS = {"question", "answer"}
N_PASSAGES = 60
CONTEXT_WORDS = (80, 160)
QUESTIONS_PER_PASSAGE = (4, 6)
ANSWER_WORDS = (1, 6)
TITLE_WORDS = (1, 4)
MIN_TOTAL_QUESTIONS = 250
ID_PATTERN = re.compile(r"kc-\d{3}")


@pytest.fixture(scope="module")
def corpus():
    resource = importlib.resources.files("seal_jax.data").joinpath(CORPUS_NAME)
    return json.loads(resource.read_text(encoding="utf-8"))


def _assert_none(bad, what):
    assert not bad, f"{len(bad)} record(s) with {what}: {bad[:10]}"


def test_parses_as_list_of_passages(corpus):
    assert isinstance(corpus, list)
    assert len(corpus) == N_PASSAGES
    _assert_none([i for i, r in enumerate(corpus) if not isinstance(r, dict)], "a non-object record")


def test_schema_is_exact(corpus):
    bad = []
    for i, r in enumerate(corpus):
        if set(r) != PASSAGE_KEYS:
            bad.append((i, "keys", sorted(set(r) ^ PASSAGE_KEYS)))
            continue
        for field in ("id", "title", "context"):
            if not isinstance(r[field], str) or not r[field].strip() or r[field] != r[field].strip():
                bad.append((r.get("id", i), field))
        if not isinstance(r["questions"], list):
            bad.append((r["id"], "questions is not a list"))
            continue
        for j, q in enumerate(r["questions"]):
            if not isinstance(q, dict) or set(q) != QUESTION_KEYS:
                bad.append((r["id"], j, "question keys"))
                continue
            for field in QUESTION_KEYS:
                if not isinstance(q[field], str) or not q[field].strip() or q[field] != q[field].strip():
                    bad.append((r["id"], j, field))
    _assert_none(bad, "schema violations")


def test_ids_and_titles_are_unique_and_well_formed(corpus):
    ids = [r["id"] for r in corpus]
    titles = [r["title"] for r in corpus]
    assert len(set(ids)) == len(ids), "duplicate ids"
    assert len(set(titles)) == len(titles), "duplicate titles"
    _assert_none([i for i in ids if not ID_PATTERN.fullmatch(i)], "an id not of the form kc-NNN")
    lo, hi = TITLE_WORDS
    _assert_none([t for t in titles if not lo <= len(t.split()) <= hi], f"a title outside {TITLE_WORDS} words")


def test_every_answer_is_a_verbatim_span_of_its_context(corpus):
    bad = [(r["id"], q["answer"]) for r in corpus for q in r["questions"] if q["answer"] not in r["context"]]
    _assert_none(bad, "an answer that is not an exact substring of the context")


def test_answers_are_short_spans(corpus):
    lo, hi = ANSWER_WORDS
    bad = [(r["id"], q["answer"]) for r in corpus for q in r["questions"]
           if not lo <= len(q["answer"].split()) <= hi]
    _assert_none(bad, f"an answer outside {ANSWER_WORDS} words")


def test_questions_are_questions_that_do_not_contain_their_answer(corpus):
    # A question that spells out its own answer can be answered without the passage.
    bad = []
    for r in corpus:
        texts = [q["question"] for q in r["questions"]]
        if len(set(texts)) != len(texts):
            bad.append((r["id"], "repeated question"))
        for q in r["questions"]:
            if not q["question"].endswith("?"):
                bad.append((r["id"], q["question"]))
            if q["answer"].lower() in q["question"].lower():
                bad.append((r["id"], q["question"], q["answer"]))
    _assert_none(bad, "a malformed or self-answering question")


def test_context_word_counts_within_bounds(corpus):
    lo, hi = CONTEXT_WORDS
    bad = [(r["id"], len(r["context"].split())) for r in corpus if not lo <= len(r["context"].split()) <= hi]
    _assert_none(bad, f"a context outside {CONTEXT_WORDS} words")


def test_question_counts(corpus):
    lo, hi = QUESTIONS_PER_PASSAGE
    counts = [len(r["questions"]) for r in corpus]
    _assert_none([r["id"] for r in corpus if not r["questions"]], "no questions")
    _assert_none([(r["id"], n) for r, n in zip(corpus, counts) if not lo <= n <= hi],
                 f"a question count outside {QUESTIONS_PER_PASSAGE}")
    assert sum(counts) >= MIN_TOTAL_QUESTIONS


def test_corpus_is_declared_as_package_data():
    # importlib.resources finds the file in a source checkout either way; an installed wheel has it
    # only if pyproject's package-data globs cover it.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["seal_jax"]
    assert any(fnmatch.fnmatch(f"data/{CORPUS_NAME}", g) for g in globs), globs


def test_loads_through_the_knowledge_data_loader(corpus):
    from seal_jax.tasks.knowledge.data import load_embedded_corpus

    passages = load_embedded_corpus()
    assert [p.id for p in passages] == [r["id"] for r in corpus]
    assert all(p.has_questions and not p.issues for p in passages)
    assert sum(len(p.questions) for p in passages) == sum(len(r["questions"]) for r in corpus)
