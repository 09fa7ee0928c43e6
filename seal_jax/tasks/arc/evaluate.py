"""Evaluation of a (base or adapted) solver on an ARC task: queries, decoding, inversion, voting.

Queries (reference §3.2) per test input: the leave-one-out episodes with the real test input, each
plus `permute_n` copies with shuffled demonstrations (ordered dedup), and for each of transpose,
flip ud, flip lr, rot90, rot180 one episode drawn with the seeded generator and transformed
(duplicates skipped). A query must fit `max_tokens` together with its answer budget; the budget is
derived from the query itself (never from the true answer, which the reference used): the largest
demonstration output side, or the query input's side times the largest demonstration output/input
ratio, per axis, formatted as a grid, plus a few tokens, capped by `max_answer_tokens`. When no
leave-one-out query fits, queries with one more demonstration dropped are tried.

Answers are decoded strictly (text before the first "#", an optional markdown fence removed, then
the solver grid format; ragged or malformed text is a failed prediction with its reason), mapped
back through the query's inverse transform, and voted to two attempts: most frequent first, ties
broken by the count among untransformed queries, then by first appearance. A test is correct if its
true output equals an attempt (pass@2); a task is solved only if every test is correct. Reward 1/0.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from seal_jax.tasks.arc import augment as A
from seal_jax.tasks.arc.data import ArcTask
from seal_jax.tasks.arc.dataset import encode_episode
from seal_jax.tasks.arc.grids import GridError, MAX_SIDE, format_solver, grid_key, parse_solver


@dataclasses.dataclass(frozen=True)
class QuerySettings:
    permute_n: int = 2
    augment: bool = True  # add the 5 geometric query transforms
    max_tokens: int = 8192  # prompt + answer budget
    max_answer_tokens: int = 2048
    answer_slack_tokens: int = 8
    seed: int = 0


@dataclasses.dataclass
class Query:
    test_index: int
    episode: A.Episode
    transform: Optional[A.Transform]  # None = identity
    prompt_ids: list[int]
    max_new_tokens: int

    @property
    def transform_name(self) -> str:
        return "identity" if self.transform is None else self.transform.name


def answer_shape_bound(ep: A.Episode) -> tuple[int, int]:
    """An upper guess of the answer's shape from the demonstrations and the query input only."""
    h_in, w_in = ep.query_in.shape
    if not ep.demos:
        return min(MAX_SIDE, 2 * h_in), min(MAX_SIDE, 2 * w_in)
    h = max(o.shape[0] for _, o in ep.demos)
    w = max(o.shape[1] for _, o in ep.demos)
    rh = max(o.shape[0] / i.shape[0] for i, o in ep.demos)
    rw = max(o.shape[1] / i.shape[1] for i, o in ep.demos)
    return (min(MAX_SIDE, max(h, int(np.ceil(h_in * rh)))),
            min(MAX_SIDE, max(w, int(np.ceil(w_in * rw)))))


def answer_budget(ep: A.Episode, tokenizer, settings: QuerySettings) -> int:
    h, w = answer_shape_bound(ep)
    n = len(tokenizer.encode(format_solver(np.zeros((h, w), np.int8)) + "#", add_special=False))
    return min(settings.max_answer_tokens, n + settings.answer_slack_tokens)


def build_queries(task: ArcTask, tokenizer, settings: QuerySettings = QuerySettings()
                  ) -> tuple[list[Query], dict]:
    """All queries of every test input; stats count what did not fit."""
    queries: list[Query] = []
    stats = {"dropped_too_long": 0, "fallback_tests": [], "unanswerable_tests": []}
    for j, test_in in enumerate(task.test_inputs):
        rng = np.random.default_rng([settings.seed, j])
        made = _fit(_episodes(task.train, test_in, rng, settings), j, tokenizer, settings, stats)
        if not made and len(task.train) > 2:
            stats["fallback_tests"].append(j)
            fewer = [A.Episode(ep.demos[1:], ep.query_in, None)
                     for ep in A.leave_one_out_queries(task.train, test_in)]
            made = _fit([(ep, None) for ep in fewer], j, tokenizer, settings, stats)
        if not made:
            stats["unanswerable_tests"].append(j)
        queries.extend(made)
    return queries, stats


