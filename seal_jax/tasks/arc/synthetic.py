"""A seeded suite of easy ARC-style tasks, for showing that TTT helps a small model.

Real ARC tasks are far beyond the embedded 135M model, so its learning signal is measured here:
small grids (sides 2..4 by default), a few colours, and rules a model can pick up from a few
demonstrations after fine-tuning: mirror left-right / up-down, transpose, rotate 180, recolour one
colour, tile side by side / on top, double the resolution. Different rules favour different TTT
configs (geometric augmentations conjugate a mirror into another mirror, size/repeat families change
the grid shapes the model sees), which is what the self-edit has to choose.

For the geometric rules a grid that the rule maps to itself is redrawn, so copying the test input
never solves a task. Every task id is `syn-<rule>-<index>`; the same (seed, settings) always gives
the same suite.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from seal_jax.tasks.arc.data import ArcTask, task_from_pairs

RULES: dict[str, Callable] = {
    "flip_lr": lambda g, p: np.fliplr(g),
    "flip_ud": lambda g, p: np.flipud(g),
    "transpose": lambda g, p: g.T,
    "rot180": lambda g, p: np.rot90(g, 2),
    "recolour": lambda g, p: np.where(g == p["from"], p["to"], g),
    "tile_lr": lambda g, p: np.tile(g, (1, 2)),
    "tile_ud": lambda g, p: np.tile(g, (2, 1)),
    "upscale": lambda g, p: np.repeat(np.repeat(g, 2, 0), 2, 1),
}
SHAPE_PRESERVING = ("flip_lr", "flip_ud", "transpose", "rot180", "recolour")


def _grid(rng: np.random.Generator, palette: np.ndarray, min_side: int, max_side: int,
          square: bool) -> np.ndarray:
    h = int(rng.integers(min_side, max_side + 1))
    w = h if square else int(rng.integers(min_side, max_side + 1))
    cells = rng.choice(palette, size=(h, w))
    return np.where(rng.random((h, w)) < 0.4, 0, cells).astype(np.int8)


def make_task(rule: str, index: int, seed: int = 0, *, num_demos: int = 3, num_tests: int = 1,
              min_side: int = 2, max_side: int = 4) -> ArcTask:
    if rule not in RULES:
        raise ValueError(f"unknown synthetic rule {rule!r}; choose from {sorted(RULES)}")
    rng = np.random.default_rng([seed, index, sorted(RULES).index(rule)])
    palette = 1 + rng.choice(9, size=3, replace=False)
    source = int(palette[0])
    params = {"from": source, "to": int(rng.choice([c for c in range(1, 10) if c != source]))}
    pairs = []
    while len(pairs) < num_demos + num_tests:
        g = _grid(rng, palette, min_side, max_side, square=rule == "transpose")
        if rule == "recolour":
            g[rng.integers(g.shape[0]), rng.integers(g.shape[1])] = params["from"]
        out = RULES[rule](g, params)
        if rule in SHAPE_PRESERVING and np.array_equal(out, g):
            continue
        pairs.append((g, np.asarray(out, np.int8)))
    return task_from_pairs(f"syn-{rule}-{index}", pairs[:num_demos], pairs[num_demos:])


def make_suite(num_per_rule: int = 1, seed: int = 0, rules: Sequence[str] = tuple(RULES), *,
               num_demos: int = 3, min_side: int = 2, max_side: int = 4,
               two_test_every: int = 4) -> list[ArcTask]:
    """`num_per_rule` tasks per rule; every `two_test_every`-th task has two test inputs (0: none)."""
    tasks = []
    for i in range(num_per_rule):
        for rule in rules:
            n = len(tasks)
            num_tests = 2 if two_test_every and n % two_test_every == two_test_every - 1 else 1
            tasks.append(make_task(rule, i, seed, num_demos=num_demos, num_tests=num_tests,
                                   min_side=min_side, max_side=max_side))
    return tasks
