"""Passages with questions for knowledge incorporation: loading, validation and deterministic splits.

A `Passage` is one SQuAD paragraph (title, context) plus the questions asked about it. Loaders accept
the reference's flat format (`[{title, context, questions: [{question, answer}]}]`), the raw SQuAD v1.1
nested format (`{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}`), HF `datasets`
(optional dependency) and the corpus embedded in the package (`seal_jax/data/knowledge_corpus.json`).

Validation policy: a record that cannot be read (missing or non-string field, wrong container type)
raises `DataError` naming the record index and the field; a passage without questions is kept and
flagged in `Passage.issues`, because the domain records an outcome for it instead of crashing a round.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import pathlib
import random
from typing import Any, Iterable, Sequence

import numpy as np

from seal_jax import errors
from seal_jax.validation import read_json_file

NO_QUESTIONS = "no_questions"  # issue code: the passage can be trained on but not evaluated
EMBEDDED_CORPUS = "knowledge_corpus.json"  # file name under seal_jax/data/ (package data)


class DataError(errors.DataError):  # a user error: the CLI prints it as one line
    """A malformed passage record; the message names the record index and field."""


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    answer: str  # the gold span (first SQuAD answer, as in the reference's squad_*.json)


@dataclasses.dataclass(frozen=True)
class Passage:
    title: str
    context: str
    questions: tuple[Question, ...]
    id: str  # stable across loads: derived from title+context unless the record carries an "id"
    issues: tuple[str, ...] = ()

    @property
    def has_questions(self) -> bool:
        return bool(self.questions)

    def to_record(self) -> dict[str, Any]:
        """The flat reference format (what `passages_from_records` reads back)."""
        return {
            "id": self.id,
            "title": self.title,
            "context": self.context,
            "questions": [{"question": q.question, "answer": q.answer} for q in self.questions],
        }


def passage_id(title: str, context: str) -> str:
    digest = hashlib.sha1(f"{title}\n{context}".encode("utf-8")).hexdigest()
    return f"p{digest[:12]}"


# ---------------------------------------------------------------------------------------------------
# Record parsing


def _string_field(record: Any, field: str, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if field not in record:
        raise DataError(f"{where}: missing field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def _list_field(record: dict, field: str, where: str) -> list:
    value = record.get(field, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f"{where}: field {field!r} must be a list, got {type(value).__name__}")
    return value


def _make_passage(title: str, context: str, questions: list[Question], given_id: Any,
                  where: str) -> Passage:
    if given_id is not None and not isinstance(given_id, (str, int)):
        raise DataError(f"{where}: field 'id' must be a string or integer")
    pid = str(given_id) if given_id is not None else passage_id(title, context)
    issues = () if questions else (NO_QUESTIONS,)
    return Passage(title=title, context=context, questions=tuple(questions), id=pid, issues=issues)


def _flat_record(record: Any, index: int, source: str) -> Passage:
    where = f"{source}record {index}"
    title = _string_field(record, "title", where, allow_empty=True)
    context = _string_field(record, "context", where)
    questions = []
    for j, q in enumerate(_list_field(record, "questions", where)):
        qwhere = f"{where} questions[{j}]"
        questions.append(Question(question=_string_field(q, "question", qwhere),
                                  answer=_string_field(q, "answer", qwhere)))
    return _make_passage(title, context, questions, record.get("id"), where)


def _nested_article(article: Any, index: int, source: str) -> list[Passage]:
    where = f"{source}data[{index}]"
    title = _string_field(article, "title", where, allow_empty=True)
    passages = []
    for p, paragraph in enumerate(_list_field(article, "paragraphs", where)):
        pwhere = f"{where} paragraphs[{p}]"
        context = _string_field(paragraph, "context", pwhere)
        questions = []
        for j, qa in enumerate(_list_field(paragraph, "qas", pwhere)):
            qwhere = f"{pwhere} qas[{j}]"
            question = _string_field(qa, "question", qwhere)
            answers = _list_field(qa, "answers", qwhere)
            if not answers:
                raise DataError(f"{qwhere}: field 'answers' is empty (SQuAD v2 unanswerable questions "
                                "are not supported)")
            questions.append(Question(question=question,
                                      answer=_string_field(answers[0], "text", f"{qwhere} answers[0]")))
        passages.append(_make_passage(title, context, questions, paragraph.get("id"), pwhere))
    return passages


def _dedupe_ids(passages: list[Passage]) -> list[Passage]:
    """Identical (title, context) records would share a derived id; suffix repeats so ids stay keys."""
    seen: dict[str, int] = {}
    out = []
    for p in passages:
        n = seen.get(p.id, 0)
        seen[p.id] = n + 1
        out.append(p if n == 0 else dataclasses.replace(p, id=f"{p.id}-{n}"))
    return out


def passages_from_records(data: Any, *, source: str = "") -> list[Passage]:
    """Parse either the flat reference list or the raw SQuAD v1.1 `{"data": [...]}` object."""
    prefix = f"{source}: " if source else ""
    if isinstance(data, dict) and "data" in data:
        articles = data["data"]
        if not isinstance(articles, list):
            raise DataError(f"{prefix}field 'data' must be a list of articles")
        passages = [p for i, a in enumerate(articles) for p in _nested_article(a, i, prefix)]
    elif isinstance(data, list):
        passages = [_flat_record(r, i, prefix) for i, r in enumerate(data)]
    else:
        raise DataError(f"{prefix}expected a list of passages or a SQuAD object with a 'data' list, "
                        f"got {type(data).__name__}")
    return _dedupe_ids(passages)


# ---------------------------------------------------------------------------------------------------
# Loaders


def load_squad_json(path: str | pathlib.Path) -> list[Passage]:
    path = pathlib.Path(path)
    data = read_json_file(path, what="SQuAD file", error=DataError)  # not found / not UTF-8 / not JSON, naming the file
    return passages_from_records(data, source=str(path))


def load_hf_squad(split: str = "validation", *, name: str = "squad", **load_kwargs) -> list[Passage]:
    """SQuAD from HF `datasets`, one Passage per distinct (title, context), questions in dataset order."""
    try:
        import datasets  # optional: only this loader needs it
    except ImportError as e:
        raise ImportError("load_hf_squad needs the optional `datasets` package "
                          "(pip install datasets); local JSON and the embedded corpus do not") from e
    rows = datasets.load_dataset(name, split=split, **load_kwargs)
    return passages_from_hf_rows(rows, source=f"hf:{name}/{split}")


def passages_from_hf_rows(rows: Iterable[dict], *, source: str = "hf") -> list[Passage]:
    """Group HF SQuAD rows ({title, context, question, answers: {text: [...]}}) by passage."""
    grouped: dict[tuple[str, str], list[Question]] = {}
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        key = (_string_field(row, "title", where, allow_empty=True), _string_field(row, "context", where))
        answers = row.get("answers", {})
        texts = answers.get("text", []) if isinstance(answers, dict) else None
        if not texts or not isinstance(texts[0], str):
            raise DataError(f"{where}: field 'answers.text' must be a non-empty list of strings")
        grouped.setdefault(key, []).append(
            Question(question=_string_field(row, "question", where), answer=texts[0]))
    return _dedupe_ids([_make_passage(t, c, qs, None, source) for (t, c), qs in grouped.items()])


def _embedded_corpus_resource():
    # Resolved through the top-level package: seal_jax/data/ is package data, not a subpackage.
    return importlib.resources.files("seal_jax").joinpath("data", EMBEDDED_CORPUS)


def load_embedded_corpus() -> list[Passage]:
    """The passages shipped inside the package (`seal_jax/data/knowledge_corpus.json`)."""
    resource = _embedded_corpus_resource()
    if not resource.is_file():
        raise FileNotFoundError(f"embedded corpus seal_jax/data/{EMBEDDED_CORPUS} is not installed")
    return passages_from_records(json.loads(resource.read_text(encoding="utf-8")),
                                 source=f"seal_jax/data/{EMBEDDED_CORPUS}")


def load_passages(spec: str) -> list[Passage]:
    """`"embedded"`, `"hf:<split>"` (e.g. `hf:validation`) or a path to a SQuAD-format JSON file."""
    if spec == "embedded":
        return load_embedded_corpus()
    if spec.startswith("hf:"):
        return load_hf_squad(spec[3:] or "validation")
    return load_squad_json(spec)


# ---------------------------------------------------------------------------------------------------
# Splits

SHUFFLES = ("reference", "numpy")
# Order of a separate training file. "shuffled": the evaluation file's rule and seed, as the
# reference's make_squad_data shuffled squad_train.json before drawing its rounds' passages. "file":
# as written, for a file that already is such a draw (e.g. the reference's iter0_train.json, whose
# first 50 passages are its round 1): shuffling it again would pick other passages.
TRAIN_ORDERS = ("shuffled", "file")


def shuffled(passages: Sequence[Passage], seed: int, *, shuffle: str = "reference") -> list[Passage]:
    """A deterministic permutation.

    "reference": CPython `random.seed(seed); random.shuffle(list)` as in the reference's
    make_squad_data (a fresh `random.Random(seed)` draws the same sequence, without touching the
    global generator). "numpy": `np.random.default_rng(seed).permutation`, stable across platforms.
    """
    items = list(passages)
    if shuffle == "reference":
        random.Random(seed).shuffle(items)
        return items
    if shuffle == "numpy":
        return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
    raise ValueError(f"unknown shuffle {shuffle!r}; choose from {SHUFFLES}")


def split_passages(passages: Sequence[Passage], n_train: int, n_eval: int, seed: int, *,
                   shuffle: str = "reference",
                   train_pool: Sequence[Passage] | None = None,
                   train_order: str = "shuffled") -> tuple[list[Passage], list[Passage]]:
    """(train, eval) in the shuffled order; eval is always the first `n_eval` of `passages`.

    Without `train_pool`, train is the next `n_train` of the same order: eval first mirrors the
    reference, whose eval sets are the first 200/250 passages of the seed-42 shuffle of its validation
    file, and the two parts never overlap. With `train_pool` (a separate training file, as the
    reference's squad_train.json) train is the first `n_train` of that pool shuffled by the same rule
    and seed (the reference's make_squad_data shuffles every input file with random.seed(42)); a pool
    passage with the same title and context as an evaluation passage is an error, since training on
    it would leak the held-out set. `train_order="file"` takes the pool's first `n_train` as written
    (see TRAIN_ORDERS).
    """
    if train_order not in TRAIN_ORDERS:
        raise ValueError(f"unknown train order {train_order!r}; choose from {TRAIN_ORDERS}")
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
    if train_pool is None:
        if n_train + n_eval > len(passages):
            raise ValueError(f"asked for {n_train} train + {n_eval} eval passages but only "
                             f"{len(passages)} are available")
        order = shuffled(passages, seed, shuffle=shuffle)
        return order[n_eval:n_eval + n_train], order[:n_eval]
    if n_eval > len(passages):
        raise ValueError(f"asked for {n_eval} eval passages but only {len(passages)} are available")
    if n_train > len(train_pool):
        raise ValueError(f"asked for {n_train} train passages but the training file has only "
                         f"{len(train_pool)}")
    evaluation = shuffled(passages, seed, shuffle=shuffle)[:n_eval]
    pool = shuffled(train_pool, seed, shuffle=shuffle) if train_order == "shuffled" else list(train_pool)
    train = pool[:n_train]
    held_out = {(p.title, p.context) for p in evaluation}
    leaked = [p for p in train if (p.title, p.context) in held_out]
    if leaked:
        raise ValueError(f"{len(leaked)} training passages are also evaluation passages (first: "
                         f"{leaked[0].title!r}); the training file must not contain the held-out set")
    return train, evaluation