def _episodes(demos, test_in, rng, settings: QuerySettings) -> list[tuple[A.Episode, Optional[A.Transform]]]:
    base = []
    for ep in A.leave_one_out_queries(demos, test_in):
        base.append(ep)
        base.extend(A.permute_examples(ep, rng) for _ in range(settings.permute_n))
    base = A.ordered_unique(base)
    items = [(ep, None) for ep in base]
    if settings.augment:
        seen = {ep.key() for ep in base}
        for t in A.QUERY_TRANSFORMS:
            new = t.apply(base[int(rng.integers(len(base)))])
            if new.key() not in seen:
                seen.add(new.key())
                items.append((new, t))
    return items


def _fit(items, j, tokenizer, settings, stats) -> list[Query]:
    out = []
    for ep, t in items:
        prompt_ids, _ = encode_episode(ep, tokenizer, with_answer=False)
        budget = answer_budget(ep, tokenizer, settings)
        if len(prompt_ids) + budget > settings.max_tokens:
            stats["dropped_too_long"] += 1
            continue
        out.append(Query(j, ep, t, prompt_ids, budget))
    return out


# ------------------------------------------------------------------------------------------------
# Decoding and voting


def decode_answer(text: str) -> tuple[Optional[np.ndarray], Optional[str]]:
    """(grid, None) or (None, reason)."""
    if "```" in text:  # keep the fenced block, without its language tag line
        block = text.split("```")[1]
        tag, _, rest = block.partition("\n")
        text = block if tag.strip().startswith("[") else rest
    text = text.split("#", 1)[0]
    try:
        return parse_solver(text), None
    except GridError as e:
        return None, str(e)


def prediction(query: Query, text: str) -> tuple[Optional[np.ndarray], Optional[str]]:
    grid, reason = decode_answer(text)
    if grid is None:
        return None, reason
    if query.transform is None:
        return grid, None
    try:
        return query.transform.invert(grid), None
    except ValueError as e:
        return None, f"inverse {query.transform.name}: {e}"


def vote(predictions: Sequence[tuple[np.ndarray, str]], attempts: int = 2) -> list[np.ndarray]:
    """Up to `attempts` grids from (grid, transform name) predictions (see module docstring)."""
    table: dict[bytes, list] = {}  # key -> [count, identity count, first index, grid]
    for i, (grid, name) in enumerate(predictions):
        entry = table.setdefault(grid_key(grid), [0, 0, i, grid])
        entry[0] += 1
        entry[1] += name == "identity"
    ranked = sorted(table.values(), key=lambda e: (-e[0], -e[1], e[2]))
    return [e[3] for e in ranked[:attempts]]


def matches(truth: np.ndarray, attempts: Sequence[np.ndarray]) -> bool:
    return any(a.shape == truth.shape and np.array_equal(a, truth) for a in attempts)


def score_answers(task: ArcTask, queries: Sequence[Query], texts: Sequence[str],
                  attempts: int = 2) -> tuple[float, dict]:
    """Reward (1 if every test output is among its attempts, else 0) and JSON-able details."""
    if not task.has_solutions:
        raise ValueError(f"task {task.id}: test outputs unknown, cannot score")
    per_test: list[list] = [[] for _ in range(task.num_tests)]
    failures: list[list[str]] = [[] for _ in range(task.num_tests)]
    for q, text in zip(queries, texts):
        grid, reason = prediction(q, text)
        if grid is None:
            failures[q.test_index].append(f"{q.transform_name}: {reason}")
        else:
            per_test[q.test_index].append((grid, q.transform_name))
    tests = []
    for j, truth in enumerate(task.test_outputs):
        chosen = vote(per_test[j], attempts)
        tests.append({"correct": matches(truth, chosen), "attempts": [a.tolist() for a in chosen],
                      "num_queries": sum(q.test_index == j for q in queries),
                      "num_decoded": len(per_test[j]), "decode_failures": failures[j][:5]})
    solved = all(t["correct"] for t in tests)
    return float(solved), {"solved": solved, "tests": tests}
